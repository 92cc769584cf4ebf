"""Fixtures of the HiDream tests: one tiny random HiDream pipeline per session, run folders, families."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stune.testing import make_images, write_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_SEEDS = Path(__file__).resolve().parents[4] / "shared" / "seeds"
REPO_SEEDS = Path(__file__).resolve().parents[3] / "tests" / "seeds"
SEEDS = Path(__file__).with_name("seeds")


@pytest.fixture(scope="session")
def tiny_hidream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight HiDream-I1 pipeline in diffusers layout, built once per test session."""
    from stune_hidream.tiny import build_tiny_hidream

    return build_tiny_hidream(tmp_path_factory.mktemp("tiny-hidream") / "model")


def _hidream_run(
    folder: Path, model: Path, images: int = 4, wide: int = 0, wide_regularisation: bool = False, **options: Any
) -> Path:
    """A run folder: ``images`` 64×64 pictures (and ``wide`` 128×64 ones, another bucket, optionally
    a regularisation set) with captions."""
    make_images(folder / "data", images, size=(64, 64))
    datasets: list[dict[str, Any]] = [
        {"id": "pics", "type": "local", "instance_data_dir": "data", "cache_dir_vae": "cache/vae/pics"}
    ]
    if wide:
        make_images(folder / "wide", wide, size=(128, 64))
        datasets.append(
            {
                "id": "wide",
                "type": "local",
                "instance_data_dir": "wide",
                "cache_dir_vae": "cache/vae/wide",
                "resolution": 64,
                "resolution_type": "pixel",
                "is_regularisation_data": wide_regularisation,
            }
        )
    datasets.append(
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"}
    )
    config = {
        "model_family": "hidream",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 2,
        "train_batch_size": 2,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "gradient_checkpointing": "true",
        "tokenizer_max_length": 32,
        "resolution": 64,
        "minimum_image_size": 0,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        **options,
    }
    write_run(folder, config, datasets)
    return folder


def _family(**options: Any) -> Any:
    """A configured HiDream family (defaults applied, not checked)."""
    from stune.plugins import PluginHost

    host = PluginHost.build(["hidream"])
    config = host.config_model().model_validate({"model_family": "hidream", **options})
    fam = host.family_class("hidream")(config)
    fam.apply_defaults()
    return fam


@pytest.fixture(scope="session")
def hidream_run() -> Any:
    """``hidream_run(folder, model, images=4, wide=0, **options)`` writes a run folder (see :func:`_hidream_run`)."""
    return _hidream_run


@pytest.fixture(scope="session")
def family() -> Any:
    """``family(**options)``: a configured HiDream family (defaults applied, not checked)."""
    return _family


@pytest.fixture(scope="session")
def hidream_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HiDream demo's model folder (VAE and base transformer trained), built once per session."""
    from stune_hidream.tiny import build_demo

    workdir = tmp_path_factory.mktemp("hidream-demo")
    build_demo(workdir)
    return workdir / "model"
