"""stune-flux: the FLUX.1 model family. This module only registers; nothing heavy is imported."""

from __future__ import annotations

from typing import Any

import stune


@stune.hookimpl
def register_options(register: Any) -> None:
    from stune_flux.options import FluxOptions

    register(FluxOptions)


@stune.hookimpl
def register_families(register: Any) -> None:
    from stune_flux.family import FluxFamily

    register(FluxFamily)
