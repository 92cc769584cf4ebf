"""Validation prompts (main prompt, prompt library, negative prompt), image names, benchmark
bookkeeping, and the eval-loss building blocks (sample choice, σ schedule)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from stune.config import CoreOptions, validate_config
from stune.data.loader import Sample
from stune.errors import ConfigError, UserError
from stune.evaluation import EvalResult, schedule_sigmas, select_samples
from stune.flow import resolution_shift, shift_sigmas
from stune.opts.validation import load_prompt_library
from stune.plugins import PluginHost
from stune.validation import NEGATIVE_KEY, benchmark_needed, image_paths, rendered_prompts, validation_prompts


@pytest.fixture
def bare_host() -> PluginHost:
    return PluginHost.build(entry_points=False)


def _config(host: PluginHost | None = None, **values: Any) -> CoreOptions:
    return validate_config({"model_family": "toy", **values}, CoreOptions, host)


def _library(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "user_prompt_library.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# -- the prompt library -----------------------------------------------------------------------------


def test_library_of_strings_and_simpletuner_objects(tmp_path: Path) -> None:
    path = _library(
        tmp_path,
        {
            "anime_sks": "an anime portrait of sks",
            "chef": {"prompt": "sks as a chef", "adapter_strength": 0.5},
            "caption_form": {"caption": "a caption-keyed prompt"},
        },
    )
    assert load_prompt_library(path) == {
        "anime_sks": "an anime portrait of sks",
        "chef": "sks as a chef",
        "caption_form": "a caption-keyed prompt",
    }


def test_library_accepts_trailing_commas(tmp_path: Path) -> None:
    path = _library(tmp_path, '{\n  "a": "one",\n  "b": "two",\n}\n')
    assert load_prompt_library(path) == {"a": "one", "b": "two"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": "one" "b": "two"}', r"is not valid JSON: .* at line 1"),
        ('["a", "b"]', "must hold one JSON object of nickname: prompt pairs"),
        ('{"a": 3}', "has no prompt for `a`"),
        ('{"a": {"adapter_strength": 1}}', "has no prompt for `a`"),
        ('{"a": "  "}', "has no prompt for `a`"),
        ('{"a b": "one", "a_b": "two"}', "give the same file name `a_b`"),
    ],
)
def test_library_mistakes_are_one_sentence_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = _library(tmp_path, content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_prompt_library(path)
    assert str(path) in str(caught.value)
    assert str(caught.value).endswith(".")


def test_library_is_checked_when_the_config_is_read(tmp_path: Path, bare_host: PluginHost) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"The user_prompt_library file {missing} does not exist"):
        _config(bare_host, user_prompt_library=str(missing))
    broken = _library(tmp_path, "{not json")
    with pytest.raises(ConfigError, match=f"{broken} is not valid JSON"):
        _config(bare_host, user_prompt_library=str(broken))


def test_library_may_not_reuse_the_main_prompts_nickname(tmp_path: Path, bare_host: PluginHost) -> None:
    path = _library(tmp_path, {"validation": "x"})
    with pytest.raises(ConfigError, match="nickname `validation` is taken by validation_prompt"):
        _config(bare_host, user_prompt_library=str(path), validation_prompt="y")
    assert rendered_prompts(_config(bare_host, user_prompt_library=str(path))) == {"validation": "x"}


# -- which prompts are cached and rendered ------------------------------------------------------------


def test_every_prompt_is_cached_negative_included(tmp_path: Path) -> None:
    path = _library(tmp_path, {"one": "first", "two": "second"})
    config = _config(validation_prompt="main", user_prompt_library=str(path), validation_negative_prompt="bad")
    assert rendered_prompts(config) == {"validation": "main", "one": "first", "two": "second"}
    assert validation_prompts(config) == {**rendered_prompts(config), NEGATIVE_KEY: "bad"}
    assert _config().validation_negative_prompt == "blurry, cropped, ugly"  # SimpleTuner's default


def test_no_prompts_or_disabled_means_nothing_to_cache(tmp_path: Path) -> None:
    assert validation_prompts(_config()) == {}
    path = _library(tmp_path, {"one": "first"})
    disabled = _config(validation_prompt="main", user_prompt_library=str(path), validation_disable="true")
    assert validation_prompts(disabled) == {} and rendered_prompts(disabled) == {}


def test_image_names(tmp_path: Path) -> None:
    path = _library(tmp_path, {"my nick/name": "first"})
    config = _config(validation_prompt="main", user_prompt_library=str(path), validation_resolution="64,128x64")
    names = [p.name for p in image_paths(config, tmp_path, "step-000010")]
    assert names == [
        "step-000010-validation-64x64.png",
        "step-000010-validation-128x64.png",
        "step-000010-my_nick_name-64x64.png",
        "step-000010-my_nick_name-128x64.png",
    ]
    several = _config(validation_prompt="main", num_validation_images=2, validation_resolution="64")
    assert [p.name for p in image_paths(several, tmp_path, "base")] == [
        "base-validation-64x64-0.png",
        "base-validation-64x64-1.png",
    ]
    assert all(p.parent == tmp_path / "validation_images" for p in image_paths(several, tmp_path, "base"))


def test_benchmark_is_needed_until_every_base_image_exists(tmp_path: Path) -> None:
    config = _config(validation_prompt="main", num_validation_images=2, validation_resolution="64")
    assert benchmark_needed(config, tmp_path)
    first, second = image_paths(config, tmp_path, "base")
    first.parent.mkdir(parents=True)
    first.write_bytes(b"")
    assert benchmark_needed(config, tmp_path)  # one is missing: render them again
    second.write_bytes(b"")
    assert not benchmark_needed(config, tmp_path)  # a resumed run does not redo them
    assert not benchmark_needed(_config(validation_prompt="main", disable_benchmark=True), tmp_path / "x")
    assert not benchmark_needed(_config(), tmp_path / "x")  # nothing to render
    assert not benchmark_needed(_config(validation_prompt="main", validation_disable=True), tmp_path / "x")


# -- eval loss building blocks ------------------------------------------------------------------------


def _sample(dataset: str, name: str) -> Sample:
    return Sample(dataset, Path(f"/data/{dataset}/{name}.png"), Path("x"), ["c"], (64, 64))


def test_eval_options_defaults() -> None:
    config = _config()
    assert config.eval_steps_interval is None
    assert (config.eval_timesteps, config.num_eval_images, config.eval_loss_disable) == (28, 4, False)


def test_eval_samples_first_by_path_and_dataset_choice() -> None:
    samples = [_sample("b", "2"), _sample("a", "9"), _sample("b", "1"), _sample("a", "1")]
    assert [(s.dataset_id, s.image.stem) for s in select_samples(samples, _config(num_eval_images=3))] == [
        ("a", "1"),
        ("a", "9"),
        ("b", "1"),
    ]
    chosen = select_samples(samples, _config(eval_dataset_id="b"))
    assert [s.image.stem for s in chosen] == ["1", "2"]
    with pytest.raises(UserError, match=r"eval_dataset_id `c` names no eval dataset .*eval datasets: a, b"):
        select_samples(samples, _config(eval_dataset_id="c"))


def test_eval_sigmas_follow_the_scheduler_with_dynamic_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    params = (256, 4096, 0.5, 1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15
    )
    before = scheduler.sigmas.clone()
    small = schedule_sigmas(scheduler, 28, 1024, params, 3.0)
    large = schedule_sigmas(scheduler, 28, 4096, params, 3.0)
    assert small.shape == large.shape == (28,)
    assert small[0] == pytest.approx(1.0) and torch.all(small[1:] < small[:-1])
    assert torch.all(large[1:-1] > small[1:-1])  # more tokens, more shift towards noise
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(28, mu=math.log(resolution_shift(1024, *params)))
    assert torch.allclose(small, reference.sigmas[:28].float())
    assert torch.equal(scheduler.sigmas, before)  # the run's scheduler is left as it was


def test_eval_sigmas_static_shift_and_no_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    static = schedule_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, 1024, (256, 4096, 0.5, 1.15), 0.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(4)
    assert torch.allclose(static, reference.sigmas[:4].float())
    fallback = schedule_sigmas(None, 4, 1024, (256, 4096, 0.5, 1.15), 3.0)
    assert torch.allclose(fallback, shift_sigmas(torch.tensor([1.0, 0.75, 0.5, 0.25]), 3.0))


def test_eval_record() -> None:
    record = EvalResult(step=7, loss=0.5, per_sigma=[0.75, 0.25]).record()
    assert record == {"step": 7, "eval_loss": 0.5, "eval_loss/sigma_00": 0.75, "eval_loss/sigma_01": 0.25}
