"""Steady-state seconds per step: st-train's loop against a hand-written minimal PyTorch loop.

Both train the same LoRA (same targets, rank, optimizer, clipping) on the same tiny FLUX model and
the same cached latents and text embeddings, in this one process, interleaved, so the ratio is
measured side by side. Also times start-up of the real command (`--help`, and launch to the end
of step 1 with cold and warm caches).

    python bench/step_overhead.py [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, offline_env, write_run
from stune.train import train

SIZES = {
    # name: transformer shape overrides of stune_flux.tiny.build_tiny_flux
    "micro (the tests' tiny model, dim 32)": {},
    "tiny (dim 256, 2+4 blocks)": {
        "attention_head_dim": 64,
        "num_attention_heads": 4,
        "num_layers": 2,
        "num_single_layers": 4,
    },
}
BATCH = 2
RANK = 16


def build_model(path: Path, shape: dict[str, int]) -> Path:
    from diffusers import FluxTransformer2DModel

    from stune_flux.tiny import build_tiny_flux

    build_tiny_flux(path)
    if shape:
        config = dict(FluxTransformer2DModel.load_config(path / "transformer"))
        config.update(shape)
        head = shape["attention_head_dim"]
        config["axes_dims_rope"] = (head // 4, 3 * head // 8, 3 * head // 8)
        model = FluxTransformer2DModel.from_config(config)
        shutil.rmtree(path / "transformer")
        model.save_pretrained(path / "transformer")
    return path


def write_bench_run(folder: Path, model: Path, steps: int) -> Path:
    make_images(folder / "data", 8, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": steps,
        "train_batch_size": BATCH,
        "lora_rank": RANK,
        "lora_dropout": 0.0,  # the hand loop has none either
        "learning_rate": "1e-4",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 32,
        "resolution": 64,
        "caption_strategy": "textfile",
        "caption_dropout_probability": 0.0,
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "resume_from_checkpoint": "none",
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def stune_steps(run: Path) -> list[float]:
    os.chdir(run)
    shutil.rmtree(run / "output", ignore_errors=True)
    train(prepare(host=PluginHost.build(["flux"])))
    records = [json.loads(line) for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]
    return [r["step_seconds"] for r in records]


def hand_steps(run: Path, model: Path, steps: int) -> list[float]:
    """What a person writes by hand: load the cached tensors once, loop, no framework."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    from stune_flux.family import FluxFamily

    latents = [load_file(p) for p in sorted((run / "cache" / "vae").glob("*.safetensors"))]
    texts = [load_file(p) for p in sorted((run / "cache" / "text").glob("*.safetensors"))]
    texts = [t for t in texts if t["attention_mask"].sum() > 2][: len(latents)]  # skip the empty caption
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True, target_modules=list(FluxFamily.lora_presets["all"]))
    )
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        idx = [(step * BATCH + i) % len(latents) for i in range(BATCH)]
        mean = torch.stack([latents[i]["mean"] for i in idx])
        std = torch.stack([latents[i]["std"] for i in idx])
        x0 = mean + std * torch.randn(mean.shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(BATCH, generator=gen))
        sigma = 3 * sigma / (1 + 2 * sigma)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text = torch.stack([texts[i % len(texts)]["prompt_embeds"] for i in idx])
        pooled = torch.stack([texts[i % len(texts)]["pooled_prompt_embeds"] for i in idx])
        out = transformer(
            hidden_states=packed,
            timestep=sigma,
            guidance=torch.full((b,), 1.0),
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
        loss = (pred - (noise - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a loop that logs its loss syncs once per step too
        times.append(time.perf_counter() - start)
    return times


def steady(times: list[float]) -> float:
    return statistics.median(times[len(times) // 5 :])  # drop warm-up steps


def timed_command(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stune.cli", *args], cwd=cwd, env=offline_env(), capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.decode()[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="stune-bench-"))
    rows = []
    for name, shape in SIZES.items():
        model = build_model(work / f"model-{len(rows)}", shape)
        run = write_bench_run(work / f"run-{len(rows)}", model, args.steps)
        ours, hand = [], []
        stune_steps(run)  # fills the caches; not timed
        for _ in range(args.repeats):
            ours.append(steady(stune_steps(run)))
            hand.append(steady(hand_steps(run, model, args.steps)))
        s, h = statistics.median(ours), statistics.median(hand)
        rows.append((name, s, h, s / h))

    print(
        f"\nsteady-state seconds per step (batch {BATCH}, 64 px, LoRA rank {RANK}, CPU, {args.steps} steps × {args.repeats})"
    )
    print(f"{'model':<30} {'st-train':>10} {'hand loop':>10} {'ratio':>7}")
    for name, s, h, r in rows:
        print(f"{name:<30} {s:>10.4f} {h:>10.4f} {r:>7.3f}")

    run = work / "run-0"
    help_s = timed_command(["--help"], run)
    shutil.rmtree(run / "cache")
    cold = timed_command(["--plugin", "flux", "--max_train_steps=1"], run)
    warm = timed_command(["--plugin", "flux", "--max_train_steps=1"], run)
    print("\nstart-up of the command (tiny FLUX, wall seconds)")
    print(f"{'st-train --help':<40} {help_s:>8.2f}")
    print(f"{'launch to end of step 1, cold caches':<40} {cold:>8.2f}")
    print(f"{'launch to end of step 1, warm caches':<40} {warm:>8.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
