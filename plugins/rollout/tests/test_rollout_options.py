"""Options, checks, the plan and ReflexFlow's arithmetic, without training: SimpleTuner's names and
defaults, bad combinations refused before any model loads, the probability ramp, the offset
strategies and the clamp at pure noise."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import stune_rollout
from stune.errors import ConfigError
from stune.features import FeatureContext
from stune.plugins import PluginHost, load_catalog
from stune.session import Session, prepare
from stune.testing import run_cli
from stune_rollout.feature import ScheduledSampling, reflexflow_terms
from stune_rollout.options import RolloutOptions

from .conftest import REPO, load_toy, toy_run

#: documentation/OPTIONS.md of SimpleTuner (reference §2.4 and §3.7); reflexflow unset = auto
SIMPLETUNER_DEFAULTS = {
    "scheduled_sampling_max_step_offset": 0,
    "scheduled_sampling_probability": 0.0,
    "scheduled_sampling_strategy": "uniform",
    "scheduled_sampling_prob_start": 0.0,
    "scheduled_sampling_prob_end": 0.5,
    "scheduled_sampling_ramp_steps": 0,
    "scheduled_sampling_start_step": 0,
    "scheduled_sampling_ramp_shape": "linear",
    "scheduled_sampling_sampler": "unipc",
    "scheduled_sampling_order": 2,
    "scheduled_sampling_reflexflow": None,
    "scheduled_sampling_reflexflow_alpha": 1.0,
    "scheduled_sampling_reflexflow_beta1": 10.0,
    "scheduled_sampling_reflexflow_beta2": 1.0,
}


def test_options_are_simpletuners_and_exactly_the_catalogs() -> None:
    fields = RolloutOptions.model_fields
    assert {name: field.default for name, field in fields.items()} == SIMPLETUNER_DEFAULTS
    assert set(fields) == set(load_catalog()["rollout"].options)
    assert all(field.description for field in fields.values())


def _session(folder: Path, model: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Session:
    monkeypatch.chdir(toy_run(folder, model))
    host = PluginHost.build(plugins=[load_toy(), stune_rollout], entry_points=False)
    return prepare(host=host, overrides={k: str(v) for k, v in overrides.items()})


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"scheduled_sampling_probability": 0.5}, "`scheduled_sampling_probability` does nothing while "),
    ({"scheduled_sampling_reflexflow": "true"}, "`scheduled_sampling_reflexflow` does nothing while "),
    (
        {
            "scheduled_sampling_max_step_offset": 4,
            "scheduled_sampling_probability": 0.5,
            "scheduled_sampling_ramp_steps": 9,
        },
        "both set the rollout probability",
    ),
    (
        {"scheduled_sampling_max_step_offset": 4, "scheduled_sampling_prob_end": 0.9},
        "`scheduled_sampling_prob_end` only acts during the probability ramp",
    ),
    (
        {"scheduled_sampling_max_step_offset": 4, "scheduled_sampling_ramp_shape": "cosine"},
        "`scheduled_sampling_ramp_shape` only acts during",
    ),
    (
        {
            "scheduled_sampling_max_step_offset": 4,
            "scheduled_sampling_probability": 1,
            "scheduled_sampling_reflexflow": "false",
            "scheduled_sampling_reflexflow_beta1": 5,
        },
        "`scheduled_sampling_reflexflow_beta1` does nothing with scheduled_sampling_reflexflow=false",
    ),
    (
        {"scheduled_sampling_max_step_offset": 4, "scheduled_sampling_probability": 1.5},
        "scheduled_sampling_probability",
    ),
    ({"scheduled_sampling_max_step_offset": -1}, "scheduled_sampling_max_step_offset"),
    ({"scheduled_sampling_max_step_offset": 4, "scheduled_sampling_strategy": "late"}, "scheduled_sampling_strategy"),
]

ACCEPTED: list[tuple[dict[str, Any], bool]] = [  # (options, rollout feature on)
    (dict(SIMPLETUNER_DEFAULTS, scheduled_sampling_reflexflow="none"), False),  # a full dump of the defaults
    ({"scheduled_sampling_reflexflow": "false", "scheduled_sampling_sampler": "euler"}, False),
    ({"scheduled_sampling_max_step_offset": 4, "scheduled_sampling_probability": 1}, True),
    (
        {
            "scheduled_sampling_max_step_offset": "8",
            "scheduled_sampling_ramp_steps": "100",
            "scheduled_sampling_start_step": "10.0",  # SimpleTuner documents this default as 0.0
            "scheduled_sampling_prob_start": "0.1",
            "scheduled_sampling_prob_end": "0.9",
            "scheduled_sampling_ramp_shape": "cosine",
            "scheduled_sampling_strategy": "biased_late",
            "scheduled_sampling_reflexflow_alpha": "2",
        },
        True,
    ),
]


def test_bad_combinations_are_refused_before_any_model_loads(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-model"  # loading it would fail: the checks come first
    for i, (options, message) in enumerate(REFUSED):
        with pytest.raises(ConfigError, match=message):
            _session(tmp_path / f"r{i}", missing, monkeypatch, **options)
    for i, (options, on) in enumerate(ACCEPTED):
        session = _session(tmp_path / f"a{i}", missing, monkeypatch, **options)
        assert [f.name for f in session.features] == (["rollout"] if on else [])


def test_the_command_line_refuses_with_one_sentence(tmp_path: Path, toy_model: Path) -> None:
    run = toy_run(tmp_path, tmp_path / "no-such-model")
    toy_file = str(REPO / "tests" / "toy_family.py")
    proc = run_cli(
        [
            "--plugin",
            toy_file,
            "--plugin",
            "rollout",
            "--scheduled_sampling_max_step_offset=4",
            "--scheduled_sampling_prob_start=0.2",
        ],
        cwd=run,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "`scheduled_sampling_prob_start` only acts during the probability ramp" in proc.stderr


def test_warnings_for_settings_that_cannot_act(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stune.rollout"):
        _session(tmp_path / "a", toy_model, monkeypatch, scheduled_sampling_max_step_offset=4)
        _session(
            tmp_path / "b",
            toy_model,
            monkeypatch,
            scheduled_sampling_max_step_offset=4,
            scheduled_sampling_probability=1,
            scheduled_sampling_sampler="dpm",
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("no sample will be rolled out" in m for m in messages), messages
    assert any("take Euler steps" in m and "scheduled_sampling_sampler=dpm" in m for m in messages), messages


def _feature(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 0, **options: Any) -> Any:
    feature = _session(tmp_path, model, monkeypatch, scheduled_sampling_max_step_offset=4, **options).features[0]
    assert isinstance(feature, ScheduledSampling)
    cpu = torch.device("cpu")
    feature.bind(FeatureContext(device=cpu, seed=seed, rank=0, generator=torch.Generator(cpu).manual_seed(seed)))
    return feature


def test_probability_fixed_or_ramped(tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = _feature(tmp_path / "f", toy_model, monkeypatch, scheduled_sampling_probability=0.3)
    assert [fixed.probability(s) for s in (0, 10, 10_000)] == [0.3, 0.3, 0.3]
    ramp = {
        "scheduled_sampling_ramp_steps": 100,
        "scheduled_sampling_start_step": 10,
        "scheduled_sampling_prob_start": 0.1,
        "scheduled_sampling_prob_end": 0.9,
    }
    linear = _feature(tmp_path / "l", toy_model, monkeypatch, **ramp)
    assert [linear.probability(s) for s in (0, 10, 35, 60, 110, 500)] == pytest.approx([0.1, 0.1, 0.3, 0.5, 0.9, 0.9])
    cosine = _feature(tmp_path / "c", toy_model, monkeypatch, scheduled_sampling_ramp_shape="cosine", **ramp)
    eased = 0.1 + 0.8 * (0.5 - 0.5 * math.cos(math.pi / 4))
    assert [cosine.probability(s) for s in (0, 35, 60, 110)] == pytest.approx([0.1, eased, 0.5, 0.9])


def test_plan_strategies_probability_and_the_clamp_at_pure_noise(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    half = torch.full((4000,), 0.5)
    uniform = _feature(tmp_path / "u", toy_model, monkeypatch, scheduled_sampling_probability=1)
    offsets = uniform.plan(half, 1.0)
    counts = torch.bincount(offsets, minlength=5)
    assert offsets.dtype == torch.long and len(counts) == 5 and counts.min() > 650  # 0..4, about 800 each
    assert uniform.plan(half, 0.0).eq(0).all()
    rolled = uniform.plan(half, 0.5).gt(0).float().mean()
    assert 0.35 < rolled < 0.45  # p · P(k > 0) = 0.5 · 0.8

    means = {}
    for strategy in ("biased_early", "biased_late"):
        feature = _feature(
            tmp_path / strategy,
            toy_model,
            monkeypatch,
            scheduled_sampling_probability=1,
            scheduled_sampling_strategy=strategy,
        )
        means[strategy] = feature.plan(half, 1.0).float().mean()
    # E[round(4u²)] ≈ 4/3 and E[round(4(1 − u²))] ≈ 8/3
    assert means["biased_early"] == pytest.approx(4 / 3, abs=0.15)
    assert means["biased_late"] == pytest.approx(8 / 3, abs=0.15)

    near_noise = torch.tensor([1.0, 0.9995, 0.999, 0.998, 0.75])
    late = _feature(
        tmp_path / "clamp",
        toy_model,
        monkeypatch,
        scheduled_sampling_probability=1,
        scheduled_sampling_strategy="biased_late",
    )
    ceiling = torch.tensor([0, 0, 1, 2, 4])
    for _ in range(20):
        assert (late.plan(near_noise, 1.0) <= ceiling).all()


def test_the_generator_stream_does_not_depend_on_the_probability(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sigmas = torch.full((8,), 0.4)
    a = _feature(tmp_path / "a", toy_model, monkeypatch, scheduled_sampling_probability=1)
    b = _feature(tmp_path / "b", toy_model, monkeypatch, scheduled_sampling_probability=1)
    a.plan(sigmas, 0.1)
    b.plan(sigmas, 0.9)
    assert torch.equal(a.plan(sigmas, 1.0), b.plan(sigmas, 1.0))


def test_reflexflow_terms_match_simpletuners_loss() -> None:
    # SimpleTuner's own example (one element): x₀ 0, ε 1, state 0.3, clean 0.6, biased 0.4, prediction 0.7.
    # Its loss is 0.18: the squared error 0.09, doubled by the weight 1 + α·0.2/0.2; no drift term.
    ones = torch.ones(1, 1, 1, 1)
    fc, adr = reflexflow_terms(
        velocity=0.7 * ones,
        target=ones,
        noisy=0.3 * ones,
        latents=0 * ones,
        clean=0.6 * ones,
        biased=0.4 * ones,
        rolled=torch.tensor([True]),
        loss_weight=None,
        alpha=1.0,
        beta2=1.0,
    )
    assert float(0.09 + fc) == pytest.approx(0.18) and float(adr) == 0.0

    # Two samples, only the first rolled out: β₂ scales its loss, its drift term counts, the other adds nothing.
    velocity = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    target = torch.zeros(2, 2, 1, 1)
    state = torch.tensor([[-1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1)  # opposite to the first prediction
    fc, adr = reflexflow_terms(
        velocity=velocity,
        target=target,
        noisy=state,
        latents=target,
        clean=None,
        rolled=torch.tensor([True, False]),
        loss_weight=None,
        alpha=1.0,
        beta2=3.0,
    )
    plain = float(velocity.square().mean())  # 0.5: both samples
    assert float(fc) == pytest.approx((3 - 1) * 0.5 * plain)  # (β₂ − 1) times the rolled sample's share
    assert float(adr) == pytest.approx(4.0 / 2)  # ‖(1, 0) − (−1, 0)‖² = 4, averaged over the batch
