"""Training options exercised end to end on the tiny FLUX pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_counts_optimizer_steps(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=4)
    monkeypatch.chdir(run)
    result = train(prepare(host=PluginHost.build(["flux"])))
    assert result.final_step == 4
    # 4 images, batch 1, 2 micro-batches per step: 2 optimizer steps per epoch.
    assert [(r["step"], r["epoch"]) for r in _metrics(run)] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert all(r["samples_per_second"] > 0 for r in _metrics(run))


def test_epochs_without_max_steps(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, max_train_steps="none", num_train_epochs=2)
    monkeypatch.chdir(run)
    assert train(prepare(host=PluginHost.build(["flux"]))).final_step == 4  # 4 images / batch 2 × 2 epochs


def test_bf16_mixed_precision_keeps_adapter_in_fp32(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        mixed_precision="bf16",
        flow_schedule_auto_shift="true",
        validation_prompt="a red circle",  # rendered at the end, through the bf16 VAE
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        disable_benchmark="true",
    )
    monkeypatch.chdir(run)
    loaded: list[Any] = []

    class Probe:
        __name__ = "probe"

        import stune

        @stune.hookimpl(wrapper=True)
        def load_model(self) -> Any:
            components = yield
            loaded.append(components)
            return components

    result = train(prepare(host=PluginHost.build(["flux"], plugins=[Probe()])))
    assert result.final_step == 2
    seen = {"lora" if "lora_" in n else "base": p.dtype for n, p in loaded[0].transformer.named_parameters()}
    assert seen == {"base": torch.bfloat16, "lora": torch.float32}
    assert [p.name for p in result.validation_images] == ["step-000002-validation-64x64.png"]
    weights = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(r["loss"] == r["loss"] for r in _metrics(run))  # finite, not NaN


def test_separate_transformer_and_vae_paths(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        pretrained_transformer_model_name_or_path=str(tiny_flux_dir / "transformer"),
        pretrained_transformer_subfolder="none",
        pretrained_vae_model_name_or_path=str(tiny_flux_dir / "vae"),
    )
    monkeypatch.chdir(run)
    assert train(prepare(host=PluginHost.build(["flux"]))).final_step == 2


def test_lr_schedule_warmup_and_cosine(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(
        tmp_path, tiny_flux_dir, max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, learning_rate=1e-3
    )
    monkeypatch.chdir(run)
    train(prepare(host=PluginHost.build(["flux"])))
    lrs = [r["lr"] for r in _metrics(run)]  # the rate each step was taken with
    assert lrs[:3] == pytest.approx([0.0, 0.5e-3, 1e-3])  # linear warm-up over 2 steps, then the peak
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # cosine decay


def test_grad_clip_by_norm_reports_the_norm(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, grad_clip_method="norm", max_grad_norm=1e-6, learning_rate=1e-3)
    monkeypatch.chdir(run)
    train(prepare(host=PluginHost.build(["flux"])))
    assert all(r["grad_norm"] > 1e-6 for r in _metrics(run))  # the pre-clipping norm is logged


def test_fp16_mixed_precision_trains(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, mixed_precision="fp16")
    monkeypatch.chdir(run)
    assert train(prepare(host=PluginHost.build(["flux"]))).final_step == 2
    weights = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
