"""Seconds per training step with scheduled sampling: off, batched (stune-rollout), and rolled out one
sample at a time with batch-1 forwards (SimpleTuner's way, written here as the reference).

Batch 4, max offset 4, probability 1, uniform offsets, LoRA on a tiny FLUX model. All variants run
in this one process on the same model, interleaved step by step (the order rotates every round),
and each round gives every variant the same batch, noise, σ and offsets, so they do the same work
but for how they roll out. ReflexFlow is off in the comparison (it is the same arithmetic in both);
one extra row shows the batched rollout with ReflexFlow on, whose clean prediction rides along with
the first rollout forward.

    python bench/rollout.py [--rounds 10] [--resolution 128] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from stune.data.loader import BatchLoader
from stune.features import FeatureContext
from stune.flow import noisy_inputs
from stune.plugins import PluginHost
from stune.run import setup
from stune.session import prepare
from stune.step import Predictor, StepInputs
from stune.testing import make_images, write_run
from stune.train import batch_stream, build_model, load_data, micro_step
from stune_rollout.feature import ScheduledSampling, select_rows
from stune_rollout.options import TRAIN_TIMESTEPS

BATCH = 4
MAX_OFFSET = 4
WARMUP = 3
SIZES = {
    # name: transformer shape overrides of stune_flux.tiny.build_tiny_flux
    "micro (dim 32, 1+2 blocks)": {},
    "tiny (dim 256, 2+4 blocks)": {
        "attention_head_dim": 64,
        "num_attention_heads": 4,
        "num_layers": 2,
        "num_single_layers": 4,
    },
}


class OneAtATime(ScheduledSampling):
    """The reference, SimpleTuner's way: every sample rolled out alone, one batch-1 forward per Euler
    step (Σk forwards); with ReflexFlow also a batch-1 forward at the interpolated state ("clean")
    and one at the rolled-out state ("biased") per rolled-out sample, as SimpleTuner runs them."""

    def _roll_out(
        self, inputs: StepInputs, predictor: Predictor, offsets: torch.Tensor, want_clean: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        noisy = inputs.noisy_latents.clone()
        clean = torch.zeros_like(inputs.latents, dtype=torch.float32) if want_clean else None
        model = predictor.unwrapped
        model.eval()
        try:
            for i, steps in enumerate(offsets.tolist()):
                if not steps:
                    continue
                one = select_rows(inputs, torch.tensor([i]), self.generator)
                if clean is not None:
                    clean[i] = predictor(one).velocity[0].float()
                target = one.sigmas.float()
                start = (target + steps / TRAIN_TIMESTEPS).clamp(max=1)
                x = noisy_inputs(one.latents.float(), one.noise.float(), start)
                for j in range(steps):
                    sigma = (target + (steps - j) / TRAIN_TIMESTEPS).clamp(max=1)
                    after = target + (steps - j - 1) / TRAIN_TIMESTEPS
                    velocity = predictor(one.replace(noisy_latents=x.to(noisy.dtype), sigmas=sigma)).velocity
                    x = x + (after - sigma) * velocity.float()
                noisy[i] = x[0].to(noisy.dtype)
                if clean is not None:
                    predictor(one.replace(noisy_latents=noisy[i : i + 1]))  # SimpleTuner's separate biased forward
        finally:
            model.train()
        return noisy, clean


def build_model_dir(path: Path, shape: dict[str, int]) -> Path:
    from diffusers import FluxTransformer2DModel

    from stune_flux.tiny import build_tiny_flux

    build_tiny_flux(path)
    if shape:
        config = dict(FluxTransformer2DModel.load_config(path / "transformer"))
        config.update(shape)
        head = shape["attention_head_dim"]
        config["axes_dims_rope"] = (head // 4, 3 * head // 8, 3 * head // 8)
        shutil.rmtree(path / "transformer")
        FluxTransformer2DModel.from_config(config).save_pretrained(path / "transformer")
    return path


def write_bench_run(folder: Path, model: Path, resolution: int) -> Path:
    make_images(folder / "data", 8, size=(resolution, resolution))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 1_000,
        "train_batch_size": BATCH,
        "lora_rank": 16,
        "learning_rate": "1e-5",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 32,
        "resolution": resolution,
        "caption_strategy": "textfile",
        "caption_dropout_probability": 0.0,
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "resume_from_checkpoint": "none",
        "scheduled_sampling_max_step_offset": MAX_OFFSET,
        "scheduled_sampling_probability": 1.0,
        "scheduled_sampling_reflexflow": "false",
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def measure(run_dir: Path, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per variant: median seconds per step, median seconds of it spent rolling out, mean transformer
    forwards per step (the training forward included)."""
    os.chdir(run_dir)
    session = prepare(host=PluginHost.build(["flux", "rollout"]))
    run = setup(session)
    load_data(run)
    build_model(run)
    assert run.plan is not None and run.data is not None and run.predictor is not None
    batched = session.features[0]
    context = batched.context
    assert isinstance(batched, ScheduledSampling) and context is not None

    def bound(feature: ScheduledSampling) -> ScheduledSampling:
        feature.bind(FeatureContext(context.device, context.seed, context.rank, torch.Generator(context.device)))
        return feature

    def with_reflexflow(feature: ScheduledSampling) -> ScheduledSampling:
        feature.reflexflow = True  # the run's config has it off; on is SimpleTuner's (and stune's) default
        return bound(feature)

    variants: dict[str, list[Any]] = {
        "off": [],
        "batched": [batched],
        "one at a time": [bound(OneAtATime(session.config, session.family))],
        "batched, ReflexFlow": [with_reflexflow(ScheduledSampling(session.config, session.family))],
        "one at a time, ReflexFlow": [with_reflexflow(OneAtATime(session.config, session.family))],
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    rolling: dict[str, list[float]] = {name: [] for name in variants}
    forwards: dict[str, list[int]] = {name: [] for name in variants}
    batches = batch_stream(BatchLoader(run.plan, run.data.text_cache), run.state)
    names = list(variants)
    for round_ in range(WARMUP + rounds):
        batch = next(batches)
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            session.features[:] = variants[name]
            for feature in variants[name]:
                feature.generator.manual_seed(round_)  # the same offsets for every variant this round
            run.noise_generator.manual_seed(round_)  # the same x₀, noise and σ
            calls = run.predictor.calls
            started = time.perf_counter()
            loss, _, _ = micro_step(run, batch)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # a loop that logs its loss syncs once per step
            elapsed = time.perf_counter() - started
            rollout = sum(f.step_metrics()["rollout/seconds"] for f in variants[name])
            if round_ >= WARMUP:
                seconds[name].append(elapsed)
                rolling[name].append(rollout)
                forwards[name].append(run.predictor.calls - calls)
    return {
        name: (statistics.median(seconds[name]), statistics.median(rolling[name]), statistics.mean(forwards[name]))
        for name in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (1 on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="stune-bench-rollout-"))
    tables = []
    try:
        for i, (name, shape) in enumerate(SIZES.items()):
            model = build_model_dir(work / f"model-{i}", shape)
            tables.append((name, measure(write_bench_run(work / f"run-{i}", model, args.resolution), args.rounds)))
    finally:
        os.chdir(Path.home())
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nseconds per training step (median of {args.rounds} interleaved rounds; batch {BATCH}, max offset "
        f"{MAX_OFFSET}, probability 1, uniform offsets, {args.resolution} px, LoRA rank 16, "
        f"{torch.get_num_threads()} CPU thread(s))"
    )
    print(f"{'model':<28} {'rollout':<26} {'s/step':>8} {'rolling out':>12} {'forwards':>9} {'vs off':>7}")
    for name, rows in tables:
        off = rows["off"][0]
        for variant, (step, rolling, calls) in rows.items():
            print(f"{name:<28} {variant:<26} {step:>8.4f} {rolling:>12.4f} {calls:>9.2f} {step / off:>6.2f}×")
        for suffix in ("", ", ReflexFlow"):
            (one, one_rolling, _), (batched, batched_rolling, _) = (
                rows[f"one at a time{suffix}"],
                rows[f"batched{suffix}"],
            )
            label = f"one at a time ÷ batched{suffix}"
            print(f"{name:<28} {label:<26} {one / batched:>7.2f}× {one_rolling / batched_rolling:>11.2f}×")


if __name__ == "__main__":
    main()
