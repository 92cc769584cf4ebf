"""stune-sd3: the Stable Diffusion 3 / 3.5 family. This module only registers; nothing heavy is imported."""

from __future__ import annotations

from typing import Any

import stune


@stune.hookimpl
def register_options(register: Any) -> None:
    from stune_sd3.options import SD3Options

    register(SD3Options)


@stune.hookimpl
def register_families(register: Any) -> None:
    from stune_sd3.family import SD3Family

    register(SD3Family)
