"""Optimizers and learning-rate schedules, built from options and stepped for real."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from stune import optim
from stune.errors import ConfigError
from stune.opts.optim import parse_optimizer_config
from stune.plugins import PluginHost


def config(**options: Any) -> Any:
    return PluginHost.build(entry_points=False).config_model().model_validate(options)


CPU_OPTIMIZERS = ["torch-adamw", "adamw", "optimi-adamw", "optimi-lion", "optimi-stableadamw", "prodigy"]


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_optimizers_step(name: str) -> None:
    cfg = config(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-2)
    param = torch.nn.Parameter(torch.ones(8, 8))
    opt = optim.build_optimizer([param], cfg)
    param.grad = torch.full_like(param, 0.5)
    opt.step()
    assert not torch.equal(param.detach(), torch.ones(8, 8))


def test_adamw_bf16_keeps_small_updates_that_plain_bf16_loses() -> None:
    cfg = config(optimizer="adamw_bf16", learning_rate=1e-4, adam_weight_decay=0.0, mixed_precision="bf16")
    assert optim.trainable_dtype(cfg) == torch.bfloat16
    kahan = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    opt_kahan = optim.build_optimizer([kahan], cfg)
    opt_plain = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(200):  # each update (~1e-4) is below bf16's resolution at 1.0 (2^-7 ≈ 0.0078)
        for p, o in ((kahan, opt_kahan), (plain, opt_plain)):
            p.grad = torch.ones_like(p)
            o.step()
    assert torch.all(plain == 1.0)  # every update rounded away
    assert kahan.float().mean().item() == pytest.approx(1.0 - 200 * 1e-4, abs=0.004)  # the updates add up


def test_optimizer_config_overrides_reach_the_optimizer() -> None:
    cfg = config(optimizer="optimi-lion", optimizer_config="weight_decay=0.25, betas=(0.8, 0.95)")
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.25 and (group["beta1"], group["beta2"]) == (0.8, 0.95)


def test_unknown_optimizer_config_key_is_named() -> None:
    with pytest.raises(ConfigError, match="`momentum` is not a setting of torch-adamw"):
        optim.check_optimizer(config(optimizer_config="momentum=0.9"))


def test_optimizer_config_parsing() -> None:
    assert parse_optimizer_config("a=1, b=(1, 2), c=true, d=text") == {"a": 1, "b": (1, 2), "c": True, "d": "text"}
    with pytest.raises(ValueError):
        parse_optimizer_config("nonsense")


def test_bitsandbytes_optimizers_need_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in ("bnb-adamw8bit", "bnb-lion8bit", "bnb-lion8bit-paged"):
        with pytest.raises(ConfigError, match=name):
            optim.check_optimizer(config(optimizer=name))


def test_adamw_bf16_needs_bf16_training() -> None:
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        optim.check_optimizer(config(optimizer="adamw_bf16", mixed_precision="no"))


def test_clipping_is_skipped_where_simpletuner_skips_it() -> None:
    assert optim.clips_gradients(config())
    assert not optim.clips_gradients(config(optimizer="optimi-stableadamw"))
    assert not optim.clips_gradients(config(optimizer="prodigy"))
    assert not optim.clips_gradients(config(max_grad_norm=0))


def curve(steps: int = 11, **options: Any) -> list[float]:
    cfg = config(learning_rate=1.0, **options)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = optim.build_lr_scheduler(opt, cfg, steps - 1)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    return out


def test_schedules() -> None:
    assert curve(lr_scheduler="constant") == [1.0] * 11
    assert curve(lr_scheduler="constant_with_warmup", lr_warmup_steps=4)[:6] == [0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert curve(lr_scheduler="linear") == pytest.approx([1 - i / 10 for i in range(11)])
    assert curve(lr_scheduler="cosine") == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(11)])
    restarts = curve(lr_scheduler="cosine_with_restarts", lr_num_cycles=2)
    assert restarts[5] == pytest.approx(1.0) and restarts[4] < 0.2  # jumps back up
    poly = curve(lr_scheduler="polynomial", lr_power=2.0, lr_end=0.0)
    assert poly == pytest.approx([(1 - i / 10) ** 2 for i in range(11)])
    sine = curve(lr_scheduler="sine", lr_num_cycles=2)
    assert sine == pytest.approx([0.5 * (1 + math.cos(2 * math.pi * 2 * i / 10)) for i in range(11)])
    assert sine[3] < sine[4] < sine[5] == pytest.approx(1.0)  # climbs back smoothly
