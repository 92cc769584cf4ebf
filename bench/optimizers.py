"""Step time and memory per optimizer on the tiny FLUX model (LoRA rank 16), as a table.

Step time: the steady seconds per step of a real `st-train` run (metrics.jsonl); every optimizer
runs in this one process on the same cached data. Memory, on the same LoRA'd transformer with fixed
gradients: `state MB` is what the optimizer keeps between steps; `peak MB` is the most memory
allocated at once while it is built and takes two steps, above what the model and its gradients
already hold (its state plus the step's scratch tensors). On CUDA that is
torch.cuda.max_memory_allocated; on the CPU the allocations torch's profiler records, summed in order.

    python bench/optimizers.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_overhead

from stune import optim
from stune.adapters import create_adapter
from stune.errors import UserError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

CANDIDATES = [
    ("torch-adamw", {}),
    ("adamw_bf16", {"mixed_precision": "bf16"}),
    ("optimi-adamw", {}),
    ("optimi-lion", {}),
    ("optimi-stableadamw", {}),
    ("prodigy", {"learning_rate": "1.0"}),
    ("bnb-adamw8bit", {}),
    ("bnb-lion8bit", {}),
    ("bnb-lion8bit-paged", {}),
]


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    tensors = {}  # by storage: bitsandbytes shares one quantization map between parameters
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                tensors[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(tensors.values()) / 2**20


def peak_megabytes(work: Callable[[], None], device: torch.device) -> float:
    """Most memory allocated at once while ``work`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()  # negative for a free
        peak = max(peak, held)
    return peak / 2**20


def memory(overrides: dict[str, str]) -> tuple[float, float]:
    """(state MB, peak MB) of building the optimizer and taking two steps on the LoRA'd transformer."""
    from diffusers import FluxTransformer2DModel

    session = prepare(host=PluginHost.build(["flux"]), overrides=overrides)
    config, family = session.config, session.family
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    model = FluxTransformer2DModel.from_pretrained(config.pretrained_model_name_or_path, subfolder="transformer")
    model.to(device, dtype)
    params = create_adapter(model, family, config, optim.trainable_dtype(config)).parameters()
    generator = torch.Generator(device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) * 1e-3
    built: list[torch.optim.Optimizer] = []

    def build_and_step() -> None:
        built.append(optim.build_optimizer(params, config))
        for _ in range(2):
            built[0].step()

    peak = peak_megabytes(build_and_step, device)
    return state_megabytes(built[0]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stune-optim-bench-"))
    model = step_overhead.build_model(work / "model", step_overhead.SIZES["tiny (dim 256, 2+4 blocks)"])
    run = step_overhead.write_bench_run(work / "run", model, args.steps)
    os.chdir(run)
    step_overhead.stune_steps(run)  # fill the caches once
    rows = []
    for name, extra in CANDIDATES:
        overrides = {"optimizer": name, "lr_scheduler": "constant", **extra}
        try:
            session = prepare(host=PluginHost.build(["flux"]), overrides=overrides)
        except UserError as exc:  # e.g. bitsandbytes not installed, or one that needs CUDA: report, go on
            rows.append((name, None, None, None, str(exc).split(";")[0]))
            continue
        shutil.rmtree(run / "output", ignore_errors=True)
        train(session)
        records = [json.loads(line) for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]
        step = step_overhead.steady([r["step_seconds"] for r in records])
        state, peak = memory(overrides)
        note = "bf16 weights and base model" if name == "adamw_bf16" else ""
        rows.append((name, step, state, peak, note))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\noptimizers on the tiny FLUX model (dim 256, 2+4 blocks, LoRA rank 16, batch 2, 64 px; {device}; "
        f"{args.steps} steps, torch {torch.__version__})"
    )
    print(f"{'optimizer':<20} {'s/step':>8} {'state MB':>9} {'peak MB':>8}  note")
    for name, step, state, peak, note in rows:
        s = f"{step:8.4f}" if step is not None else f"{'—':>8}"
        m = f"{state:9.2f}" if state is not None else f"{'—':>9}"
        p = f"{peak:8.2f}" if peak is not None else f"{'—':>8}"
        print(f"{name:<20} {s} {m} {p}  {note}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
