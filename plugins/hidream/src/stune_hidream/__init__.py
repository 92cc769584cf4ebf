"""stune-hidream: the HiDream-I1 model family. This module only registers; nothing heavy is imported."""

from __future__ import annotations

from typing import Any

import stune


@stune.hookimpl
def register_options(register: Any) -> None:
    from stune_hidream.options import HiDreamOptions

    register(HiDreamOptions)


@stune.hookimpl
def register_families(register: Any) -> None:
    from stune_hidream.family import HiDreamFamily

    register(HiDreamFamily)
