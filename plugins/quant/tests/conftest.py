"""Fixtures for stune-quant's tests: one tiny FLUX run folder whose caches every training shares,
and in-process training with a probe that keeps the trained transformer."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import stune
from stune.plugins import PluginHost
from stune.testing import make_images, write_run

PROMPT = "a picture number 1"
LORA = "pytorch_lora_weights.safetensors"


class Probe:
    """Keeps the transformer the run trains (after quantization and adapters)."""

    __name__ = "quant-test-probe"

    def __init__(self) -> None:
        self.transformers: list[Any] = []

    @stune.hookimpl
    def route_tokens(self, transformer: Any) -> None:
        self.transformers.append(transformer)


@dataclass
class Trained:
    output: Path
    result: Any
    transformer: Any
    config: Any
    records: list[dict[str, Any]] = field(default_factory=list)


def flux_config(model: Path, **options: Any) -> dict[str, Any]:
    return {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 2,
        "train_batch_size": 2,
        "learning_rate": "1e-2",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 0,
        "lora_rank": 4,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "validation_disable": "true",
        "disable_benchmark": "true",
        "resume_from_checkpoint": "none",
        **options,
    }


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> Path:
    """A run folder on the tiny FLUX pipeline; its latent and text caches are shared by the module's runs."""
    folder = tmp_path_factory.mktemp("quant-flux-run")
    make_images(folder / "data", 4, size=(64, 64))
    datasets = [
        {"id": "pics", "type": "local", "instance_data_dir": "data", "cache_dir_vae": "cache/vae/pics"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, flux_config(tiny_flux_dir), datasets)
    return folder


def train_in(run: Path, monkeypatch: pytest.MonkeyPatch, output: str, **overrides: Any) -> Trained:
    """Train in-process in ``run`` with the flux and quant plugins; the outputs go to ``run/output``."""
    from stune.session import prepare
    from stune.train import train

    monkeypatch.chdir(run)
    probe = Probe()
    host = PluginHost.build(["flux", "quant"], plugins=[probe])
    session = prepare(host=host, overrides={"output_dir": output, **{k: str(v) for k, v in overrides.items()}})
    result = train(session)
    metrics = run / output / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return Trained(run / output, result, probe.transformers[-1], session.config, records)


# -- what a trained LoRA is checked against --------------------------------------------------------


def generate(pipe: Any) -> torch.Tensor:
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=16,
    ).images[0]


def quantized_kind(layer: torch.nn.Module) -> str:
    """The quantized layer class, or the class of its weight tensor for torchao (which keeps nn.Linear)."""
    layer = getattr(layer, "base_layer", layer)  # under a PEFT LoRA wrapper
    if type(layer) is torch.nn.Linear:
        return type(layer.weight).__name__
    return type(layer).__name__


@pytest.fixture(scope="module")
def unquantized(tiny_flux_dir: Path) -> tuple[Any, torch.Tensor]:
    """The unquantized FluxPipeline the LoRAs are loaded into, and its image without any."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate(pipe)


def assert_loads_unquantized(
    unquantized: tuple[Any, torch.Tensor], output: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from peft.utils import get_peft_model_state_dict

    pipe, before = unquantized
    with safe_open(str(output / LORA), "pt") as handle:
        file_keys = set(handle.keys())
    assert file_keys and all(k.startswith("transformer.") and ".lora_" in k for k in file_keys)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(output, adapter_name="trained")
    try:
        assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
        assert {f"transformer.{k}" for k in loaded} == file_keys  # nothing missing, nothing unexpected
        assert (generate(pipe) - before).abs().max() > 1e-4  # the LoRA changes the image
    finally:
        pipe.delete_adapters("trained")
