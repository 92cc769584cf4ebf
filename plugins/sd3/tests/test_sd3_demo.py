"""The SD3 demo: its model is built once (a VAE that reconstructs held-out shapes, a base transformer
pre-trained on shapes) and its LoRA teaches a colour the base never saw."""

from __future__ import annotations

from pathlib import Path

from stune.testing import check_demo_lora, check_demo_vae


def test_demo_model_vae_reconstructs_held_out_shapes(sd3_demo_model: Path) -> None:
    check_demo_vae(sd3_demo_model, "SD3")


def test_demo_lora_shows_the_concept(sd3_demo_model: Path, tmp_path: Path) -> None:
    check_demo_lora(sd3_demo_model, "sd3", tmp_path, "SD3")
