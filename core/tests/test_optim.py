"""Optimizers and learning-rate schedules, built from options and stepped for real."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from stune import optim
from stune.errors import ConfigError
from stune.opts.optim import parse_optimizer_config
from stune.plugins import PluginHost


def config(**options: Any) -> Any:
    return PluginHost.build(entry_points=False).config_model().model_validate(options)


CPU_OPTIMIZERS = ["torch-adamw", "adamw", "optimi-adamw", "optimi-lion", "optimi-stableadamw", "prodigy"]


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_optimizers_step(name: str) -> None:
    cfg = config(optimizer=name)
    param = torch.nn.Parameter(torch.ones(8, 8))
    opt = optim.build_optimizer([param], cfg)
    param.grad = torch.full_like(param, 0.5)
    opt.step()
    assert not torch.equal(param.detach(), torch.ones(8, 8))
    assert torch.all(param < 1)  # moved against the gradient


def test_adamw_bf16_keeps_small_updates_that_plain_bf16_loses() -> None:
    cfg = config(optimizer="adamw_bf16", learning_rate=1e-4, adam_weight_decay=0.0, mixed_precision="bf16")
    assert optim.trainable_dtype(cfg) == torch.bfloat16
    assert optim.trainable_dtype(config()) == torch.float32
    kahan = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    opt_kahan = optim.build_optimizer([kahan], cfg)
    opt_plain = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(200):  # each update (~1e-4) is below bf16's resolution at 1.0 (2^-8 ≈ 0.0039 below 1)
        for p, o in ((kahan, opt_kahan), (plain, opt_plain)):
            p.grad = torch.ones_like(p)
            o.step()
    assert kahan.dtype == torch.bfloat16
    assert torch.all(plain == 1.0)  # every update rounded away
    assert kahan.float().mean().item() == pytest.approx(1.0 - 200 * 1e-4, abs=0.004)  # the updates add up


def test_simpletuner_defaults_per_optimizer() -> None:
    def group(**options: Any) -> dict[str, Any]:
        return optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], config(**options)).param_groups[0]

    adamw = group()
    assert (adamw["betas"], adamw["weight_decay"], adamw["eps"]) == ((0.9, 0.999), 1e-2, 1e-8)
    lion = group(optimizer="optimi-lion")
    assert (lion["beta1"], lion["beta2"], lion["weight_decay"]) == (0.9, 0.99, 0.0)
    stable = group(optimizer="optimi-stableadamw")
    assert (stable["beta2"], stable["weight_decay"], stable["eps"]) == (0.99, 1e-2, 1e-6)
    bf16 = group(optimizer="adamw_bf16", mixed_precision="bf16")
    assert (bf16["beta2"], bf16["eps"], bf16["kahan_sum"]) == (0.999, 1e-6, True)
    prodigy = group(optimizer="prodigy")
    assert (prodigy["lr"], prodigy["betas"], prodigy["weight_decay"]) == (1.0, (0.9, 0.99), 0.0)
    assert group(optimizer="prodigy", learning_rate=0.5)["lr"] == 0.5  # a set learning_rate is kept


def test_options_then_generic_betas_then_optimizer_config() -> None:
    def group(**options: Any) -> dict[str, Any]:
        return optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], config(**options)).param_groups[0]

    lion = group(optimizer="optimi-lion", adam_beta2=0.95, adam_weight_decay=0.3, adam_epsilon=1e-3)
    assert (lion["beta1"], lion["beta2"], lion["weight_decay"]) == (0.9, 0.95, 0.3)  # eps: Lion has none
    generic = group(adam_beta1=0.8, optimizer_beta1=0.7, optimizer_beta2=0.9)
    assert generic["betas"] == (0.7, 0.9)
    overridden = group(optimizer_beta1=0.7, optimizer_config="betas=(0.5, 0.6), weight_decay=0.0")
    assert (overridden["betas"], overridden["weight_decay"]) == ((0.5, 0.6), 0.0)


def test_optimizer_config_overrides_reach_the_optimizer() -> None:
    cfg = config(optimizer="optimi-lion", optimizer_config="weight_decay=0.25, betas=(0.8, 0.95)")
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.25 and (group["beta1"], group["beta2"]) == (0.8, 0.95)
    prodigy = config(optimizer="prodigy", optimizer_config="d_coef=2,safeguard_warmup=true,eps=1e-6")
    group = optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], prodigy).param_groups[0]
    assert (group["d_coef"], group["safeguard_warmup"], group["eps"]) == (2, True, 1e-6)


def test_unknown_optimizer_config_key_is_named() -> None:
    with pytest.raises(ConfigError, match="`momentum` is not a setting of torch-adamw"):
        optim.check_optimizer(config(optimizer_config="momentum=0.9"))
    with pytest.raises(ConfigError, match="`eps` is not a setting of optimi-lion"):
        optim.check_optimizer(config(optimizer="optimi-lion", optimizer_config="eps=1e-6"))


def test_optimizer_config_parsing() -> None:
    parsed = parse_optimizer_config("a=1, b=(1, 2), c=true, d=text, e=none, f=1e-6, g=False")
    assert parsed == {"a": 1, "b": (1, 2), "c": True, "d": "text", "e": None, "f": 1e-6, "g": False}
    with pytest.raises(ValueError):
        parse_optimizer_config("nonsense")
    with pytest.raises(ValidationError, match="betas must be a tuple"):
        config(optimizer_config="betas=0.9")


def _no_cuda(monkeypatch: pytest.MonkeyPatch, bnb: tuple[int, ...] | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(optim, "_bnb_version", lambda: bnb)


@pytest.mark.parametrize("name", ["bnb-adamw8bit", "bnb-lion8bit", "bnb-lion8bit-paged"])
def test_bitsandbytes_without_cuda_needs_a_release_that_runs_on_the_cpu(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_cuda(monkeypatch, (0, 49))
    with pytest.raises(ConfigError, match=rf"optimizer {name} runs only on a CUDA GPU .* bitsandbytes>=0.50") as err:
        optim.check_optimizer(config(optimizer=name))
    assert str(err.value).count(". ") == 0  # one sentence
    _no_cuda(monkeypatch, None)
    with pytest.raises(ConfigError, match=rf"optimizer {name} needs bitsandbytes; .*stune\[bnb\]"):
        optim.check_optimizer(config(optimizer=name))
    _no_cuda(monkeypatch, (0, 50))
    optim.check_optimizer(config(optimizer=name))  # bitsandbytes 0.50 runs its optimizers on the CPU


def test_bitsandbytes_refusal_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from stune.errors import UserError

    _no_cuda(monkeypatch, (0, 45))
    with pytest.raises(UserError, match=r"bitsandbytes 0\.45"):  # the CLI prints it alone and exits with status 2
        optim.check_optimizer(config(optimizer="bnb-lion8bit-paged"))


@pytest.mark.parametrize("name", ["bnb-adamw8bit", "bnb-lion8bit", "bnb-lion8bit-paged"])
def test_bitsandbytes_optimizers_build_and_step(name: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available() and optim._bnb_version() < optim.BNB_CPU_SINCE:  # type: ignore[operator]
        pytest.skip("this bitsandbytes needs CUDA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = config(optimizer=name, learning_rate=1e-3, optimizer_config="weight_decay=0.05")
    param = torch.nn.Parameter(torch.ones(64, 128, device=device))  # above min_8bit_size: 8-bit state
    opt = optim.build_optimizer([param], cfg)
    assert isinstance(opt, getattr(bnb.optim, optim.BNB[name]))
    assert opt.param_groups[0]["weight_decay"] == 0.05
    param.grad = torch.full_like(param, 0.5)
    opt.step()
    assert torch.all(param < 1)
    assert opt.state[param]["state1"].dtype == torch.uint8


def test_adamw_bf16_needs_bf16_training() -> None:
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        optim.check_optimizer(config(optimizer="adamw_bf16", mixed_precision="no"))


def test_clipping_is_skipped_where_simpletuner_skips_it() -> None:
    assert optim.clips_gradients(config())
    assert optim.clips_gradients(config(optimizer="optimi-lion"))
    assert not optim.clips_gradients(config(optimizer="optimi-stableadamw"))
    assert not optim.clips_gradients(config(optimizer="prodigy"))
    assert not optim.clips_gradients(config(max_grad_norm=0))


def _prodigy_d(steps: int, **options: Any) -> list[float]:
    cfg = config(optimizer="prodigy", lr_scheduler="constant", **options)
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(32))
    opt = optim.build_optimizer([param], cfg)
    optim.build_lr_scheduler(opt, cfg, steps)
    target = torch.randn(32) * 5
    ds = []
    for _ in range(steps):
        param.grad = param.detach() - target
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    return ds


def test_prodigy_stops_adapting_after_prodigy_steps() -> None:
    free = _prodigy_d(20, prodigy_steps=0)
    assert free[19] > free[5] > free[0]  # d keeps growing while it adapts
    frozen = _prodigy_d(20, prodigy_steps=5)
    assert frozen[:5] == free[:5]
    assert frozen[5:] == [frozen[4]] * 15  # kept from step 5 on
    default = _prodigy_d(20)  # 25% of the 20-step run
    assert default[4:] == [default[4]] * 16 and default[3] < default[4]


def test_prodigy_frozen_step_size_survives_a_resume() -> None:
    cfg = config(optimizer="prodigy", lr_scheduler="constant", prodigy_steps=2)
    param = torch.nn.Parameter(torch.randn(8))
    opt = optim.build_optimizer([param], cfg)
    optim.build_lr_scheduler(opt, cfg, 10)
    for _ in range(4):
        param.grad = param.detach() - 3
        opt.step()
    saved, d = opt.state_dict(), opt.param_groups[0]["d"]
    resumed = optim.build_optimizer([param], cfg)
    optim.build_lr_scheduler(resumed, cfg, 10)
    resumed.load_state_dict(saved)
    param.grad = param.detach() - 3
    resumed.step()
    assert resumed.param_groups[0]["d"] == d


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
    assert curve(lr_scheduler="linear", lr_warmup_steps=2) == pytest.approx(
        [0, 0.5] + [1 - (i - 2) / 8 for i in range(2, 11)]
    )
    assert curve(lr_scheduler="cosine") == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(11)])
    restarts = curve(lr_scheduler="cosine_with_restarts", lr_num_cycles=2)
    assert restarts[5] == pytest.approx(1.0) and restarts[4] < 0.2  # jumps back up
    poly = curve(lr_scheduler="polynomial", lr_power=2.0, lr_end=0.0)
    assert poly == pytest.approx([(1 - i / 10) ** 2 for i in range(11)])
    poly_end = curve(lr_scheduler="polynomial", lr_end=0.1)  # lr_power defaults to 0.8, as in SimpleTuner
    assert poly_end == pytest.approx([0.1 + 0.9 * (1 - i / 10) ** 0.8 for i in range(11)])
    sine = curve(lr_scheduler="sine", lr_num_cycles=2, lr_end=0.0)
    assert sine == pytest.approx([0.5 * (1 + math.cos(2 * math.pi * 2 * i / 10)) for i in range(11)], abs=1e-12)
    assert sine[3] < sine[4] < sine[5] == pytest.approx(1.0)  # climbs back smoothly
    floored = curve(steps=13, lr_scheduler="sine", lr_warmup_steps=2, lr_end=0.2)
    assert floored[:3] == pytest.approx([0.0, 0.5, 1.0])  # warm-up, then the wave starts at the peak
    assert floored[7] == pytest.approx(0.2) and min(floored[2:]) == pytest.approx(0.2)  # lowest: lr_end
    assert floored[12] == pytest.approx(1.0)


def test_schedule_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="lr_end"):
        config(lr_scheduler="sine", learning_rate=1e-7)
    with pytest.raises(ValidationError, match="constant_with_warmup"):
        config(lr_scheduler="constant", lr_warmup_steps=10)
