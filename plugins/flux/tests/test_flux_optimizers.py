"""Every optimizer that runs on this machine trains the tiny FLUX LoRA end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stune import optim
from stune.cli import main
from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run


def _bnb_runs_here() -> bool:
    version = optim._bnb_version()
    return version is not None and (torch.cuda.is_available() or version >= optim.BNB_CPU_SINCE)


needs_bnb = pytest.mark.skipif(not _bnb_runs_here(), reason="no bitsandbytes that runs on this machine")


@pytest.mark.parametrize(
    "optimizer,options",
    [
        ("torch-adamw", {}),
        ("adamw_bf16", {"mixed_precision": "bf16"}),
        ("optimi-adamw", {}),
        ("optimi-lion", {"learning_rate": "1e-4"}),
        ("optimi-stableadamw", {}),
        ("prodigy", {"learning_rate": "1.0", "lr_scheduler": "constant"}),
        pytest.param("bnb-adamw8bit", {}, marks=needs_bnb),
        pytest.param("bnb-lion8bit", {"learning_rate": "1e-4"}, marks=needs_bnb),
        pytest.param("bnb-lion8bit-paged", {"learning_rate": "1e-4"}, marks=needs_bnb),
    ],
)
def test_optimizer_trains(
    optimizer: str, options: dict[str, str], tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, lora_dropout=0.0, **options)
    monkeypatch.chdir(run)
    session = prepare(overrides={"optimizer": optimizer}, host=PluginHost.build(["flux"]))
    assert train(session).final_step == 2
    weights = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert any(torch.count_nonzero(w) for w in lora_b)  # the adapter moved away from its zero start
    if optimizer == "adamw_bf16":
        assert all(w.dtype == torch.bfloat16 for w in weights.values())


def test_bitsandbytes_refused_before_anything_loads(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Without CUDA and with a bitsandbytes that needs it: one sentence, status 2, nothing cached."""
    run = flux_run(tmp_path, tiny_flux_dir)
    monkeypatch.chdir(run)
    monkeypatch.delenv("STUNE_RAISE_ERRORS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(optim, "_bnb_version", lambda: (0, 45))
    assert main(["--plugin", "flux", "--optimizer=bnb-lion8bit-paged"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("st-train: error: optimizer bnb-lion8bit-paged runs only on a CUDA GPU")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (run / "cache").exists() and not (run / "output").exists()


def test_missing_bitsandbytes_names_the_extra(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir)
    monkeypatch.chdir(run)
    monkeypatch.delenv("STUNE_RAISE_ERRORS", raising=False)
    monkeypatch.setattr(optim, "_bnb_version", lambda: None)
    assert main(["--plugin", "flux", "--optimizer=bnb-adamw8bit"]) == 2
    assert "pip install 'stune[bnb]'" in capsys.readouterr().err
