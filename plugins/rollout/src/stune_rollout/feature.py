"""Scheduled sampling (rollout), batched: part of each batch trains on states the model produced itself.

The plan (SimpleTuner's, re-derived): each sample is rolled out with the current probability p, by k
training timesteps (of 1000), k drawn from [0, scheduled_sampling_max_step_offset] by the strategy.
The sample keeps the σ the run drew for it (the target); the rollout starts k/1000 noisier, at
σₛ = σ + k/1000 (never past pure noise), from xₛ = (1 − σₛ)·x₀ + σₛ·ε built from the sample's own
clean latent and noise, and the model (adapter on, no gradient, eval mode, so no dropout and no
token routing) integrates back down to σ with k Euler steps of 1/1000. The training forward then
sees that state instead of the interpolated one; the loss target stays ε − x₀.

Batched: the samples to roll out are sorted longest rollout first and step together. Step j runs
one forward on the samples with more than j steps left (a prefix of the sorted batch; the others
are done), so a training step costs max(k) no-grad forwards, where SimpleTuner runs Σk forwards of
batch 1.

Not copied from SimpleTuner (reference §8.9): the source state and the σ the model is given agree
(SimpleTuner builds xₛ from t/(T − 1) while passing the shifted scheduler σ); the target σ is the
exact one the run drew, not truncated to an integer timestep; the integration runs in fp32.

ReflexFlow (on by default, as in SimpleTuner; only on rolled-out samples of training batches):
* frequency compensation: the squared error of a rolled-out sample is weighted by
  β₂·(1 + α·e/‖e‖₁), e = clean − biased, where *clean* is the model's prediction at the
  interpolated state and *biased* its prediction at the rolled-out state. The clean prediction
  rides along with the first rollout forward (no extra call); the biased one is the training
  forward's own prediction, detached (the same numbers a separate no-grad forward would give,
  without its cost). Because that weight is known only after the forward, it is added as the
  auxiliary term ``reflexflow_fc`` = mean(m·(β₂·w − 1)·(v − target)²): with the core's
  mean(m·(v − target)²) the total is exactly mean(m·β₂·w·(v − target)²);
* anti-drift: ``reflexflow_adr`` = β₁ · mean over the batch of ‖v/‖v‖ − (x − x₀)/‖x − x₀‖‖², x the
  rolled-out state: the prediction should point from the state it got back to the clean sample.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stune.features import TrainingFeature
from stune.step import AuxLoss, Prediction, StepInputs
from stune_rollout.options import TRAIN_TIMESTEPS, RolloutOptions, check_options

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions
    from stune.family import ModelFamily
    from stune.state import TrainState
    from stune.step import Predictor

log = logging.getLogger("stune.rollout")


@dataclass
class _Tally:
    """What the micro-steps of one optimizer step did (logged, then reset)."""

    probability: float = 0.0
    samples: int = 0
    rolled: int = 0
    offsets: int = 0
    seconds: float = 0.0
    forwards: int = 0


@dataclass
class _Rolled:
    """What ReflexFlow needs after the training forward."""

    rolled: torch.Tensor  # (B,) bool
    clean: torch.Tensor | None  # (B, …) fp32 prediction at the interpolated state (zeros where not rolled)


class ScheduledSampling(TrainingFeature[RolloutOptions]):
    name = "rollout"
    description = "Scheduled sampling: part of each batch trains on states the model rolled out itself (batched)."

    @classmethod
    def enabled(cls, config: CoreOptions) -> bool:
        return int(getattr(config, "scheduled_sampling_max_step_offset", 0)) > 0

    def __init__(self, config: CoreOptions, family: ModelFamily) -> None:
        super().__init__(config, family)
        options = self.options
        # Every stune family is a flow-matching model, for which SimpleTuner turns ReflexFlow on by default.
        self.reflexflow = options.scheduled_sampling_reflexflow is not False
        self.alpha = options.scheduled_sampling_reflexflow_alpha
        self.beta1 = options.scheduled_sampling_reflexflow_beta1
        self.beta2 = options.scheduled_sampling_reflexflow_beta2
        #: the rollout length of every sample in the latest micro-batch (0: trained as drawn)
        self.last_offsets: torch.Tensor | None = None
        self.samples_rolled = 0  # over the whole run (checkpointed)
        self._tally = _Tally()
        self._pending: _Rolled | None = None

    def check(self) -> None:
        check_options(self.options)
        o = self.options
        if o.scheduled_sampling_ramp_steps:
            never = o.scheduled_sampling_prob_start == 0 and o.scheduled_sampling_prob_end == 0
        else:
            never = o.scheduled_sampling_probability == 0
        if never:
            log.warning(
                "scheduled sampling is on (max_step_offset %d) but its probability is 0: no sample will be rolled "
                "out; set scheduled_sampling_probability or the ramp's prob_start/prob_end.",
                o.scheduled_sampling_max_step_offset,
            )
        solver = {"scheduled_sampling_sampler", "scheduled_sampling_order"} & o.model_fields_set
        if solver and (o.scheduled_sampling_sampler != "euler" or "scheduled_sampling_order" in solver):
            log.warning(
                "flow-matching rollouts take Euler steps (as in SimpleTuner); scheduled_sampling_sampler=%s and "
                "scheduled_sampling_order=%d apply to ε/v-prediction models only and change nothing here.",
                o.scheduled_sampling_sampler,
                o.scheduled_sampling_order,
            )

    # -- the plan ----------------------------------------------------------------------------------
    def probability(self, step: int) -> float:
        """The rollout probability at optimizer step ``step`` (0-based): fixed, or on the ramp."""
        o = self.options
        if o.scheduled_sampling_ramp_steps <= 0:
            return o.scheduled_sampling_probability
        progress = min(1.0, max(0.0, (step - o.scheduled_sampling_start_step) / o.scheduled_sampling_ramp_steps))
        if o.scheduled_sampling_ramp_shape == "cosine":
            progress = 0.5 - 0.5 * math.cos(math.pi * progress)
        start, end = o.scheduled_sampling_prob_start, o.scheduled_sampling_prob_end
        return start + (end - start) * progress

    def plan(self, sigmas: torch.Tensor, probability: float) -> torch.Tensor:
        """Euler steps per sample (0: not rolled out), drawn from the feature's own generator. The same
        numbers are drawn whatever the probability, so the stream does not depend on the schedule."""
        import torch

        o, generator = self.options, self.generator
        size, top, device = sigmas.shape[0], o.scheduled_sampling_max_step_offset, generator.device
        applied = torch.rand(size, generator=generator, device=device) < probability
        if o.scheduled_sampling_strategy == "uniform":
            offsets = torch.randint(0, top + 1, (size,), generator=generator, device=device)
        else:
            u = torch.rand(size, generator=generator, device=device)
            share = u.square() if o.scheduled_sampling_strategy == "biased_early" else 1 - u.square()
            offsets = torch.round(share * top).long()
        # The source is at most pure noise: near σ = 1 fewer steps fit (SimpleTuner clamps the same way).
        room = torch.floor((1 - sigmas.float()) * TRAIN_TIMESTEPS + 1e-3).long().to(device)
        return torch.minimum(offsets * applied, room).to(sigmas.device)

    # -- the training step -------------------------------------------------------------------------
    def prepare_inputs(self, inputs: StepInputs, predictor: Predictor, state: TrainState) -> StepInputs:
        import torch

        self._pending = None
        probability = self.probability(state.global_step)
        offsets = self.plan(inputs.sigmas, probability)
        self.last_offsets = offsets
        tally = self._tally
        tally.probability = probability
        tally.samples += inputs.size
        rolled = offsets > 0
        count = int(rolled.sum())
        if count == 0:
            return inputs
        reflexflow = self.reflexflow and not inputs.is_regularisation  # a prior's target is not ε − x₀
        started, calls = time.perf_counter(), predictor.calls
        noisy, clean = self._roll_out(inputs, predictor, offsets, want_clean=reflexflow and self.alpha != 0)
        if noisy.device.type == "cuda":
            torch.cuda.synchronize(noisy.device)  # count the forwards' time, not just their launch
        tally.seconds += time.perf_counter() - started
        tally.forwards += predictor.calls - calls
        tally.rolled += count
        tally.offsets += int(offsets.sum())
        self.samples_rolled += count
        if reflexflow:
            self._pending = _Rolled(rolled, clean)
        return inputs.replace(noisy_latents=noisy)

    def _roll_out(
        self, inputs: StepInputs, predictor: Predictor, offsets: torch.Tensor, want_clean: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rolled-out states of the whole batch (unchanged where the offset is 0) and, if asked,
        the prediction at the interpolated state of the rolled-out samples (zeros elsewhere)."""
        import torch

        from stune.flow import noisy_inputs

        steps, order = torch.sort(offsets, descending=True, stable=True)
        count = int((steps > 0).sum())
        steps, order = steps[:count], order[:count]
        lengths = steps.tolist()  # longest first: the samples still stepping are always a prefix
        rows = select_rows(inputs, order, self.generator)
        target = rows.sigmas.float()

        def sigma_after(j: int) -> torch.Tensor:
            return (target + (steps - j) / TRAIN_TIMESTEPS).clamp(max=1.0)

        x = noisy_inputs(rows.latents.float(), rows.noise.float(), sigma_after(0))
        dtype = inputs.noisy_latents.dtype
        clean = None
        model = predictor.unwrapped
        was_training = model.training
        model.eval()  # no dropout: the states the model reaches at inference
        try:
            for j in range(lengths[0]):
                active = sum(1 for length in lengths if length > j)
                sigma, after = sigma_after(j)[:active], sigma_after(j + 1)[:active]
                step = _prefix(rows, active).replace(noisy_latents=x[:active].to(dtype), sigmas=sigma)
                if j == 0 and want_clean:
                    # ReflexFlow's clean prediction (the interpolated state at the target σ) rides along.
                    step = _stack(step, rows)
                velocity = predictor(step).velocity.float()
                if j == 0 and want_clean:
                    velocity, clean = velocity[:active], velocity[active:]
                x[:active] += (after - sigma).view(-1, *[1] * (x.ndim - 1)) * velocity
        finally:
            model.train(was_training)
        noisy = inputs.noisy_latents.clone()
        noisy[order] = x.to(dtype)
        full_clean = None
        if clean is not None:
            full_clean = torch.zeros_like(inputs.latents, dtype=torch.float32)
            full_clean[order] = clean
        return noisy, full_clean

    def after_forward(self, inputs: StepInputs, prediction: Prediction, state: TrainState) -> Prediction:
        pending, self._pending = self._pending, None
        if pending is None:
            return prediction
        fc, adr = reflexflow_terms(
            velocity=prediction.velocity,
            target=inputs.target,
            noisy=inputs.noisy_latents,
            latents=inputs.latents,
            clean=pending.clean,
            rolled=pending.rolled,
            loss_weight=inputs.loss_weight,
            alpha=self.alpha,
            beta2=self.beta2,
        )
        aux = dict(prediction.aux_losses)
        if self.alpha != 0 or self.beta2 != 1:
            aux["reflexflow_fc"] = AuxLoss(fc, 1.0)
        if self.beta1 != 0:
            aux["reflexflow_adr"] = AuxLoss(adr, self.beta1)
        return dataclasses.replace(prediction, aux_losses=aux)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def step_metrics(self) -> dict[str, float]:
        tally, self._tally = self._tally, _Tally()
        return {
            "rollout/probability": tally.probability,
            "rollout/fraction": tally.rolled / tally.samples if tally.samples else 0.0,
            "rollout/mean_offset": tally.offsets / tally.rolled if tally.rolled else 0.0,
            "rollout/seconds": tally.seconds,
            "rollout/forwards": float(tally.forwards),
            "rollout/samples_rolled": float(self.samples_rolled),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"samples_rolled": self.samples_rolled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_rolled = int(state.get("samples_rolled", 0))


def reflexflow_terms(
    *,
    velocity: torch.Tensor,
    target: torch.Tensor,
    noisy: torch.Tensor,
    latents: torch.Tensor,
    clean: torch.Tensor | None,
    rolled: torch.Tensor,
    loss_weight: torch.Tensor | None,
    alpha: float,
    beta2: float,
    biased: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReflexFlow's two terms (before β₁), only on the ``rolled`` samples; ``biased`` defaults to the
    prediction itself, detached.

    ``fc`` = mean(m·(β₂·w − 1)·(v − target)²) with w = 1 + α·e/‖e‖₁ per sample, e = clean − biased:
    added to the plain loss mean(m·(v − target)²) it makes SimpleTuner's re-weighted loss.
    ``adr`` = mean over the batch of ‖v/‖v‖ − (noisy − latents)/‖noisy − latents‖‖².
    """
    import torch
    from torch.nn import functional as F

    v = velocity.float()
    shape = (-1,) + (1,) * (v.ndim - 1)
    mask = rolled.view(shape)
    if clean is None or alpha == 0:
        weight = torch.ones_like(v)
    else:
        exposure = torch.where(mask, clean.float() - (v.detach() if biased is None else biased.float()), 0.0)
        norm = exposure.abs().sum(dim=tuple(range(1, v.ndim)), keepdim=True).clamp_min(1e-6)
        weight = 1 + alpha * exposure / norm
    extra = torch.where(mask, beta2 * weight - 1, 0.0)
    squared = (v - target.float()).square()
    if loss_weight is not None:
        squared = squared * loss_weight
    fc = (extra * squared).mean()
    drift = (noisy.float() - latents.float()).flatten(1)
    adr = (F.normalize(v.flatten(1), dim=1, eps=1e-6) - F.normalize(drift, dim=1, eps=1e-6)).square().sum(dim=1)
    return fc, (adr * rolled.float()).mean()


# -- per-sample rows of the step's inputs ------------------------------------------------------------------


def _take(value: Any, rows: Any, size: int) -> Any:
    """The ``rows`` (an index tensor or a slice) of every per-sample entry (first dimension ``size``)
    of a tensor, list or dict; anything else is shared by the whole batch and kept."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != size:
            return value
        return value[rows] if isinstance(rows, slice) else value.index_select(0, rows.to(value.device))
    if isinstance(value, dict):
        return {key: _take(item, rows, size) for key, item in value.items()}
    if isinstance(value, list) and len(value) == size:
        picked = range(size)[rows] if isinstance(rows, slice) else rows.tolist()
        return [value[i] for i in picked]
    return value


def select_rows(inputs: StepInputs, rows: Any, generator: torch.Generator) -> StepInputs:
    """The inputs of some samples; draws inside the family's forward (e.g. random guidance) come from
    the feature's generator, so rollouts leave the run's noise stream alone."""
    size = inputs.size
    return StepInputs(
        latents=_take(inputs.latents, rows, size),
        noise=_take(inputs.noise, rows, size),
        sigmas=_take(inputs.sigmas, rows, size),
        noisy_latents=_take(inputs.noisy_latents, rows, size),
        target=_take(inputs.target, rows, size),
        embeds=_take(inputs.embeds, rows, size),
        generator=generator,
        loss_weight=_take(inputs.loss_weight, rows, size),
        is_regularisation=inputs.is_regularisation,
        conditioning=_take(inputs.conditioning, rows, size),
        batch=_take(inputs.batch, rows, size),
    )


def _prefix(rows: StepInputs, count: int) -> StepInputs:
    return rows if count == rows.size else select_rows(rows, slice(0, count), rows.generator)


def _stack(step: StepInputs, rows: StepInputs) -> StepInputs:
    """``step`` followed by ``rows`` at their own (interpolated) states and σ: one forward for both."""
    import torch

    both = torch.cat([torch.arange(step.size), torch.arange(rows.size)])
    stacked = select_rows(rows, both, rows.generator)
    return stacked.replace(
        noisy_latents=torch.cat([step.noisy_latents, rows.noisy_latents]),
        sigmas=torch.cat([step.sigmas, rows.sigmas]),
    )
