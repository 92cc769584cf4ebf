"""Free-space guard before checkpoint and validation saves (disk_low_threshold, disk_low_action, disk_low_script).

A checkpoint is written to a temporary folder and renamed into place (stune.checkpoint), so a
full disk can never leave a half checkpoint that ``latest`` would pick; but it still fails the
run half-way through a save. The guard looks at the free space of ``output_dir``'s disk before
anything is written: ``stop`` ends the run with :class:`DiskSpaceLow` (one sentence, exit status
2) before the save starts, ``wait`` checks again every :data:`POLL_SECONDS` until space returns,
and ``disk_low_script`` (a program, run without a shell with ``output_dir`` as its argument) runs
first so it can free space (delete old files, move checkpoints elsewhere).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stune.errors import UserError
from stune.opts.training import parse_disk_threshold

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.distributed import Processes

log = logging.getLogger("stune.disk")

#: seconds between two looks at the free space while disk_low_action is wait
POLL_SECONDS = 30.0
#: the longest disk_low_script may run before it is stopped
SCRIPT_TIMEOUT_SECONDS = 600


class DiskSpaceLow(UserError):
    """Free space fell below disk_low_threshold and disk_low_action is stop (or script, still low)."""


def _gib(size: float) -> str:
    return f"{size / 1024**3:.2f} GiB"


def _existing(path: Path) -> Path:
    """The nearest existing folder of ``path`` (output_dir may not exist before the first save)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def shortfall(config: CoreOptions, output_dir: Path) -> str | None:
    """Why space is low now (``"1.20 GiB free, below 10G"``), or None when there is enough."""
    if not config.disk_low_threshold:
        return None
    usage = shutil.disk_usage(_existing(output_dir))
    needed, percent = parse_disk_threshold(config.disk_low_threshold)
    if percent is not None:
        needed = int(usage.total * percent / 100)
    if usage.free >= needed:
        return None
    return f"{_gib(usage.free)} free on the disk of {output_dir}, below disk_low_threshold {config.disk_low_threshold}"


def _run_script(script: str, output_dir: Path) -> None:
    log.warning("disk space low: running disk_low_script %s %s", script, output_dir)
    try:
        done = subprocess.run(
            [script, str(output_dir)], check=False, timeout=SCRIPT_TIMEOUT_SECONDS, capture_output=True, text=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("disk_low_script %s failed: %s", script, exc)
        return
    if done.returncode != 0:
        log.error("disk_low_script %s exited with %d: %s", script, done.returncode, done.stderr.strip()[-500:])


def ensure_space(
    config: CoreOptions, output_dir: Path, what: str, processes: Processes | None = None, poll: float = POLL_SECONDS
) -> None:
    """Return when there is enough free space to write ``what`` (``"checkpoint-40"``); else act.

    With several processes every one calls this together and they all follow the main process's
    view of the disk, so none is left waiting at a barrier of a save the others skipped.
    """
    if not config.disk_low_threshold:
        return

    def low() -> str | None:
        reason = shortfall(config, output_dir) if processes is None or processes.is_main else None
        return reason if processes is None else processes.gather(reason)[0]

    reason = low()
    if reason is None:
        return
    main = processes is None or processes.is_main
    if config.disk_low_script:
        if main:
            _run_script(config.disk_low_script, output_dir)
        if processes is not None:
            processes.barrier()
        reason = low()
        if reason is None:
            log.info("disk space is back after disk_low_script; writing %s", what)
            return
    if config.disk_low_action == "wait":
        waited = 0.0
        while reason is not None:
            if main:
                log.warning("%s; waiting for space before writing %s (%.0f s so far)", reason, what, waited)
            time.sleep(poll)
            waited += poll
            reason = low()
        log.info("disk space is back; writing %s", what)
        return
    raise DiskSpaceLow(
        f"Stopped before writing {what}: {reason}; nothing was written, so free space and start again "
        "(the run resumes from its last complete checkpoint), or lower disk_low_threshold."
    )
