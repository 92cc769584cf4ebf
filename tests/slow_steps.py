"""Test plugin: makes every training step slow, and can stall inside a checkpoint write.

Used by the SIGKILL tests so a run can be killed at a chosen moment. Controlled by environment
variables so the same file serves both tests:

* ``STUNE_TEST_STEP_SLEEP``: seconds to sleep after each optimizer step.
* ``STUNE_TEST_STALL_SAVE_AT``: step whose checkpoint write stalls (after the adapter is written)
  until the process is killed; ``STUNE_TEST_STALL_FLAG`` is touched when it starts stalling.
* ``STUNE_TEST_STALL_CAPTIONS``: stall after this many caption batches were encoded (caching).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import stune


@stune.hookimpl
def on_step_end(state: Any) -> None:
    time.sleep(float(os.environ.get("STUNE_TEST_STEP_SLEEP", "0")))


@stune.hookimpl(wrapper=True)
def save_adapter(output_dir: Path) -> Any:
    files = yield
    stall_at = os.environ.get("STUNE_TEST_STALL_SAVE_AT")
    if stall_at and output_dir.name.startswith(f".checkpoint-{stall_at}.tmp"):
        Path(os.environ["STUNE_TEST_STALL_FLAG"]).touch()
        time.sleep(600)
    return files


_encoded_batches = 0


@stune.hookimpl(wrapper=True)
def encode_text(prompts: list[str]) -> Any:
    global _encoded_batches
    result = yield
    _encoded_batches += 1
    stall_after = os.environ.get("STUNE_TEST_STALL_CAPTIONS")
    if stall_after and _encoded_batches >= int(stall_after):
        time.sleep(1.0)  # let the background writer finish what it was given
        Path(os.environ["STUNE_TEST_STALL_FLAG"]).touch()
        time.sleep(600)
    return result
