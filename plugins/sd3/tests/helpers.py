"""Run folders, generation and small probes shared by the SD3 tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, write_run
from stune.train import TrainResult, train

LORA_FILE = "pytorch_lora_weights.safetensors"


def sd3_run(folder: Path, model: Path, images: int = 4, **options: Any) -> Path:
    """A run folder training the tiny SD3 model on ``images`` 64×64 pictures (77 T5 tokens, to keep it quick)."""
    make_images(folder / "data", images, size=(64, 64))
    config = {
        "model_family": "sd3",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 2,
        "train_batch_size": 2,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 77,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "lora_rank": 4,
        **options,
    }
    datasets = [
        {"id": "pics", "type": "local", "instance_data_dir": "data", "cache_dir_vae": "cache/vae/pics"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def train_in(run: Path, *plugins: Any, names: tuple[str, ...] = ("sd3",), **overrides: Any) -> TrainResult:
    """Train the run in this process (``plugins``: extra hook implementations; ``names``: installed plugins to load)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run)
        session = prepare(
            overrides={k: str(v) for k, v in overrides.items()},
            host=PluginHost.build(list(names), plugins=list(plugins)),
        )
        return train(session)


def family(**options: Any) -> Any:
    """An SD3 family on a validated config (defaults applied, not checked)."""
    host = PluginHost.build(["sd3"])
    config = host.config_model().model_validate({"model_family": "sd3", **options})
    fam = host.family_class("sd3")(config)
    fam.apply_defaults()
    return fam


def generate(pipe: Any, prompt: str = "a picture number 1") -> torch.Tensor:
    """A deterministic 64×64 image from an SD3 pipeline (2 sampling steps)."""
    return pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=77,
    ).images[0]
