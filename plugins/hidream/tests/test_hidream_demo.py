"""The HiDream demo: its model is built once (a VAE that reconstructs held-out shapes, a base transformer
pre-trained on shapes) and its LoRA teaches a colour the base never saw."""

from __future__ import annotations

from pathlib import Path

from stune.testing import check_demo_lora, check_demo_vae


def test_demo_model_vae_reconstructs_held_out_shapes(hidream_demo_model: Path) -> None:
    check_demo_vae(hidream_demo_model, "HiDream")


def test_demo_lora_shows_the_concept(hidream_demo_model: Path, tmp_path: Path) -> None:
    check_demo_lora(hidream_demo_model, "hidream", tmp_path, "HiDream")
