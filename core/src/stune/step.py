"""The training step, typed: a batch becomes :class:`StepInputs`, the model gives a :class:`Prediction`.

Rectified flow: x_t = (1 − σ)·x₀ + σ·ε and the model regresses the velocity ε − x₀.
:class:`FlowStep` is the one place that turns cached latents into those inputs — σ drawn by the
run's schedule policy, or given (the eval loss fixes them) — for training, regularisation
targets and the eval loss alike. :class:`Predictor` runs the family's forward with the adapter on
or off, with or without gradient; features use it between "inputs built" and "forward"
(:meth:`stune.features.TrainingFeature.prepare_inputs`, e.g. scheduled sampling).

While the transformer runs, :func:`current_forward` tells code inside the model (a token router's
module hooks) what this forward is: a training forward with gradient or not, its inputs, and the
family's token counts. Only the training forward is marked as one; validation, eval loss,
regularisation targets and no-grad rollouts are not.

Importing this module does not import torch (families import it at registration time).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from stune.adapters import Adapter
    from stune.config import CoreOptions
    from stune.family import Components, ModelFamily
    from stune.layout import ForwardTokens


@dataclass
class AuxLoss:
    """An extra loss term a prediction carries (e.g. MoE load balancing): added as ``weight · value``,
    with gradient, and logged per step as ``aux_loss/<name>`` (the weighted value)."""

    value: torch.Tensor
    weight: float = 1.0

    @property
    def weighted(self) -> torch.Tensor:
        return self.value * self.weight


@dataclass
class Prediction:
    """What a family's ``predict`` returns.

    ``velocity``: the model output in the latents' layout (the target is ``noise − latents``);
    ``aux_losses``: named extra terms added to the training loss; ``metrics``: numbers logged per
    step (averaged over micro-batches) and never added to the loss.
    """

    velocity: torch.Tensor
    aux_losses: dict[str, AuxLoss] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def as_prediction(output: Prediction | torch.Tensor) -> Prediction:
    """A family may still return a bare velocity tensor; it is a prediction without extra terms."""
    return output if isinstance(output, Prediction) else Prediction(output)


@dataclass
class StepInputs:
    """One micro-batch, ready for the model.

    ``latents`` (x₀, fp32), ``noise`` (ε), ``sigmas`` (B,), ``noisy_latents`` (x_t in the model's
    dtype) and ``target`` (ε − x₀, fp32) share the latent layout (B, C, h, w). ``embeds`` are the
    batched caption tensors on the device; ``conditioning`` holds any other per-sample tensors the
    batch brought (e.g. reference latents); ``loss_weight`` multiplies the squared error element-wise
    (masks); ``generator`` is the run's seeded per-process generator for this step's draws.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor
    embeds: dict[str, torch.Tensor]
    generator: torch.Generator
    loss_weight: torch.Tensor | None = None
    is_regularisation: bool = False
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)

    @property
    def timesteps(self) -> torch.Tensor:
        """σ on the 0–1000 scale most transformers take."""
        return self.sigmas * 1000.0

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])

    def replace(self, **changes: Any) -> StepInputs:
        return dataclasses.replace(self, **changes)


# -- what the model is doing right now ------------------------------------------------------------


@dataclass(frozen=True)
class ForwardContext:
    """Published while the family's forward runs (see :func:`current_forward`)."""

    training: bool
    inputs: StepInputs
    tokens: ForwardTokens | None


_FORWARD: ContextVar[ForwardContext | None] = ContextVar("stune_forward", default=None)


def current_forward() -> ForwardContext | None:
    """The forward pass in progress, if the core's :class:`Predictor` started it (None for pipelines)."""
    return _FORWARD.get()


def in_training_forward() -> bool:
    """True inside the training forward with gradient, the only forward features may act in."""
    import torch

    context = _FORWARD.get()
    return context is not None and context.training and torch.is_grad_enabled()


@contextlib.contextmanager
def _published(context: ForwardContext) -> Iterator[None]:
    token = _FORWARD.set(context)
    try:
        yield
    finally:
        _FORWARD.reset(token)


# -- building inputs ------------------------------------------------------------------------------


class FlowStep:
    """Batches → :class:`StepInputs`, with the run's σ policy (the family's own schedule if it has
    one, else logit-normal / uniform / beta with a static or resolution-dependent shift)."""

    def __init__(
        self, family: ModelFamily, config: CoreOptions, components: Components, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.family = family
        self.config = config
        self.device = device
        self.dtype = dtype
        self.shift_parameters = family.shift_parameters(components)
        if config.flow_use_uniform_schedule:
            self.distribution = "uniform"
        elif config.flow_use_beta_schedule:
            self.distribution = "beta"
        else:
            self.distribution = "logit-normal"

    def shift(self, latent_height: int, latent_width: int) -> float:
        from stune.flow import resolution_shift

        if self.config.flow_schedule_auto_shift:
            return resolution_shift(self.family.sequence_length(latent_height, latent_width), *self.shift_parameters)
        return self.config.flow_schedule_shift

    def draw_sigmas(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from stune.flow import sample_sigmas

        custom = self.config.flow_custom_timesteps
        if custom:  # SimpleTuner's fixed list: σ drawn uniformly from it, as given
            import torch

            values = torch.tensor([v / 1000 if v > 1 else v for v in custom], device=self.device)
            return values[torch.randint(len(values), (latents.shape[0],), generator=generator, device=self.device)]
        if self.config.flow_cubic_schedule_weights:  # the user's own density replaces the family's as well
            from stune.flow import cubic_sigmas, shift_sigmas

            drawn = cubic_sigmas(
                self.config.flow_cubic_schedule_weights, latents.shape[0], generator=generator, device=self.device
            )
            return shift_sigmas(drawn, self.shift(latents.shape[-2], latents.shape[-1]))
        own = self.family.training_sigmas(latents.shape[0], generator, self.device)
        if own is not None:
            return own
        return sample_sigmas(
            latents.shape[0],
            sigmoid_scale=self.config.flow_sigmoid_scale,
            shift=self.shift(latents.shape[-2], latents.shape[-1]),
            generator=generator,
            device=self.device,
            distribution=self.distribution,
            beta=(self.config.flow_beta_schedule_alpha, self.config.flow_beta_schedule_beta),
        )

    def inputs(
        self,
        batch: dict[str, Any],
        generator: torch.Generator,
        *,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
    ) -> StepInputs:
        """Inputs for ``batch`` (as the loader gives it). x₀ is drawn from the cached latent
        distribution unless ``latents`` is given; ``noise`` and ``sigmas`` are drawn unless given."""
        import torch

        from stune.flow import noisy_inputs

        device = self.device
        if latents is None:
            mean = batch["latent_mean"].to(device, torch.float32, non_blocking=True)
            std = batch["latent_std"].to(device, torch.float32, non_blocking=True)
            latents = mean + std * torch.randn(mean.shape, generator=generator, device=device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=device)
        if sigmas is None:
            sigmas = self.draw_sigmas(latents, generator)
        embeds = {k: self._to_device(v, latents.shape[0]) for k, v in batch["embeds"].items()}
        conditioning = {k: self._to_device(v, latents.shape[0]) for k, v in batch.get("conditioning", {}).items()}
        weight = batch.get("loss_weight")
        chance = self.config.masked_loss_probability
        if weight is not None and chance < 1:  # masked_loss_probability: some samples train unmasked
            weight = weight.to(device)
            unmasked = torch.rand(weight.shape[0], generator=generator, device=device) >= chance
            weight = torch.where(unmasked.view(-1, *[1] * (weight.ndim - 1)), torch.ones_like(weight), weight)
        return StepInputs(
            latents=latents,
            noise=noise,
            sigmas=sigmas,
            noisy_latents=noisy_inputs(latents, noise, sigmas).to(self.dtype),
            target=noise - latents,
            embeds=embeds,
            generator=generator,
            loss_weight=weight.to(device, non_blocking=True) if weight is not None else None,
            is_regularisation=bool(batch.get("is_regularisation", False)),
            conditioning=conditioning,
            batch=batch,
        )

    def _to_device(self, value: torch.Tensor, size: int) -> torch.Tensor:
        value = value.to(self.device, self.dtype if value.is_floating_point() else value.dtype, non_blocking=True)
        if value.shape[0] != size:  # one sample's tensors shared by several σ (the eval loss)
            value = value.expand(size, *value.shape[1:]).contiguous()
        return value


# -- running the model ----------------------------------------------------------------------------


class Predictor:
    """Runs the family's forward on :class:`StepInputs`.

    ``adapter=False`` predicts like the base model (the adapter switched off); ``grad=False`` runs
    without gradient. Only ``grad=True`` marks the forward as a training forward. Gradient
    forwards go through ``transformer`` (possibly wrapped for distributed training); no-grad ones
    through ``unwrapped``, the model itself: a distributed wrapper's forward may start collective
    operations that the other processes never join.
    """

    def __init__(
        self,
        family: ModelFamily,
        transformer: torch.nn.Module,
        adapter: Adapter | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        unwrapped: torch.nn.Module | None = None,
    ) -> None:
        self.family = family
        self.transformer = transformer
        self.unwrapped = unwrapped if unwrapped is not None else transformer
        self.adapter = adapter
        self.autocast = autocast
        self.calls = 0  # forward passes run (features and tests count them)

    def __call__(self, inputs: StepInputs, *, adapter: bool = True, grad: bool = False) -> Prediction:
        import torch

        context = ForwardContext(training=grad, inputs=inputs, tokens=self.family.forward_tokens(inputs))
        with contextlib.ExitStack() as stack:
            if not grad:
                stack.enter_context(torch.no_grad())
            if not adapter:
                if self.adapter is None:
                    raise RuntimeError("the base model's prediction needs an adapter to switch off")
                stack.enter_context(self.adapter.disabled())
            stack.enter_context(_published(context))
            stack.enter_context(self.autocast())
            self.calls += 1
            model = self.transformer if grad else self.unwrapped
            return as_prediction(self.family.predict(model, inputs))
