"""TREAD: seconds per training step with and without the seed's route, side by side.

For every installed family with a token layout, a transformer big enough for attention to matter
(1024 image tokens per sample at 512 px, 16 blocks, width 256) is trained with `st-train`'s loop on
the same generated images: alternately without routing and with the FLUX seed's route
(`selection_ratio 0.5`, `start_layer_idx 2`, `end_layer_idx -2`). The table gives the median
steady step time of each, the speed-up, and the loss after the same number of steps.

    python bench/tread.py [--steps 12] [--repeats 2] [--size 512]

On a CUDA machine pass `--real` to use FLUX.1's real width and depth (random weights) at 1024 px.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch

from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, write_run
from stune.train import train

ROUTE = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}


def flux_model(path: Path, real: bool) -> Path:
    from diffusers import FluxTransformer2DModel

    from stune_flux.tiny import build_tiny_flux

    build_tiny_flux(path)
    config = dict(FluxTransformer2DModel.load_config(path / "transformer"))
    if real:  # FLUX.1: 19 double + 38 single blocks, width 3072
        config.update(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24)
        config["axes_dims_rope"] = (16, 56, 56)
    else:
        config.update(num_layers=2, num_single_layers=14, attention_head_dim=64, num_attention_heads=4)
        config["axes_dims_rope"] = (16, 24, 24)
    shutil.rmtree(path / "transformer")
    FluxTransformer2DModel.from_config(config).save_pretrained(path / "transformer")
    return path


def sd3_model(path: Path, real: bool) -> Path:
    from diffusers import SD3Transformer2DModel

    from stune_sd3.tiny import build_tiny_sd3

    build_tiny_sd3(path)
    config = dict(SD3Transformer2DModel.load_config(path / "transformer"))
    if real:  # SD3.5 Medium: 24 blocks, width 1536
        config.update(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536)
    else:
        config.update(num_layers=16, attention_head_dim=64, num_attention_heads=4, caption_projection_dim=256)
    shutil.rmtree(path / "transformer")
    SD3Transformer2DModel.from_config(config).save_pretrained(path / "transformer")
    return path


def hidream_model(path: Path, real: bool) -> Path:
    from diffusers import HiDreamImageTransformer2DModel

    from stune_hidream.tiny import build_tiny_hidream

    build_tiny_hidream(path)
    config = dict(HiDreamImageTransformer2DModel.load_config(path / "transformer"))
    layers = sorted(set(config["llama_layers"]))
    if real:  # HiDream-I1: 16 double + 32 single blocks, width 2560
        config.update(num_layers=16, num_single_layers=32, attention_head_dim=128, num_attention_heads=20)
        config["axes_dims_rope"] = (64, 32, 32)
    else:
        config.update(num_layers=2, num_single_layers=14, attention_head_dim=64, num_attention_heads=4)
        config["axes_dims_rope"] = (32, 16, 16)
    blocks = config["num_layers"] + config["num_single_layers"]
    config["llama_layers"] = [layers[i % len(layers)] for i in range(blocks)]  # the tiny Llama's layers, reused
    config["max_resolution"] = (128, 128)
    shutil.rmtree(path / "transformer")
    HiDreamImageTransformer2DModel.from_config(config).save_pretrained(path / "transformer")
    return path


FAMILIES: dict[str, Callable[[Path, bool], Path]] = {"flux": flux_model, "sd3": sd3_model, "hidream": hidream_model}


def run_folder(folder: Path, family: str, model: Path, steps: int, size: int, tread: bool) -> Path:
    if not (folder / "data").is_dir():
        make_images(folder / "data", 4, size=(size, size))
    config: dict[str, Any] = {
        "model_family": family,
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": steps,
        "train_batch_size": 1,
        "learning_rate": "1e-4",
        "lr_scheduler": "constant",
        "lora_rank": 16,
        "lora_dropout": 0.0,
        "mixed_precision": "bf16" if torch.cuda.is_available() else "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 32,
        "resolution": size,
        "caption_strategy": "textfile",
        "caption_dropout_probability": 0.0,
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "resume_from_checkpoint": "none",
    }
    if tread:
        config["tread_config"] = ROUTE
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "../cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "../cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def one_run(folder: Path, family: str) -> tuple[float, float]:
    """(median steady seconds per step, mean loss of the last quarter of the steps)."""
    os.chdir(folder)
    shutil.rmtree(folder / "output", ignore_errors=True)
    train(prepare(host=PluginHost.build([family, "tread"])))
    records = [json.loads(line) for line in (folder / "output" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in records][len(records) // 4 :]  # drop warm-up
    losses = [r["loss"] for r in records][-max(1, len(records) // 4) :]
    return statistics.median(seconds), statistics.fmean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--real", action="store_true", help="FLUX.1's real size (a CUDA machine)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stune-tread-bench-"))
    rows = []
    for family, build in FAMILIES.items():
        if importlib.util.find_spec(f"stune_{family}") is None:
            continue
        model = build(work / f"{family}-model", args.real)
        plain = run_folder(work / f"{family}-plain", family, model, args.steps, args.size, tread=False)
        routed = run_folder(work / f"{family}-tread", family, model, args.steps, args.size, tread=True)
        shutil.copytree(plain / "data", routed / "data", dirs_exist_ok=True)
        one_run(plain, family)  # fills the shared caches; not timed
        times: dict[str, list[float]] = {"plain": [], "tread": []}
        losses: dict[str, list[float]] = {"plain": [], "tread": []}
        for _ in range(args.repeats):  # interleaved
            for name, folder in (("plain", plain), ("tread", routed)):
                seconds, loss = one_run(folder, family)
                times[name].append(seconds)
                losses[name].append(loss)
        t_plain, t_tread = statistics.median(times["plain"]), statistics.median(times["tread"])
        tokens = (args.size // 16) ** 2
        rows.append((family, tokens, t_plain, t_tread, t_plain / t_tread, losses["plain"][-1], losses["tread"][-1]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nTREAD, route 0.5 over blocks 2..-2 ({device}; {args.size} px, batch 1, LoRA rank 16, "
        f"{args.steps} steps × {args.repeats}, interleaved)"
    )
    print(
        f"{'family':<8} {'tokens':>6} {'plain s/step':>13} {'TREAD s/step':>13} {'speed-up':>9} {'loss plain':>11} {'loss TREAD':>11}"
    )
    for family, tokens, a, b, r, lp, lt in rows:
        print(f"{family:<8} {tokens:>6} {a:>13.3f} {b:>13.3f} {r:>8.2f}× {lp:>11.4f} {lt:>11.4f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
