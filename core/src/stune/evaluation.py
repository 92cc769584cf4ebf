"""Evaluation loss: the flow-matching loss on held-out images, comparable from step to step.

The training loss jumps from step to step because every step draws new images, noise and σ.
The eval loss removes all three sources of variation (after spacepxl's "demystifying SD
fine-tuning", as SimpleTuner's ``Evaluation``): the same ``num_eval_images`` images of the
``dataset_type: eval`` datasets (never trained on), at each of ``eval_timesteps`` σ values of
the scheduler's inference schedule (with the resolution-dependent ``mu`` when the scheduler
shifts dynamically), with noise drawn from a generator seeded afresh for every evaluation. Two
evaluations of the same weights therefore give the same number, and a change means the weights
changed. The latent is the VAE distribution's mean (no sampling noise either).

It runs through the same :class:`stune.step.FlowStep` and :class:`stune.step.Predictor` as
training, without gradient (so no training feature acts), with the adapter active and the
transformer in eval mode (no dropout), and leaves the global random state untouched, so training
goes on exactly as without it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stune.data.loader import load_batch
from stune.errors import UserError
from stune.flow import resolution_shift, shift_sigmas
from stune.validation import preserved_rng

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.data.cache import TextEmbedCache
    from stune.data.loader import Sample
    from stune.family import Components
    from stune.step import FlowStep, Predictor

log = logging.getLogger("stune.evaluation")

#: the seed of the eval noise (fixed: the number must not depend on the run's seed either)
EVAL_SEED = 0


@dataclass
class EvalResult:
    step: int
    loss: float
    #: mean loss at the k-th σ of the schedule (k = 0 is the noisiest)
    per_sigma: list[float]
    #: eval dataset id → its own mean loss (empty with eval_dataset_pooling)
    per_dataset: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A metrics.jsonl line: ``eval_loss``, ``eval_loss/sigma_<k>`` and, without
        eval_dataset_pooling, ``eval_loss/<dataset id>``."""
        return {
            "step": self.step,
            "eval_loss": self.loss,
            **{f"eval_loss/sigma_{k:02d}": value for k, value in enumerate(self.per_sigma)},
            **{f"eval_loss/{name}": value for name, value in self.per_dataset.items()},
        }


def select_samples(samples: list[Sample], config: CoreOptions) -> list[Sample]:
    """The eval samples used: those of ``eval_dataset_id`` (or all), the first ``num_eval_images`` by path."""
    if config.eval_dataset_id is not None:
        ids = sorted({s.dataset_id for s in samples})
        chosen = [s for s in samples if s.dataset_id == config.eval_dataset_id]
        if not chosen:
            known = ", ".join(ids) if ids else "none"
            raise UserError(
                f"eval_dataset_id `{config.eval_dataset_id}` names no eval dataset with usable images "
                f"(eval datasets: {known}); fix the id or set dataset_type eval on that dataset."
            )
        samples = chosen
    unique = {(s.dataset_id, str(s.image)): s for s in samples}
    return [unique[key] for key in sorted(unique)][: config.num_eval_images]


def schedule_sigmas(
    scheduler: Any, count: int, seq_len: int, shift_parameters: tuple[int, int, float, float], static_shift: float
) -> torch.Tensor:
    """``count`` σ values, noisiest first, as the scheduler spaces them for ``count`` inference steps.

    A scheduler with ``use_dynamic_shifting`` gets ``mu`` for this image size (as the pipelines
    compute it); a family without a flow scheduler gets an even spacing with the static shift.
    """
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        own = copy.deepcopy(scheduler)  # set_timesteps changes the scheduler; validation uses the original
        config = getattr(own, "config", {}) or {}
        kwargs = {}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = math.log(resolution_shift(seq_len, *shift_parameters))
        own.set_timesteps(count, device="cpu", **kwargs)
        sigmas = getattr(own, "sigmas", None)
        if sigmas is not None and len(sigmas) >= count:
            return torch.as_tensor(sigmas[:count], dtype=torch.float32)  # drop the terminal 0
    return shift_sigmas(torch.linspace(1.0, 1.0 / count, count), static_shift)


class Evaluator:
    """Computes the eval loss of the model as it is now."""

    def __init__(
        self, flow: FlowStep, config: CoreOptions, samples: list[Sample], text_cache: TextEmbedCache, scheduler: Any
    ) -> None:
        self.flow = flow
        self.config = config
        self.samples = samples
        self.text_cache = text_cache
        self.chunk = max(1, config.train_batch_size)  # σ values per forward: a batch known to fit
        self._scheduler = scheduler
        self._sigmas: dict[tuple[int, int], torch.Tensor] = {}

    def sigmas(self, latent_height: int, latent_width: int) -> torch.Tensor:
        key = (latent_height, latent_width)
        if key not in self._sigmas:
            seq_len = self.flow.family.sequence_length(latent_height, latent_width)
            self._sigmas[key] = schedule_sigmas(
                self._scheduler,
                self.config.eval_timesteps,
                seq_len,
                self.flow.shift_parameters,
                self.config.flow_schedule_shift,
            )
            log.info(
                "eval σ for %dx%d latents: %s",
                latent_width,
                latent_height,
                ", ".join(f"{s:.3f}" for s in self._sigmas[key].tolist()),
            )
        return self._sigmas[key]

    def evaluate(self, predictor: Predictor, step: int) -> EvalResult:
        """The eval loss now: no gradient, adapter on, transformer in eval mode."""
        count = self.config.eval_timesteps
        totals = torch.zeros(count, dtype=torch.float64)
        # Seeded afresh each time: the same noise at every evaluation. The noise is drawn on the CPU
        # (the same numbers on any machine); randomness inside ``predict`` uses a device generator.
        generator = torch.Generator("cpu").manual_seed(EVAL_SEED)
        device_generator = torch.Generator(self.flow.device).manual_seed(EVAL_SEED + 1)
        transformer = predictor.unwrapped
        was_training = transformer.training
        transformer.eval()
        datasets: dict[str, list[float]] = {}
        try:
            with preserved_rng(self.flow.device):
                for sample in self.samples:
                    losses = self._sample_losses(predictor, sample, generator, device_generator)
                    totals += losses
                    datasets.setdefault(sample.dataset_id, []).append(float(losses.mean()))
        finally:
            transformer.train(was_training)
        per_sigma = (totals / len(self.samples)).tolist()
        per_dataset = {} if self.config.eval_dataset_pooling else {k: sum(v) / len(v) for k, v in datasets.items()}
        return EvalResult(step=step, loss=sum(per_sigma) / count, per_sigma=per_sigma, per_dataset=per_dataset)

    def _sample_losses(
        self, predictor: Predictor, sample: Sample, generator: torch.Generator, device_generator: torch.Generator
    ) -> torch.Tensor:
        """The loss of one eval image at every σ (a tensor of ``eval_timesteps`` values)."""
        batch = load_batch([sample], sample.captions[:1], self.text_cache)
        device = self.flow.device
        latents = batch["latent_mean"].to(device, torch.float32)  # (1, C, h, w)
        sigmas = self.sigmas(latents.shape[-2], latents.shape[-1])
        noise = torch.randn((len(sigmas), *latents.shape[1:]), generator=generator).to(device)
        losses = []
        for start in range(0, len(sigmas), self.chunk):
            sig = sigmas[start : start + self.chunk].to(device)
            size = len(sig)
            inputs = self.flow.inputs(
                batch,
                device_generator,
                latents=latents.expand(size, *latents.shape[1:]),
                noise=noise[start : start + size],
                sigmas=sig,
            )
            prediction = predictor(inputs)
            error = (prediction.velocity.float() - inputs.target).square()
            if inputs.loss_weight is not None:
                error = error * inputs.loss_weight
            losses.append(error.flatten(1).mean(dim=1).double().cpu())
        return torch.cat(losses)


def make_evaluator(
    flow: FlowStep, components: Components, config: CoreOptions, samples: list[Sample], text_cache: TextEmbedCache
) -> Evaluator | None:
    """An :class:`Evaluator` when the run has eval images and the eval loss is not disabled."""
    if config.eval_loss_disable:
        return None
    if not samples:
        if config.eval_steps_interval or config.eval_epoch_interval:
            log.warning(
                "an eval interval is set but no dataset has dataset_type eval: no eval loss is computed; "
                "add an eval dataset to the dataset list"
            )
        return None
    chosen = select_samples(samples, config)
    log.info("eval loss on %d images at %d σ values", len(chosen), config.eval_timesteps)
    return Evaluator(flow, config, chosen, text_cache, components.scheduler)
