"""The forms, generated from the option registry: every option of the core and of each loaded plugin
with its type, default, help, limits and allowed values, grouped by area; the families and their
flavours; the dataset keys. Nothing is listed by hand: a plugin installed later shows up by itself.

The core's areas are its option mixins (``stune.opts.<area>``, titled by their module docstring);
each plugin's options are one group named after the plugin.
"""

from __future__ import annotations

import math
import re
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from stune.config import CoreOptions
from stune.family import ModelFamily
from stune.options import Options
from stune.plugins import PluginHost
from stune.project import LYCORIS_PRESETS

# Options whose valid values are the precisions the installed quantizers register.
_PRECISION_KEY = re.compile(r"base_model_precision|text_encoder_\d+_precision")
_NO_CHANGE = "no_change"


def form_schema(host: PluginHost) -> dict[str, Any]:
    """What the page builds its forms from (``GET /api/schema``)."""
    groups = _core_groups() + _plugin_groups(host)
    precisions = [_NO_CHANGE, *sorted(host.quantizers)]
    for group in groups:
        for field in group["options"]:
            if _PRECISION_KEY.fullmatch(field["key"]) and field["kind"] == "text":
                field["suggestions"] = precisions
            if field["key"] == "model_family":
                field["kind"], field["choices"] = "choice", sorted(host.families)
    return {
        "groups": groups,
        "families": [_family(name, cls, host) for name, cls in sorted(host.families.items())],
        "dataset": {"options": [_field(name, info, "dataset") for name, info in _dataset_fields().items()]},
        "lycoris_presets": LYCORIS_PRESETS,
        "plugins": host.listing(),
    }


def option_owner(host: PluginHost) -> dict[str, str]:
    """Option key → the plugin declaring it (``core`` for the core's)."""
    owners = {name: "core" for name in CoreOptions.model_fields}
    for plugin, model in host.option_models:
        for name in model.model_fields:
            owners.setdefault(name, plugin)
    return owners


def _core_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    seen: set[str] = set()
    for mixin in CoreOptions.__mro__[1:]:
        if not (isinstance(mixin, type) and issubclass(mixin, Options)) or not mixin.__module__.startswith(
            "stune.opts."
        ):
            continue
        own = [name for name in mixin.__annotations__ if name in CoreOptions.model_fields and name not in seen]
        if not own:
            continue
        seen.update(own)
        area = mixin.__module__.rsplit(".", 1)[-1]
        groups.append(
            {
                "id": area,
                "title": area.replace("_", " ").capitalize(),
                "help": _first_sentence(sys.modules[mixin.__module__].__doc__),
                "plugin": "core",
                "options": [_field(name, CoreOptions.model_fields[name], "core") for name in own],
            }
        )
    return groups


def _plugin_groups(host: PluginHost) -> list[dict[str, Any]]:
    by_plugin: dict[str, list[type[Options]]] = {}
    for plugin, model in host.option_models:
        by_plugin.setdefault(plugin, []).append(model)
    groups = []
    core = set(CoreOptions.model_fields)
    for plugin, models in by_plugin.items():
        info = host.infos.get(plugin)
        fields: dict[str, FieldInfo] = {}
        for model in models:
            fields.update({k: v for k, v in model.model_fields.items() if k not in core and k not in fields})
        if not fields:
            continue
        groups.append(
            {
                "id": f"plugin-{plugin}",
                "title": f"Plugin {plugin}",
                "help": _first_sentence(models[0].__doc__)
                or (f"Options of {info.distribution}." if info and info.distribution else ""),
                "plugin": plugin,
                "options": [_field(name, field, plugin) for name, field in fields.items()],
            }
        )
    return groups


def _dataset_fields() -> dict[str, FieldInfo]:
    from stune.data.config import DatasetConfig

    return dict(DatasetConfig.model_fields)


def _family(name: str, cls: type[ModelFamily], host: PluginHost) -> dict[str, Any]:
    plugin = next((info.name for info in host.infos.values() if name in info.provides.get("families", [])), None)
    return {
        "name": name,
        "plugin": plugin,
        "description": cls.description,
        "flavours": dict(cls.flavours),
        "default_flavour": cls.default_flavour,
        "config_defaults": _json_safe(dict(cls.config_defaults)),
        "lora_presets": sorted(cls.lora_presets),
        "lora_preset_option": cls.lora_preset_option,
        "default_lora_preset": cls.default_lora_preset,
        "text_encoders": [slot.label for slot in cls.text_encoder_slots],
    }


def _field(name: str, info: FieldInfo, plugin: str) -> dict[str, Any]:
    annotation = info.annotation
    nullable = _allows_none(annotation)
    inner = _strip_none(annotation)
    kind, choices = _kind(inner)
    out: dict[str, Any] = {
        "key": name,
        "plugin": plugin,
        "kind": kind,
        "type": _type_text(annotation),
        "nullable": nullable,
        "required": info.is_required(),
        "default": None if info.is_required() else _json_safe(info.get_default(call_default_factory=True)),
        "help": info.description or "",
    }
    if choices:
        out["choices"] = choices
    aliases = [a for a in getattr(info.validation_alias, "choices", []) if isinstance(a, str) and a != name]
    if aliases:
        out["aliases"] = aliases
    limits = {}
    for item in info.metadata:
        for bound in ("ge", "gt", "le", "lt"):
            value = getattr(item, bound, None)
            if value is not None:
                limits[bound] = value
    if limits:
        out["limits"] = limits
    return out


def _kind(annotation: Any) -> tuple[str, list[Any]]:
    """How a field is edited: bool, int, float, text, choice, list or json (anything else)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "choice", [_json_safe(v) for v in typing.get_args(annotation)]
    if annotation is bool:
        return "bool", []
    if annotation is int:
        return "int", []
    if annotation is float:
        return "float", []
    if annotation is str:
        return "text", []
    if origin is list:
        return "list", []
    return "json", []


def _allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return type(None) in typing.get_args(annotation)
    return annotation is type(None)


def _strip_none(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
        return typing.Union[tuple(rest)]  # noqa: UP007 - built from a runtime list
    return annotation


def _type_text(annotation: Any) -> str:
    if typing.get_origin(_strip_none(annotation)) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(_strip_none(annotation)))
    text = str(annotation) if typing.get_args(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def _json_safe(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _first_sentence(doc: str | None) -> str:
    if not doc:
        return ""
    text = " ".join(doc.strip().split())
    match = re.match(r"(.+?)[.:](\s|$)", text)
    return (match.group(1) if match else text) + "."
