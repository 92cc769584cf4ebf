"""Turning command-line input into a checked run: plugins, configuration, family, features.

Everything here is cheap (no torch): a configuration mistake must surface in a second, before any
model, dataset or cache is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stune.checks import check_run
from stune.config import CoreOptions, find_config_file, read_config_file, validate_config
from stune.errors import ConfigError
from stune.family import ModelFamily
from stune.features import TrainingFeature
from stune.plugins import PluginHost


@dataclass
class Session:
    """A checked run: its plugins, configuration, family and enabled features."""

    host: PluginHost
    config: CoreOptions
    family: ModelFamily
    features: list[TrainingFeature]
    config_path: Path | None


def prepare(
    plugins: Sequence[str] | None = None,
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    host: PluginHost | None = None,
) -> Session:
    """Load plugins, read and validate the configuration, pick the family and check everything.

    ``--plugin NAME`` picks the plugins to load; an installed first-party plugin that owns a key
    of the configuration (``base_model_precision`` → quant, ``tread_config`` → tread) joins them,
    so ``st-train --plugin hidream`` runs a seed config that quantizes.
    """
    selected = host is None
    host = host or PluginHost.build(plugins)  # a missing --plugin is named before anything else
    path = find_config_file(config_path)
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    raw.update(overrides or {})
    if path is None and not raw:
        raise ConfigError("No configuration found: create config/config.json, or pass --config PATH or --key=value.")
    if selected and plugins is not None:
        needed = _installed_owners(host, raw)
        if needed:
            host = PluginHost.build([*plugins, *needed])
    config = validate_config(raw, host.config_model(), host)
    family_cls = host.family_class(config.model_family)
    config.model_family = family_cls.name
    family = family_cls(config)
    family.apply_defaults()
    features = [feature(config, family) for feature in host.features.values() if feature.enabled(config)]
    check_run(config, family, features, host)
    if config.model_type == "lora" and config.lora_type == "lycoris":
        # the file named by the config, checked before any model loads (`st-train configure` checks
        # its preset before writing the file, so this is not part of check_run)
        from stune.checks import lycoris_settings

        lycoris_settings(config.lycoris_config)
    return Session(host=host, config=config, family=family, features=features, config_path=path)


def _installed_owners(host: PluginHost, raw: dict[str, Any]) -> list[str]:
    """First-party plugins not loaded but installed whose options the configuration sets."""
    from importlib import metadata

    installed = {ep.name for ep in metadata.entry_points(group="stune")}
    known = host.known_option_names()
    owners = {
        owner.name
        for key, value in raw.items()
        if key not in known
        and (owner := host.catalog_owner_of_option(key)) is not None
        and owner.name in installed
        and str(owner.neutral.get(key, object())).lower() != str(value).lower()
    }
    owners.update(
        owner.name
        for provider in _publishing_providers(raw.get("publishing_config"))
        if provider not in host.publishers
        and (owner := host.catalog_owner_of_publisher(provider)) is not None
        and owner.name in installed
    )
    return sorted(owners)


def _publishing_providers(value: Any) -> list[str]:
    """The provider names publishing_config asks for (its mistakes are reported when it is validated)."""
    from stune.errors import UserError
    from stune.publishing import read_entries

    try:
        return [entry["provider"].strip().lower() for entry in read_entries(value)]
    except UserError:
        return []
