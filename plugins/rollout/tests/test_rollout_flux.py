"""Scheduled sampling on the tiny FLUX pipeline: the training forward gets the model's own rolled-out
states, a step costs the longest rollout plus the training forward, rollouts leave no gradient,
probability 0 trains exactly as without the plugin, and the LoRA loads in diffusers."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import stune_flux
import stune_rollout

from .conftest import LORA_FILE, Observer, family_run, metrics, train_here

MAX_OFFSET = 4


@pytest.fixture(scope="module")
def rolled(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> tuple[Path, Observer]:
    run = family_run(
        tmp_path_factory.mktemp("flux-rollout"),
        "flux",
        tiny_flux_dir,
        max_train_steps=3,
        scheduled_sampling_max_step_offset=MAX_OFFSET,
        scheduled_sampling_probability=1.0,
        scheduled_sampling_strategy="biased_late",
    )
    observer = Observer()
    with pytest.MonkeyPatch.context() as mp:
        result = train_here(run, [stune_flux, stune_rollout, observer], mp)
    assert result.final_step == 3
    return run, observer


def test_the_training_forward_gets_the_models_own_rolled_out_states(rolled: tuple[Path, Observer]) -> None:
    _, observer = rolled
    assert len(observer.checks) == 3
    every_sample = [c for c in observer.checks if min(c["offsets"]) > 0]
    assert every_sample, "no step rolled out all four samples; pick another seed"
    for check in observer.checks:
        for steps, reference, interpolated in zip(
            check["offsets"], check["from_reference"], check["from_interpolated"], strict=True
        ):
            if steps:
                assert reference < 1e-4, check  # the batched rollout is the one-at-a-time rollout
                # and not the interpolated state: one Euler step of 1/1000 already moves it by 1e-3·|v − (ε − x₀)|
                assert interpolated > max(1e-3, 100 * reference), check
            else:
                assert interpolated < 1e-6, check  # not rolled out: trained as drawn
        assert not check["requires_grad"]


def test_a_step_costs_the_longest_rollout_plus_the_training_forward(rolled: tuple[Path, Observer]) -> None:
    run, observer = rolled
    records = metrics(run)
    for check, forwards, record in zip(observer.checks, observer.steps, records, strict=True):
        longest, rolled_out = max(check["offsets"]), sum(1 for k in check["offsets"] if k)
        assert len(forwards) == longest + 1 <= MAX_OFFSET + 1
        assert record["rollout/forwards"] == longest
        if rolled_out == 4:  # batch 4, every sample rolled out: SimpleTuner would run Σk batch-1 forwards
            assert len(forwards) - 1 < sum(check["offsets"])
        # The first rollout forward also carries the four clean states ReflexFlow compares against.
        assert [f.batch for f in forwards[:-1]] == [
            sum(1 for k in check["offsets"] if k > j) + (rolled_out if j == 0 else 0) for j in range(longest)
        ]
        assert forwards[-1].batch == 4
        assert record["rollout/fraction"] == rolled_out / 4
        assert record["rollout/mean_offset"] == pytest.approx(sum(check["offsets"]) / rolled_out)


def test_rollouts_run_without_gradient_in_eval_mode(rolled: tuple[Path, Observer]) -> None:
    _, observer = rolled
    for forwards in observer.steps:
        *rollout, training = forwards
        assert rollout and all(not f.grad and not f.training for f in rollout)
        assert training.grad and training.training
        # No gradient reached the adapter before the training forward: the rollout ran no backward.
        assert not any(f.adapter_grads for f in forwards)


def test_reflexflow_terms_are_in_the_loss(rolled: tuple[Path, Observer]) -> None:
    run, _ = rolled
    for record in metrics(run):
        assert record["aux_loss/reflexflow_adr"] > 0
        total = record["diffusion_loss"] + record["aux_loss/reflexflow_fc"] + record["aux_loss/reflexflow_adr"]
        assert record["loss"] == pytest.approx(total, rel=1e-5)
        assert record["rollout/seconds"] > 0 and record["rollout/probability"] == 1.0


def test_the_lora_loads_in_diffusers(
    rolled: tuple[Path, Observer], tiny_flux_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    run, _ = rolled
    out = run / "output"
    with safe_open(str(out / LORA_FILE), "pt") as handle:
        file_keys = set(handle.keys())
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(out, adapter_name="rollout")
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="rollout")
    assert {f"transformer.{k}" for k in loaded} == file_keys


def test_probability_zero_trains_exactly_as_without_the_plugin(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"max_train_steps": 3, "flux_guidance_mode": "random-range"}  # the forward draws too
    off = family_run(
        tmp_path / "p0",
        "flux",
        tiny_flux_dir,
        scheduled_sampling_max_step_offset=MAX_OFFSET,
        scheduled_sampling_probability=0.0,
        **options,
    )
    train_here(off, [stune_flux, stune_rollout], monkeypatch)
    without = family_run(tmp_path / "none", "flux", tiny_flux_dir, **options)
    train_here(without, [stune_flux], monkeypatch)

    a, b = load_file(str(off / "output" / LORA_FILE)), load_file(str(without / "output" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with_plugin, plain = metrics(off), metrics(without)
    assert [r["loss"] for r in with_plugin] == [r["loss"] for r in plain]
    assert all(r["rollout/fraction"] == 0 and r["rollout/forwards"] == 0 for r in with_plugin)
    assert not any(key.startswith("aux_loss/") for r in with_plugin for key in r)
