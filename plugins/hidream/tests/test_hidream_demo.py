"""The HiDream demo: its model is built once (a VAE that reconstructs held-out shapes, a base transformer
pre-trained on shapes) and its LoRA teaches a colour the base never saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stune import demo_assets
from stune.testing import run_cli


def test_demo_model_vae_reconstructs_held_out_shapes(hidream_demo_model: Path) -> None:
    from diffusers import AutoencoderKL

    built = json.loads((hidream_demo_model / demo_assets.MARKER).read_text())
    vae = AutoencoderKL.from_pretrained(hidream_demo_model / "vae")
    psnr = demo_assets.reconstruction_psnr(vae, demo_assets.held_out_pixels())
    print(f"HiDream demo VAE: {built['vae']['psnr_before']:.1f} dB with random weights, {psnr:.1f} dB trained")
    assert psnr >= 20.0
    assert built["vae"]["psnr_before"] < 12.0
    assert built["base"]["last_loss"] < built["base"]["first_loss"]


def test_demo_lora_shows_the_concept(hidream_demo_model: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    shutil.copytree(hidream_demo_model, workdir / "model")
    proc = run_cli(["demo", "--plugin", "hidream", "--dir", str(workdir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "output"
    assert "stune demo finished: 200 steps of a hidream LoRA" in proc.stdout
    assert f"report:            {out / 'report.html'}" in proc.stdout
    assert not (workdir / "base-training").exists()  # the model in the folder was reused
    distances = demo_assets.concept_distances(out)
    print("HiDream demo: distance to", demo_assets.CONCEPT, "base → steps:", [round(d, 1) for d in distances])
    assert len(distances) == 3
    assert distances[-1] < 0.6 * distances[0]
