"""Test plugin: every optimizer step sleeps ``STUNE_TEST_STEP_SLEEP`` seconds, so a run can be killed mid-way."""

from __future__ import annotations

import os
import time
from typing import Any

import stune


@stune.hookimpl
def on_step_end(state: Any) -> None:
    time.sleep(float(os.environ.get("STUNE_TEST_STEP_SLEEP", "0")))
