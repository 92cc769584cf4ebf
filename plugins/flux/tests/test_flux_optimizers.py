"""Every optimizer that runs on this machine trains the tiny FLUX LoRA end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run


@pytest.mark.parametrize(
    "optimizer,options",
    [
        ("torch-adamw", {}),
        ("adamw_bf16", {"mixed_precision": "bf16"}),
        ("optimi-adamw", {}),
        ("optimi-lion", {"learning_rate": "1e-4"}),
        ("optimi-stableadamw", {}),
        ("prodigy", {"learning_rate": "1.0", "lr_scheduler": "constant"}),
    ],
)
def test_optimizer_trains(
    optimizer: str, options: dict[str, str], tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, optimizer=optimizer, lora_dropout=0.0, **options)
    monkeypatch.chdir(run)
    assert train(prepare(host=PluginHost.build(["flux"]))).final_step == 2
    weights = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert any(torch.count_nonzero(w) for w in lora_b)  # the adapter moved away from its zero start
    if optimizer == "adamw_bf16":
        assert all(w.dtype == torch.bfloat16 for w in weights.values())
