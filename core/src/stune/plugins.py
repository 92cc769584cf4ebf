"""Finding, loading and asking plugins.

:class:`PluginHost` owns one pluggy ``PluginManager``. It loads plugins from the ``stune``
entry-point group in name order (so runs are reproducible whatever order the installer chose),
from ``--plugin`` names or ``.py`` files, and from objects handed in by tests. A plugin that fails
to import is recorded with its error and reported by name. The host then calls the registration
hooks once, plugin by plugin, so every registered family, quantizer, feature and option knows
which plugin provided it. The lifecycle hooks are reached through ``host.hooks`` (typed).

Importing this module, building a host and listing plugins never import torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from stune import hookspecs
from stune.errors import ConfigError, PluginLoadError, PluginNotInstalled
from stune.hooks import Hooks
from stune.options import Options, option_names

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily
    from stune.features import TrainingFeature
    from stune.publishing import Publisher
    from stune.quantize import Quantizer

ENTRY_POINT_GROUP = hookspecs.PROJECT
DEFAULTS_NAME = "stune.defaults"
#: Comma-separated allowlist of entry-point names ('' loads none); unset loads all.
ENV_LOAD = "STUNE_LOAD_PLUGINS"
#: Comma-separated names never loaded.
ENV_DISABLE = "STUNE_DISABLE_PLUGINS"


@dataclass
class CatalogEntry:
    """A first-party plugin as the core knows it before it is installed."""

    name: str
    distribution: str
    families: list[str]
    options: list[str]
    neutral: dict[str, Any]
    commands: list[str] = field(default_factory=list)
    publishers: list[str] = field(default_factory=list)


@dataclass
class PluginInfo:
    """What ``st-train plugins`` prints about one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "distribution": self.distribution, "version": self.version}
        if self.error:
            out["error"] = self.error
        else:
            out["hooks"] = self.hooks
            out["provides"] = {k: v for k, v in self.provides.items() if v}
        return out


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[Any], None]
    run: Callable[[Any], int]
    plugin: str


def load_catalog() -> dict[str, CatalogEntry]:
    data = json.loads(resources.files("stune").joinpath("catalog.json").read_text(encoding="utf-8"))
    return {
        name: CatalogEntry(
            name=name,
            distribution=entry["distribution"],
            families=entry.get("families", []),
            options=entry.get("options", []),
            neutral=entry.get("neutral", {}),
            commands=entry.get("commands", []),
            publishers=entry.get("publishers", []),
        )
        for name, entry in data.items()
        if not name.startswith("_")
    }


def _load_file_plugin(path: Path) -> ModuleType:
    module_name = f"stune_local_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"Cannot load the plugin file {path}; is it a Python file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _is_file_reference(name: str) -> bool:
    return name.endswith(".py") or os.sep in name or "/" in name


def _env_names(var: str) -> list[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


class PluginHost:
    """Loaded plugins, their registries, and access to the lifecycle hooks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        #: the lifecycle hooks, typed (``host.hooks.load_model(...)``)
        self.hooks = Hooks(self.pm)
        self.infos: dict[str, PluginInfo] = {}
        self.catalog = load_catalog()
        self.families: dict[str, type[ModelFamily]] = {}
        self.quantizers: dict[str, type[Quantizer]] = {}
        self.features: dict[str, type[TrainingFeature]] = {}
        self.option_models: list[tuple[str, type[Options]]] = []
        self.commands: dict[str, Command] = {}
        self.publishers: dict[str, type[Publisher]] = {}  # provider name or alias → class
        self._owners: dict[str, str] = {}

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        selected: Sequence[str] | None = None,
        *,
        entry_points: bool = True,
        plugins: Iterable[object] = (),
        strict: bool = False,
    ) -> PluginHost:
        """Load plugins and fill the registries.

        :param selected: entry-point names or ``.py`` paths (``--plugin``); ``None`` loads every
            installed plugin (subject to ``STUNE_LOAD_PLUGINS`` / ``STUNE_DISABLE_PLUGINS``).
        :param entry_points: look at installed distributions at all (tests turn this off).
        :param plugins: extra plugin objects or modules to register (tests, the Python API).
        :param strict: raise on any plugin that fails to import, not only on selected ones.
        """
        host = cls()
        from stune import _defaults

        host.pm.register(_defaults, name=DEFAULTS_NAME)
        wanted = list(selected) if selected is not None else None
        files = [n for n in wanted or [] if _is_file_reference(n)]
        names = [n for n in wanted or [] if not _is_file_reference(n)]
        if entry_points:
            host._load_entry_points(names if wanted is not None else _env_names(ENV_LOAD), strict or bool(names))
        elif names:
            missing = names[0]
            raise host.not_installed(missing)
        for file in files:
            path = Path(file)
            if not path.is_file():
                raise PluginLoadError(f"The plugin file {path} does not exist; check --plugin.")
            host._register(_load_file_plugin(path), PluginInfo(name=path.stem, module=str(path)))
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            host._register(plugin, PluginInfo(name=name, module=name))
        try:
            host.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = host.pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginLoadError(
                f"The plugin `{name}` implements a hook stune does not have ({exc}); "
                "check the hook name against `stune.hookspecs`."
            ) from exc
        host._collect_registrations()
        host.pm.register(_defaults.QuantizeDispatch(host.quantizers), name=DEFAULTS_NAME + ".quantize")
        return host

    def _load_entry_points(self, allow: list[str] | None, strict: bool) -> None:
        blocked = set(_env_names(ENV_DISABLE) or [])
        found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
        if allow is not None:
            for name in allow:
                if name not in found:
                    raise self.not_installed(name)
        for name in sorted(found):
            if (allow is not None and name not in allow) or name in blocked:
                continue
            ep = found[name]
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=name,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
                module=ep.value,
            )
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"{type(exc).__name__}: {exc}"
                self.infos[name] = info
                if strict:
                    raise PluginLoadError(
                        f"The plugin `{name}` ({info.distribution or ep.value}) failed to import: {info.error}; "
                        f"reinstall it or remove it from --plugin."
                    ) from exc
                continue
            self._register(plugin, info)

    def _register(self, plugin: object, info: PluginInfo) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"The plugin `{info.name}` has an invalid hook implementation: {exc}.") from exc
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
        self.infos[info.name] = info

    def _collect_registrations(self) -> None:
        def walk(hook_name: str, kind: str, add: Callable[[str, Any], str]) -> None:
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():  # registration order
                plugin_name = impl.plugin_name

                def register(obj: Any, *rest: Any, _plugin: str = plugin_name) -> None:
                    label = add(_plugin, (obj, *rest) if rest else obj)
                    info = self.infos.get(_plugin)
                    if info is not None:
                        info.provides.setdefault(kind, []).append(label)

                impl.function(*[{"register": register}[a] for a in impl.argnames])

        walk("register_options", "options", self._add_options)
        walk("register_families", "families", self._add_family)
        walk("register_quantizers", "quantizers", self._add_quantizer)
        walk("register_features", "features", self._add_feature)
        walk("register_commands", "commands", self._add_command)
        walk("register_publishers", "publishers", self._add_publisher)

    def _claim(self, kind: str, name: str, plugin: str) -> None:
        key = f"{kind}:{name}"
        if key in self._owners and self._owners[key] != plugin:
            raise PluginLoadError(
                f"Plugins `{self._owners[key]}` and `{plugin}` both register the {kind} `{name}`; uninstall one."
            )
        self._owners[key] = plugin

    def _add_options(self, plugin: str, model: type[Options]) -> str:
        if not (isinstance(model, type) and issubclass(model, Options)):
            raise PluginLoadError(f"The plugin `{plugin}` registered options that are not a stune.Options subclass.")
        self.option_models.append((plugin, model))
        return model.__name__

    def _add_family(self, plugin: str, family: type[ModelFamily]) -> str:
        self._claim("model family", family.name, plugin)
        self.families[family.name] = family
        return family.name

    def _add_quantizer(self, plugin: str, quantizer: type[Quantizer]) -> str:
        for precision in quantizer.precisions:
            self._claim("precision", precision, plugin)
            self.quantizers[precision] = quantizer
        return quantizer.name

    def _add_feature(self, plugin: str, feature: type[TrainingFeature]) -> str:
        self._claim("feature", feature.name, plugin)
        self.features[feature.name] = feature
        return feature.name

    def _add_command(self, plugin: str, args: tuple[Any, ...]) -> str:
        name, help_text, add_arguments, run = args
        self._claim("command", name, plugin)
        self.commands[name] = Command(name, help_text, add_arguments, run, plugin)
        return str(name)

    def _add_publisher(self, plugin: str, publisher: type[Publisher]) -> str:
        from stune.publishing import Publisher

        if not (isinstance(publisher, type) and issubclass(publisher, Publisher)):
            raise PluginLoadError(f"The plugin `{plugin}` registered a publisher that is not a stune Publisher.")
        for name in (publisher.name, *publisher.aliases):
            self._claim("publishing provider", name, plugin)
            self.publishers[name] = publisher
        return publisher.name

    # -- questions -------------------------------------------------------------------------------

    def listing(self, include_defaults: bool = False) -> list[dict[str, Any]]:
        infos = list(self.infos.values())
        if include_defaults:
            infos.insert(0, PluginInfo(name=DEFAULTS_NAME, module="stune._defaults", hooks=self._default_hooks()))
        return [info.as_dict() for info in infos]

    def _default_hooks(self) -> list[str]:
        from stune import _defaults

        return sorted(c.name for c in self.pm.get_hookcallers(_defaults) or [])

    def config_model(self) -> type[CoreOptions]:
        from stune.config import build_config_model

        return build_config_model(self.option_models)

    def not_installed(self, name: str) -> PluginNotInstalled:
        entry = self.catalog.get(name)
        dist = entry.distribution if entry else f"stune-{name}"
        return PluginNotInstalled(f"The plugin `{name}` is not installed; install it with `pip install {dist}`.")

    def catalog_owner_of_option(self, key: str) -> CatalogEntry | None:
        for entry in self.catalog.values():
            if key in entry.options and entry.name not in self.infos:
                return entry
        return None

    def catalog_owner_of_publisher(self, provider: str) -> CatalogEntry | None:
        for entry in self.catalog.values():
            if provider in entry.publishers and entry.name not in self.infos:
                return entry
        return None

    def family_class(self, name: str | None) -> type[ModelFamily]:
        """The family ``model_family`` names; with none named, the only one installed."""
        if name is None:
            if len(self.families) == 1:
                return next(iter(self.families.values()))
            if not self.families:
                raise PluginNotInstalled(
                    "No model family plugin is loaded; install one (see `st-train plugins`) or pass --plugin NAME."
                )
            raise ConfigError(f"Set model_family to one of: {', '.join(sorted(self.families))}.")
        if name in self.families:
            return self.families[name]
        for entry in self.catalog.values():
            if name in entry.families:
                raise PluginNotInstalled(
                    f"model_family `{name}` needs the `{entry.name}` plugin; install it with "
                    f"`pip install {entry.distribution}` (or add --plugin {entry.name})."
                )
        known = ", ".join(sorted(self.families)) or "none installed"
        raise ConfigError(f"Unknown model_family `{name}`; installed families: {known}.")

    def neutral_options(self) -> dict[str, Any]:
        """Keys of plugins that are not loaded, with the values that ask nothing of them."""
        out: dict[str, Any] = {}
        for entry in self.catalog.values():
            if entry.name not in self.infos:
                out.update(entry.neutral)
        return out

    def known_option_names(self) -> dict[str, str]:
        return option_names(self.config_model())
