"""Checkpoints: written whole or not at all, found again by ``resume_from_checkpoint=latest``.

A checkpoint is first written to a hidden temporary folder; a completion marker is written last
and the folder is renamed to ``checkpoint-<step>``. A run killed at any moment therefore leaves
either a complete checkpoint or a temporary folder that ``latest`` ignores (and that the next
save removes).

Contents: the adapter in its loadable format (through the ``save_adapter`` hook), and
``training_state.pt`` (optimizer, LR scheduler, random generators) read back with
``torch.load(weights_only=True)``: no pickled code is ever executed on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stune.distributed import Processes
from stune.errors import ConfigError

PREFIX = "checkpoint-"
MARKER = "checkpoint_complete.json"
STATE_FILE = "training_state.pt"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            match = _NAME.match(child.name)
            if match and (child / MARKER).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (or none if there is none), a folder, or None."""
    if value is None or value.lower() in ("none", "false", ""):
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = output_dir / value
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"resume_from_checkpoint {value!r} is not a complete checkpoint folder; use `latest` or a checkpoint-<step> path."
        )
    return path


def save(
    output_dir: Path,
    step: int,
    write: Callable[[Path], None],
    keep: int | None,
    processes: Processes | None = None,
    write_each: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint, mark it complete, move it into place, prune old ones.

    ``write(folder)`` runs on the main process (adapter, optimizer, counters); ``write_each``
    runs on every process (its own random state). All processes call this together.
    """
    processes = processes or Processes()
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if processes.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    processes.barrier()
    if write_each is not None:
        write_each(tmp)
    processes.barrier()
    if processes.is_main:
        write(tmp)
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "time": time.time(), "files": sorted(os.listdir(tmp))}))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. the last step after an interval save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        _prune(output_dir, keep)
    processes.barrier()
    return final


def _prune(output_dir: Path, keep: int | None) -> None:
    for stale in output_dir.glob(f".{PREFIX}*.tmp*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return
    found = complete_checkpoints(output_dir)
    for _, folder in found[: max(0, len(found) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- random state ------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_state(folder: Path, state: dict[str, Any], name: str = STATE_FILE) -> None:
    torch.save(state, folder / name)


def read_state(folder: Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    """A state file of a checkpoint (None if absent), loaded without executing pickled code."""
    if not (folder / name).is_file():
        return None
    data: dict[str, Any] = torch.load(folder / name, map_location="cpu", weights_only=True)
    return data


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"
