"""HiDream numbers: bytes per cached caption at the real model's sizes, and the tiny model's step time.

    python bench/hidream.py [--steps 12]

1. Cached bytes per caption for a typical 20-word caption. The real sizes are HiDream-I1's (T5-XXL
   and Llama-3.1-8B widths 4096, 32 Llama layers read through ``llama_layers``, pooled CLIP-L ⊕
   CLIP-G 2048, 128-token sequences). Token counts are an estimate: the real tokenizers are not on
   this machine; English runs ~1.3 Llama-3 tokens and ~1.4 T5 tokens per word (+ BOS / EOS). The
   tiny model's own cache files check the formula (entry bytes = tensor bytes + a small header).
2. Tiny-model step time (64×64, batch 2, LoRA rank 16 on attention), median over the steps after
   the first two, with and without the load-balancing loss, square and non-square.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

WIDTH, LAYERS, TOKENS, POOLED = 4096, 32, 128, 2048
BF16 = 2


def real_sizes(words: int = 20) -> list[tuple[str, int]]:
    llama_tokens = round(words * 1.3) + 1  # + <|begin_of_text|>
    t5_tokens = round(words * 1.4) + 1  # + </s>
    pooled = POOLED * BF16
    trimmed = LAYERS * llama_tokens * WIDTH * BF16 + t5_tokens * WIDTH * BF16 + pooled + LAYERS * 8
    padded = LAYERS * TOKENS * WIDTH * BF16 + TOKENS * WIDTH * BF16 + pooled
    return [
        (f"stune, trimmed ({llama_tokens} Llama + {t5_tokens} T5 tokens, 32 layers, bf16)", trimmed),
        ("stune, hidream_text_padding=pipeline (128 + 128 tokens, 32 layers, bf16)", padded),
        ("SimpleTuner (128 tokens, every Llama layer, bf16)", padded),
    ]


def tiny_step_times(work: Path, steps: int) -> list[tuple[str, float, float]]:
    from stune.plugins import PluginHost
    from stune.session import prepare
    from stune.testing import make_images, write_run
    from stune.train import train
    from stune_hidream.tiny import build_tiny_hidream

    model = build_tiny_hidream(work / "model")
    rows = []
    for label, size, balance in [
        ("64×64, LoRA", (64, 64), False),
        ("64×64, LoRA + load balancing", (64, 64), True),
        ("128×64 (padded to max_seq), LoRA + load balancing", (128, 64), True),
    ]:
        run = work / label.replace(" ", "_").replace("×", "x").replace(",", "").replace("+", "").replace("(", "")
        run = Path(str(run).replace(")", ""))
        make_images(run / "data", 8, size=size)
        config = {
            "model_family": "hidream",
            "pretrained_model_name_or_path": str(model),
            "output_dir": "output",
            "max_train_steps": steps,
            "train_batch_size": 2,
            "lora_rank": 16,
            "mixed_precision": "no",
            "gradient_checkpointing": "false",
            "tokenizer_max_length": 32,
            "resolution": 64,
            "resolution_type": "pixel",
            "minimum_image_size": 0,
            "caption_strategy": "textfile",
            "seed": 0,
            "checkpoint_step_interval": 0,
            "validation_step_interval": 0,
            "disable_benchmark": True,
            "hidream_use_load_balancing_loss": balance,
        }
        datasets = [
            {"id": "pics", "instance_data_dir": "data"},
            {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
        ]
        write_run(run, config, datasets)
        os.chdir(run)
        train(prepare(host=PluginHost.build(["hidream"])))
        seconds = [
            json.loads(line)["step_seconds"] for line in (run / "output" / "metrics.jsonl").read_text().splitlines()
        ]
        steady = seconds[2:]
        rows.append((label, statistics.median(steady), min(steady)))
    cache = sorted((work / "model").parent.rglob("cache/text/*.safetensors"))
    if cache:
        from safetensors.torch import load_file

        entry = cache[0]
        tensors = sum(t.numel() * t.element_size() for t in load_file(str(entry)).values())
        print(f"tiny cache entry check: {entry.stat().st_size} bytes on disk for {tensors} tensor bytes\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print("Cached bytes per caption, HiDream-I1 sizes, a 20-word caption")
    print(f"{'layout':<78} {'bytes':>12} {'MB':>8}")
    for label, size in real_sizes():
        print(f"{label:<78} {size:>12,} {size / 1e6:>8.2f}")
    print()
    work = Path(tempfile.mkdtemp(prefix="stune-hidream-bench-"))
    try:
        rows = tiny_step_times(work, args.steps)
    finally:
        os.chdir(Path(__file__).parent)
        shutil.rmtree(work, ignore_errors=True)
    print(f"Tiny HiDream step time (batch 2, {args.steps} steps, torch {_torch()} on {os.cpu_count()} CPUs)")
    print(f"{'run':<55} {'median s':>9} {'min s':>7}")
    for label, median, low in rows:
        print(f"{label:<55} {median:>9.3f} {low:>7.3f}")


def _torch() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
