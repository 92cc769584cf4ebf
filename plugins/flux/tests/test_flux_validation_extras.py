"""Validation previews, torch.compile for validation, and FLUX's refusal of CFG rescale."""

from __future__ import annotations

from pathlib import Path

import pytest

from stune.errors import ConfigError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run

VALIDATION = {
    "validation_prompt": "a picture number 1",
    "validation_resolution": "64x64",
    "validation_num_inference_steps": 4,
    "disable_benchmark": "true",
}


def test_previews_every_n_sampling_steps(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, validation_preview="true", validation_preview_steps=2, **VALIDATION)
    monkeypatch.chdir(run)
    train(prepare(host=PluginHost.build(["flux"])))
    previews = sorted(p.name for p in (run / "output" / "validation_images" / "previews").iterdir())
    assert previews == ["step-000002-validation-64x64-s002.png", "step-000002-validation-64x64-s004.png"]


def test_validation_with_torch_compile(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(
        tmp_path, tiny_flux_dir, validation_torch_compile="true", **{**VALIDATION, "validation_num_inference_steps": 2}
    )
    monkeypatch.chdir(run)
    train(prepare(host=PluginHost.build(["flux"])))
    assert (run / "output" / "validation_images" / "step-000002-validation-64x64.png").is_file()


def test_flux_refuses_cfg_rescale(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, validation_guidance_rescale=0.7)
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="validation_guidance_rescale"):
        prepare(host=PluginHost.build(["flux"]))
