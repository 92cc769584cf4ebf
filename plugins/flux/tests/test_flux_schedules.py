"""FLUX timestep and guidance schedules, checkpoint intervals and base dtype, seen in real runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import stune
from stune.errors import ConfigError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run


class Seen:
    """Records what the transformer receives on every training forward pass."""

    __name__ = "seen"

    def __init__(self) -> None:
        self.sigmas: list[torch.Tensor] = []
        self.guidance: list[torch.Tensor] = []
        self.model: Any = None

    @stune.hookimpl
    def route_tokens(self, transformer: torch.nn.Module) -> None:
        self.model = transformer

        def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if torch.is_grad_enabled():
                self.sigmas.append(kwargs["timestep"].detach().clone())
                if kwargs.get("guidance") is not None:
                    self.guidance.append(kwargs["guidance"].detach().clone())

        transformer.register_forward_pre_hook(record, with_kwargs=True)


def _train(run: Path, monkeypatch: pytest.MonkeyPatch, seen: Seen, **overrides: Any) -> None:
    monkeypatch.chdir(run)
    train(prepare(overrides={k: str(v) for k, v in overrides.items()}, host=PluginHost.build(["flux"], plugins=[seen])))


def test_fast_schedule_draws_from_schnells_table(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Seen()
    _train(flux_run(tmp_path, tiny_flux_dir, max_train_steps=12, flux_fast_schedule="true"), monkeypatch, seen)
    values = {round(float(v), 4) for s in seen.sigmas for v in s}
    assert values <= {1.0, 0.75, 0.5, 0.25} and 1.0 in values


def test_schnell_turns_the_fast_schedule_on() -> None:
    host = PluginHost.build(["flux"])
    config = host.config_model().model_validate({"model_flavour": "schnell"})
    family = host.family_class("flux")(config)
    family.apply_defaults()
    assert config.flux_fast_schedule is True  # type: ignore[attr-defined]


def test_random_range_guidance(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Seen()
    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        max_train_steps=4,
        flux_guidance_mode="random-range",
        flux_guidance_min=2.0,
        flux_guidance_max=3.0,
    )
    _train(run, monkeypatch, seen)
    values = torch.cat(seen.guidance)
    assert values.min() >= 2.0 and values.max() <= 3.0 and values.unique().numel() == values.numel()
    seen_const = Seen()
    _train(flux_run(tmp_path / "c", tiny_flux_dir, flux_guidance_value=3.5), monkeypatch, seen_const)
    assert all(torch.all(g == 3.5) for g in seen_const.guidance)


def test_guidance_range_must_be_ordered() -> None:
    host = PluginHost.build(["flux"])
    with pytest.raises(ConfigError, match="flux_guidance_min"):
        from stune.config import validate_config

        validate_config(
            {"flux_guidance_mode": "random-range", "flux_guidance_min": 5, "flux_guidance_max": 1},
            host.config_model(),
            host,
        )


@pytest.mark.parametrize("interval,expected", [(None, 3), (1, 3), (2, 2), (3, 1)])
def test_gradient_checkpointing_interval(
    interval: int | None, expected: int, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from stune.memory import enable_gradient_checkpointing

    real = torch.utils.checkpoint.checkpoint
    calls: list[int] = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").train()
    enable_gradient_checkpointing(model, interval)
    latents = torch.randn(1, 16, 64)  # 4×4 packed tokens of 64 channels
    for _ in range(2):  # the count restarts with every forward pass
        calls.clear()
        out = model(
            hidden_states=latents,
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([1.0]),
            pooled_projections=torch.randn(1, 32),
            encoder_hidden_states=torch.randn(1, 4, 32),
            txt_ids=torch.zeros(4, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        ).sample
        out.mean().backward()
        # 1 double-stream + 2 single-stream blocks; checkpointed: every block, or every n-th
        assert len(calls) == expected


def test_base_model_default_dtype(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Seen()
    _train(flux_run(tmp_path, tiny_flux_dir, base_model_default_dtype="bf16", max_train_steps=1), monkeypatch, seen)
    dtypes = {p.dtype for n, p in seen.model.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16}
