"""Steady seconds per training step: the tiny SD3 pipeline next to the tiny FLUX one, same resolution.

Both train the same kind of LoRA (rank 16, no dropout, AdamW, batch 2, fp32, no gradient
checkpointing) through `st-train`'s loop in this one process, on the same generated images,
interleaved run by run, so the numbers are measured side by side. The first steps of every run are
left out (warm-up); the table gives the median of the rest, over all repeats. Needs stune-flux and
stune-sd3 installed.

    python bench/family_step_time.py [--steps 30] [--repeats 2] [--sizes 64,256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, write_run
from stune.train import train

WARMUP = 5
#: (label, family, T5 tokens)
SETUPS = (
    ("FLUX tiny, 77 T5 tokens", "flux", 77),
    ("SD3 tiny, 77 T5 tokens", "sd3", 77),
    ("SD3 tiny, 154 T5 tokens", "sd3", 154),
)


def build_models(root: Path) -> dict[str, Path]:
    from stune_flux.tiny import build_tiny_flux
    from stune_sd3.tiny import build_tiny_sd3

    return {"flux": build_tiny_flux(root / "flux"), "sd3": build_tiny_sd3(root / "sd3")}


def parameters(model: Path, family: str) -> int:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    return sum(p.numel() for p in cls.from_pretrained(model / "transformer").parameters())


def run_once(folder: Path, model: Path, family: str, tokens: int, size: int, steps: int) -> list[float]:
    make_images(folder / "data", 8, size=(size, size))
    config: dict[str, Any] = {
        "model_family": family,
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": steps,
        "train_batch_size": 2,
        "lora_rank": 16,
        "lora_dropout": 0.0,
        "learning_rate": "1e-4",
        "lr_scheduler": "constant",
        "optimizer": "adamw",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": tokens,
        "resolution": size,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_disable": "true",
        "disable_benchmark": "true",
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    here = Path.cwd()
    os.chdir(folder)
    try:
        train(prepare(host=PluginHost.build([family])))
    finally:
        os.chdir(here)
    records = [json.loads(line) for line in (folder / "output" / "metrics.jsonl").read_text().splitlines()]
    return [r["step_seconds"] for r in records[WARMUP:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="64,256")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root / "models")
        counts = {family: parameters(path, family) for family, path in models.items()}
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeats):
            for size in sizes:
                for label, family, tokens in SETUPS:
                    folder = root / f"{family}-{tokens}-{size}-{repeat}"
                    times.setdefault((label, size), []).extend(
                        run_once(folder, models[family], family, tokens, size, args.steps)
                    )
    print(
        f"\nsteady step time, batch 2, LoRA rank 16, fp32, median of steps {WARMUP + 1}..{args.steps} × {args.repeats}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| setup | transformer params | resolution | image tokens | text tokens | s/step | vs FLUX |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        flux = statistics.median(times[(SETUPS[0][0], size)])
        for label, family, tokens in SETUPS:
            median = statistics.median(times[(label, size)])
            text = tokens if family == "flux" else 77 + tokens
            image = (size // 16) ** 2
            print(
                f"| {label} | {counts[family] / 1e6:.2f} M | {size}×{size} | {image} | {text} | {median:.4f} | "
                f"{median / flux:.2f}× |"
            )


if __name__ == "__main__":
    main()
