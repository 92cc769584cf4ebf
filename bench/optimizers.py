"""Step time and memory per optimizer on the tiny FLUX model (LoRA rank 16), as a table.

Step time: the steady seconds per step of a real `st-train` run (metrics.jsonl), all optimizers
run in this one process on the same cached data. Memory: the optimizer's state after a step (the
part that differs between optimizers) and, on CUDA, the peak allocated memory of that step.

    python bench/optimizers.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_overhead

from stune import optim
from stune.adapters import create_adapter
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
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total / 2**20


def one_step_memory(run: Path, overrides: dict[str, str]) -> tuple[float, float | None]:
    """Optimizer state and (CUDA) peak memory of one step on the LoRA'd transformer."""
    from diffusers import FluxTransformer2DModel

    session = prepare(host=PluginHost.build(["flux"]), overrides=overrides)
    config, family = session.config, session.family
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    model = FluxTransformer2DModel.from_pretrained(config.pretrained_model_name_or_path, subfolder="transformer")
    model.to(device, dtype)
    adapter = create_adapter(model, family, config, optim.trainable_dtype(config))
    params = adapter.parameters()
    opt = optim.build_optimizer(params, config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return state_megabytes(opt), peak


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
        except Exception as exc:  # e.g. bitsandbytes without CUDA: report, go on
            rows.append((name, None, None, None, str(exc).split(";")[0]))
            continue
        shutil.rmtree(run / "output", ignore_errors=True)
        train(session)
        records = [json.loads(line) for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]
        step = step_overhead.steady([r["step_seconds"] for r in records])
        state, peak = one_step_memory(run, overrides)
        rows.append((name, step, state, peak, ""))

    device = "CUDA" if torch.cuda.is_available() else "CPU"
    print(f"\noptimizers on the tiny FLUX model (dim 256, LoRA rank 16, batch 2, 64 px, {device}, {args.steps} steps)")
    print(f"{'optimizer':<22} {'s/step':>8} {'state MB':>9} {'peak MB':>8}  note")
    for name, step, state, peak, note in rows:
        s = f"{step:8.4f}" if step is not None else f"{'—':>8}"
        m = f"{state:9.2f}" if state is not None else f"{'—':>9}"
        p = f"{peak:8.1f}" if peak is not None else f"{'—':>8}"
        print(f"{name:<22} {s} {m} {p}  {note}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
