"""Configuration: the core's options, and reading SimpleTuner-style config files.

A run's configuration is one flat pydantic model assembled from the core's :class:`CoreOptions`
and every loaded plugin's options. Sources, later ones winning: the config file
(``config/config.json`` by default, or TOML), then ``--key=value`` on the command line. Keys may
carry SimpleTuner's leading ``--``. Every problem is reported as one :class:`ConfigError`
sentence before any model or dataset is touched.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError, create_model

from stune.errors import ConfigError, PluginNotInstalled
from stune.jsonfile import read_json
from stune.options import Options, option_names
from stune.opts.adapter import AdapterOptions
from stune.opts.data import DataOptions
from stune.opts.distributed import DistributedOptions
from stune.opts.ema import EMAOptions
from stune.opts.evaluation import EvaluationOptions
from stune.opts.flow import FlowOptions
from stune.opts.memory import MemoryOptions
from stune.opts.model import ModelOptions
from stune.opts.optim import OptimizerOptions
from stune.opts.publish import PublishOptions
from stune.opts.tracking import TrackingOptions
from stune.opts.training import TrainingOptions
from stune.opts.validation import ValidationOptions

if TYPE_CHECKING:
    from stune.plugins import PluginHost

DEFAULT_CONFIG_PATHS = (Path("config/config.json"), Path("config/config.toml"))
DEFAULT_DATA_BACKEND_CONFIG = Path("config/multidatabackend.json")


class CoreOptions(
    ModelOptions,
    AdapterOptions,
    DataOptions,
    TrainingOptions,
    OptimizerOptions,
    FlowOptions,
    ValidationOptions,
    EvaluationOptions,
    TrackingOptions,
    EMAOptions,
    PublishOptions,
    MemoryOptions,
    DistributedOptions,
):
    """Options every run has, whatever the model family (one mixin per area, in ``stune.opts``)."""


# The assembled model is a subclass of CoreOptions and of every plugin's options.
Config = CoreOptions


def build_config_model(option_models: list[tuple[str, type[Options]]]) -> type[CoreOptions]:
    """Merge the core's and the plugins' option models into one; a key declared twice is an error."""
    owners: dict[str, str] = {name: "core" for name in option_names(CoreOptions)}
    fields: dict[str, Any] = dict(CoreOptions.model_fields)
    bases: list[type[Options]] = []
    # pydantic keeps validators by method name across the merged classes: two models with a
    # validator of the same name would silently lose one of them.
    # name → (defining class, plugin): the same class reached twice (a shared base) is no clash
    validators = {name: (where, "core") for name, where in _validators(CoreOptions).items()}
    for plugin, model in option_models:
        for name, where in _validators(model).items():
            if name in validators and validators[name][0] != where:
                raise ConfigError(
                    f"Plugins `{validators[name][1]}` and `{plugin}` both define an option validator named "
                    f"`{name}`; rename the one in `{plugin}` (prefix it with the option it checks)."
                )
            validators[name] = (where, plugin)
        for key in option_names(model):
            shared = key in fields and key in model.model_fields and _same_field(fields[key], model.model_fields[key])
            if key in owners and owners[key] != plugin and not shared:
                raise ConfigError(
                    f"Plugins `{owners[key]}` and `{plugin}` both declare the option `{key}`; uninstall one of them."
                )
            owners[key] = plugin
        fields.update(model.model_fields)
        if model not in bases:
            bases.append(model)
    if not bases:
        return CoreOptions
    return create_model("Config", __base__=(CoreOptions, *bases))  # type: ignore[call-overload,no-any-return,arg-type]


def _validators(model: type[Options]) -> dict[str, str]:
    """Validator method name → the class that defines it (the base class's own are shared by all)."""
    decorators = model.__pydantic_decorators__
    found: dict[str, Any] = {**decorators.field_validators, **decorators.model_validators}
    own = {}
    for name, decorator in found.items():
        if name in Options.__pydantic_decorators__.model_validators:
            continue
        function = getattr(decorator.func, "__func__", decorator.func)
        own[name] = f"{function.__module__}.{function.__qualname__}"  # where it is defined
    return own


def _same_field(a: Any, b: Any) -> bool:
    return bool(a.annotation == b.annotation and a.default == b.default)


# -- reading ---------------------------------------------------------------------------------------


def find_config_file(path: str | Path | None) -> Path | None:
    """The config file to read: ``path`` if given, else config/config.json, config/config.toml or (SimpleTuner's
    deprecated format) config/config.env."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"The config file {path} does not exist; check --config.")
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.is_file():
            return candidate
    from stune.configenv import CONFIG_ENV

    return CONFIG_ENV if CONFIG_ENV.is_file() else None  # SimpleTuner's deprecated shell-style config


def read_config_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".env":
        from stune.configenv import notice, read_config_env

        notice(path)
        return read_config_env(path)
    if path.suffix == ".toml":
        try:
            data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"The config file {path} is not valid TOML (UTF-8): {exc}.") from None
    else:
        data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"The config file {path} must hold one JSON object of option: value pairs.")
    return {normalise_key(k): v for k, v in data.items()}


def normalise_key(key: str) -> str:
    return str(key).strip().lstrip("-")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--key=value``, ``--key value`` and bare ``--flag`` (meaning true) into a dict."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Unexpected argument {arg!r}; options are written --key=value.")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            key, value = body, "true"
        out[normalise_key(key)] = value
        i += 1
    return out


def _one_sentence(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not loc:
        return msg + "."
    value = first.get("input")
    shown = f" = {_shown(value)}" if not isinstance(value, dict) else ""
    return f"Option `{loc}`{shown} is invalid: {msg[0].lower() + msg[1:]}."


def _shown(value: Any) -> str:
    """A value as the error sentence quotes it: a megabyte string stays a sentence."""
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:80]}… ({len(text)} characters)"


def validate_config(raw: dict[str, Any], model: type[CoreOptions], host: PluginHost | None = None) -> CoreOptions:
    """Validate raw key/values against ``model``; unknown keys name the nearest key or the plugin."""
    known = option_names(model)
    neutral = host.neutral_options() if host is not None else {}
    for key in list(raw):
        if key not in known and key in neutral and str(raw[key]).lower() == str(neutral[key]).lower():
            del raw[key]  # e.g. base_model_precision=no_change asks nothing of the missing quant plugin
    from stune.simpletuner import translate_options

    translate_options(raw, known)  # SimpleTuner options stune has under another form, or refuses by name
    for key in raw:
        if key in known:
            continue
        owner = host.catalog_owner_of_option(key) if host is not None else None
        if owner is not None:
            raise PluginNotInstalled(
                f"Option `{key}` belongs to the `{owner.name}` plugin, which is not loaded; "
                f"install it with `pip install {owner.distribution}` (or add --plugin {owner.name})."
            )
        from stune.data.config import DatasetConfig

        if key in option_names(DatasetConfig):
            raise ConfigError(
                f"`{key}` is a dataset option; set it on the dataset in your multidatabackend.json, not in the config."
            )
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else "run `st-train options` to list the valid keys."
        raise ConfigError(f"Unknown option `{key}`; {hint}")
    from stune.names import check_option_strings

    # NUL bytes, lone surrogates, path parts longer than a file name: before a validator opens the file
    check_option_strings({known[key]: value for key, value in raw.items()})
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_sentence(exc)) from None
