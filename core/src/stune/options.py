"""The base class for configuration options, shared by the core and every plugin.

Options are flat, SimpleTuner-style keys (``learning_rate``, ``flux_lora_target``). Each plugin
declares a subclass of :class:`Options`; the core merges them into one validated ``Config``.
pydantic's lax mode already reads SimpleTuner's string values (``"true"``, ``"4e-5"``, ``"20"``);
the only extra rule here is that ``"none"``/``"null"`` mean ``None`` where a field allows it.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

__all__ = ["AliasChoices", "Field", "Options", "json_list", "option_names"]

_NONE_STRINGS = {"none", "null", ""}


def _allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return type(None) in typing.get_args(annotation)
    return annotation is type(None)


class Options(BaseModel):
    """Base class for a plugin's (or the core's) configuration options.

    Declare fields with a default and ``Field(description=...)``; the description is what
    ``st-train options`` prints. Use ``validation_alias=AliasChoices(name, old_name)`` for a
    SimpleTuner alias. Cross-option checks belong in ``@model_validator(mode="after")`` methods
    (raise ``ValueError`` with one sentence) or in the ``check_config`` hook.
    """

    # no option means anything at infinity or NaN ("1e400" reads as inf): they are refused by name
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _none_strings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            keys = [name, *_alias_names(field.validation_alias)]
            for key in keys:
                value = data.get(key)
                if isinstance(value, str) and value.strip().lower() in _NONE_STRINGS and _allows_none(field.annotation):
                    data[key] = None
        return data


def _alias_names(alias: Any) -> list[str]:
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [a for a in alias.choices if isinstance(a, str)]
    return []


def option_names(model: type[BaseModel]) -> dict[str, str]:
    """Every accepted key of ``model`` (field names and aliases) mapped to its field name."""
    names: dict[str, str] = {}
    for name, field in model.model_fields.items():
        names[name] = name
        for alias in _alias_names(field.validation_alias):
            names[alias] = name
    return names


def json_list(value: Any) -> Any:
    """Accept a list given as JSON text (SimpleTuner passes ``'["to_q", "to_k"]'`` on the command line)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value
