"""stune-tread: TREAD token routing. This module only registers; nothing heavy is imported."""

from __future__ import annotations

from typing import Any

import stune


@stune.hookimpl
def register_options(register: Any) -> None:
    from stune_tread.router import TreadOptions

    register(TreadOptions)


@stune.hookimpl
def register_features(register: Any) -> None:
    from stune_tread.router import Tread

    register(Tread)


@stune.hookimpl
def route_tokens(transformer: Any, layout: Any, features: dict[str, Any]) -> None:
    from stune_tread.router import Tread

    router = features.get(Tread.name)
    if router is not None:
        router.install(transformer, layout)
