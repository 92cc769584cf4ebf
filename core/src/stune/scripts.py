"""User commands run at fixed points of a run: SimpleTuner's ``post_checkpoint_script`` (after each
checkpoint) and ``post_upload_script`` (after each upload: the Hub, publishing_config providers).

The command is split with :mod:`shlex` and started without a shell, on the main process only, in
the background: a slow or failing script never holds up or stops training (its exit status is
logged). Placeholders in braces are filled in; an unknown one stays as written.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("stune.scripts")

#: placeholder → what it holds (documented in the options' descriptions)
PLACEHOLDERS = (
    "local_checkpoint_path",
    "global_step",
    "output_dir",
    "tracker_project_name",
    "tracker_run_name",
    "model_family",
    "model_type",
    "lora_type",
    "huggingface_path",
    "remote_checkpoint_path",
)
_running: list[threading.Thread] = []


class _Values(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def values(config: Any, **given: Any) -> dict[str, str]:
    out = {
        "output_dir": str(config.output_dir),
        "tracker_project_name": str(getattr(config, "tracker_project_name", "") or ""),
        "tracker_run_name": str(getattr(config, "tracker_run_name", "") or ""),
        "model_family": str(config.model_family or ""),
        "model_type": str(config.model_type),
        "lora_type": str(config.lora_type),
    }
    out.update({k: str(v) for k, v in given.items()})
    return out


def start(option: str, template: str, placeholders: dict[str, str], cwd: Path | None = None) -> threading.Thread:
    """Run ``template`` with its placeholders filled, in the background; returns the watching thread."""
    args = [part.format_map(_Values(placeholders)) for part in shlex.split(template)]

    def watch() -> None:
        try:
            done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
        except OSError as exc:
            log.warning("%s %r could not start: %s", option, args[0], exc)
            return
        if done.returncode:
            log.warning("%s exited with status %d: %s", option, done.returncode, done.stderr.strip()[-500:])
        else:
            log.info("%s finished: %s", option, " ".join(args))

    thread = threading.Thread(target=watch, name=option, daemon=True)
    thread.start()
    _running.append(thread)
    return thread


def wait_all(timeout: float | None = None) -> None:
    """Let started scripts finish (the end of a run waits for them, so their output is complete)."""
    while _running:
        _running.pop().join(timeout)
