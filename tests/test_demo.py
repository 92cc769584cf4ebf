"""`st-train demo` (FLUX, the family `make demo` runs): the demo model is built once, with a VAE that
reconstructs held-out shapes and a base transformer pre-trained on shapes; the demo's LoRA teaches
a colour the base never saw, and the final message says where everything is, the report first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stune import demo_assets
from stune.testing import run_cli


@pytest.fixture(scope="session")
def flux_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FLUX demo's model folder, built once per session (VAE and base transformer trained)."""
    from stune_flux.tiny import build_demo

    workdir = tmp_path_factory.mktemp("flux-demo")
    build_demo(workdir)
    return workdir / "model"


def demo_dir(model: Path, tmp_path: Path) -> Path:
    """A fresh demo folder holding a copy of the built model, as a second `make demo` finds it."""
    workdir = tmp_path / "demo"
    shutil.copytree(model, workdir / "model")
    return workdir


def test_demo_model_vae_reconstructs_held_out_shapes(flux_demo_model: Path) -> None:
    from diffusers import AutoencoderKL

    built = json.loads((flux_demo_model / demo_assets.MARKER).read_text())
    vae = AutoencoderKL.from_pretrained(flux_demo_model / "vae")
    psnr = demo_assets.reconstruction_psnr(vae, demo_assets.held_out_pixels())
    print(f"FLUX demo VAE: {built['vae']['psnr_before']:.1f} dB with random weights, {psnr:.1f} dB trained")
    assert psnr >= 20.0
    assert psnr == pytest.approx(built["vae"]["psnr"], abs=0.01)
    assert built["vae"]["psnr_before"] < 12.0
    # the base transformer learned something from the shapes
    assert built["base"]["last_loss"] < built["base"]["first_loss"]


def test_demo_lora_shows_the_concept_and_points_at_the_report(flux_demo_model: Path, tmp_path: Path) -> None:
    workdir = demo_dir(flux_demo_model, tmp_path)
    proc = run_cli(["demo", "--plugin", "flux", "--dir", str(workdir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "output"
    assert "stune demo finished: 200 steps of a flux LoRA" in proc.stdout
    assert not (workdir / "base-training").exists()  # the model in the folder was reused, not built again
    assert f"report:            {out / 'report.html'}" in proc.stdout
    assert (out / "report.html").is_file()
    assert str(out / "pytorch_lora_weights.safetensors") in proc.stdout and "load_lora_weights" in proc.stdout

    assert [p.name.split("-")[0] for p in demo_assets.validation_series(out)] == ["base", "step", "step"]
    distances = demo_assets.concept_distances(out)
    print("FLUX demo: distance to", demo_assets.CONCEPT, "base → steps:", [round(d, 1) for d in distances])
    assert distances[-1] < 0.6 * distances[0]
