"""Reading SimpleTuner-style configs: keys, string values, TOML, and one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stune.config import (
    CoreOptions,
    parse_overrides,
    read_config_file,
    validate_config,
)
from stune.errors import ConfigError, PluginNotInstalled
from stune.opts.validation import parse_resolutions
from stune.plugins import PluginHost


@pytest.fixture
def bare_host() -> PluginHost:
    """A host with no third-party plugins (as if only `stune` were installed)."""
    return PluginHost.build(entry_points=False)


def test_simpletuner_json_with_dashes_and_string_values(tmp_path: Path, bare_host: PluginHost) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "--learning_rate": "4e-5",
                "--max_train_steps": "20",
                "gradient_checkpointing": "true",
                "--checkpointing_steps": "5",  # SimpleTuner alias
                "seed": "none",
                "lr_scheduler": "constant_with_warmup",
            }
        )
    )
    config = validate_config(read_config_file(path), bare_host.config_model(), bare_host)
    assert config.learning_rate == pytest.approx(4e-5)
    assert config.max_train_steps == 20
    assert config.gradient_checkpointing is True
    assert config.checkpoint_step_interval == 5
    assert config.seed is None


def test_toml_config(tmp_path: Path, bare_host: PluginHost) -> None:
    path = tmp_path / "config.toml"
    path.write_text('learning_rate = 0.0002\ntrain_batch_size = 3\nvalidation_resolution = "512x768,1024"\n')
    config = validate_config(read_config_file(path), bare_host.config_model(), bare_host)
    assert config.train_batch_size == 3
    assert config.validation_sizes == [(512, 768), (1024, 1024)]


def test_trailing_commas_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "learning_rate": 1e-4,\n  "lora_rank": 4,\n}\n')
    assert read_config_file(path) == {"learning_rate": 1e-4, "lora_rank": 4}


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "learning_rate": 1e-4\n  "lora_rank": 4\n}\n')
    with pytest.raises(ConfigError, match=r"line 3"):
        read_config_file(path)


def test_unknown_key_names_the_nearest(bare_host: PluginHost) -> None:
    with pytest.raises(ConfigError, match=r"`lr_schedular`.*did you mean `lr_scheduler`"):
        validate_config({"lr_schedular": "constant"}, bare_host.config_model(), bare_host)


def test_unknown_key_without_neighbour_points_to_options(bare_host: PluginHost) -> None:
    with pytest.raises(ConfigError, match=r"st-train options"):
        validate_config({"zzzqqq": 1}, bare_host.config_model(), bare_host)


def test_dataset_key_in_config_says_where_it_belongs(bare_host: PluginHost) -> None:
    with pytest.raises(ConfigError, match="`repeats` is a dataset option"):
        validate_config({"repeats": 3}, bare_host.config_model(), bare_host)


def test_key_of_missing_plugin_names_the_package(bare_host: PluginHost) -> None:
    with pytest.raises(PluginNotInstalled, match=r"`flux` plugin.*pip install stune-flux"):
        validate_config({"flux_lora_target": "all"}, bare_host.config_model(), bare_host)
    with pytest.raises(PluginNotInstalled, match=r"pip install stune-quant"):
        validate_config({"base_model_precision": "int8-quanto"}, bare_host.config_model(), bare_host)


def test_neutral_value_of_missing_plugin_is_accepted(bare_host: PluginHost) -> None:
    # SimpleTuner configs carry text_encoder_N_precision=no_change: it asks nothing of stune-quant.
    config = validate_config(
        {"text_encoder_1_precision": "no_change", "base_model_precision": "no_change"},
        bare_host.config_model(),
        bare_host,
    )
    assert isinstance(config, CoreOptions)


def test_bad_value_is_one_sentence(bare_host: PluginHost) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"lr_scheduler": "wavy"}, bare_host.config_model(), bare_host)
    message = str(info.value)
    assert "`lr_scheduler`" in message and "'wavy'" in message
    assert "\n" not in message


def test_negative_number_rejected(bare_host: PluginHost) -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        validate_config({"learning_rate": "-1"}, bare_host.config_model(), bare_host)


def test_cross_option_conflict(bare_host: PluginHost) -> None:
    with pytest.raises(ConfigError, match="flow_schedule_auto_shift"):
        validate_config(
            {"flow_schedule_auto_shift": "true", "flow_schedule_shift": "3"}, bare_host.config_model(), bare_host
        )
    # Auto shift with the default (unset) static shift is fine, as in the SD3 quickstart.
    ok = validate_config({"flow_schedule_auto_shift": "true"}, bare_host.config_model(), bare_host)
    assert ok.flow_schedule_auto_shift


def test_transformer_subfolder_none(bare_host: PluginHost) -> None:
    config = validate_config({"pretrained_transformer_subfolder": "none"}, bare_host.config_model(), bare_host)
    assert config.pretrained_transformer_subfolder is None


def test_overrides_forms() -> None:
    assert parse_overrides(["--a=1", "--b", "two", "--flag", "--c=x=y"]) == {
        "a": "1",
        "b": "two",
        "flag": "true",
        "c": "x=y",
    }
    with pytest.raises(ConfigError):
        parse_overrides(["stray"])


def test_resolutions() -> None:
    assert parse_resolutions("1024") == [(1024, 1024)]
    assert parse_resolutions("1024x1024, 1280x768") == [(1024, 1024), (1280, 768)]
    with pytest.raises(ValueError):
        parse_resolutions("big")
