"""Fixtures of the SD3 plugin's tests: one tiny random SD3 pipeline per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD3 pipeline in diffusers layout (10 blocks, dual attention in the first two)."""
    from stune_sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "model")


@pytest.fixture(scope="session")
def sd3_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SD3 demo's model folder (VAE and base transformer trained), built once per session."""
    from stune_sd3.tiny import build_demo

    workdir = tmp_path_factory.mktemp("sd3-demo")
    build_demo(workdir)
    return workdir / "model"
