"""Turning command-line input into a checked run: plugins, configuration, family, features.

Everything here is cheap (no torch): a configuration mistake must surface in a second, before any
model, dataset or cache is touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stune.config import CoreOptions, find_config_file, read_config_file, validate_config
from stune.errors import ConfigError
from stune.family import ModelFamily
from stune.features import TrainingFeature
from stune.plugins import PluginHost
from stune.publish import check_publish
from stune.tracking import check_trackers


@dataclass
class Session:
    host: PluginHost
    config: CoreOptions
    family: ModelFamily
    features: list[type[TrainingFeature]]
    config_path: Path | None


def prepare(
    plugins: Sequence[str] | None = None,
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    host: PluginHost | None = None,
) -> Session:
    """Load plugins, read and validate the configuration, pick the family and check everything."""
    host = host or PluginHost.build(plugins)
    path = find_config_file(config_path)
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    raw.update(overrides or {})
    if path is None and not raw:
        raise ConfigError("No configuration found: create config/config.json, or pass --config PATH or --key=value.")
    config = validate_config(raw, host.config_model(), host)
    family_cls = host.family_class(config.model_family)
    config.model_family = family_cls.name
    family = family_cls(config)
    family.apply_defaults()
    family.check_config()
    _check_precisions(config, host)
    check_trackers(config)
    check_publish(config)
    features = [f for f in host.features.values() if f.enabled(config)]
    for feature in features:
        missing = feature.missing_requirements(family_cls)
        if missing:
            raise ConfigError(
                f"The {feature.name} feature needs the {family_cls.name} family to declare {', '.join(missing)}; "
                f"turn {feature.name} off for this family."
            )
    host.hook.check_config(config=config, family=family)
    return Session(host=host, config=config, family=family, features=features, config_path=path)


_PRECISION_KEY = re.compile(r"base_model_precision|text_encoder_\d+_precision")


def _check_precisions(config: CoreOptions, host: PluginHost) -> None:
    for key in type(config).model_fields:
        if not _PRECISION_KEY.fullmatch(key):
            continue
        value = getattr(config, key)
        if value in (None, "no_change") or value in host.quantizers:
            continue
        choices = ", ".join(["no_change", *sorted(host.quantizers)])
        raise ConfigError(f"Option `{key}` = {value!r} is not an installed precision; choose one of: {choices}.")
