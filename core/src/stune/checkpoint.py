"""Checkpoints: written whole or not at all, found again by ``resume_from_checkpoint=latest``.

A checkpoint is first written to a hidden temporary folder; a completion marker is written last
and the folder is renamed to ``checkpoint-<step>``. A run killed at any moment therefore leaves
either a complete checkpoint or a temporary folder that ``latest`` ignores (and that the next
save removes). The marker holds the SHA-256 of every file: a checkpoint damaged afterwards (a
truncated copy, a flipped bit) is named, and ``latest`` falls back to the newest sound one.

Contents: the adapter in its loadable format (through the ``save_adapter`` hook), and
``training_state.pt`` (optimizer, LR scheduler, random generators) read back with
``torch.load(weights_only=True)``: no pickled code is ever executed on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
#: suffix of the rolling series (checkpointing_rolling_steps), kept apart by its own limit
ROLLING = "-rolling"
MARKER = "checkpoint_complete.json"
STATE_FILE = "training_state.pt"
log = logging.getLogger("stune.train")
_NAME = re.compile(rf"^{PREFIX}(\d+)({ROLLING})?$")


def complete_checkpoints(output_dir: Path, rolling: bool | None = False) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first: the regular series, the rolling
    one (``rolling=True``) or both (``None``; at an equal step the regular one comes last)."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            match = _NAME.match(child.name)
            if match and (rolling is None or bool(match.group(2)) == rolling) and (child / MARKER).is_file():
                found.append((int(match.group(1)), not match.group(2), child))
    return [(step, folder) for step, _, folder in sorted(found)]


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (or none if there is none), a folder, or None."""
    if value is None or value.lower() in ("none", "false", ""):
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir, rolling=None)
        damaged = []
        for _, folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            log.warning("checkpoint %s is damaged (%s); resuming from an earlier one", folder, problem)
            damaged.append(f"{folder.name}: {problem}")
        if damaged:
            raise ConfigError(
                f"Every checkpoint in {output_dir} is damaged ({damaged[0]}); remove them, or set "
                "resume_from_checkpoint none to start over."
            )
        return None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = output_dir / value
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"resume_from_checkpoint {value!r} is not a complete checkpoint folder; use `latest` or a checkpoint-<step> path."
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(
            f"resume_from_checkpoint {value!r} is damaged ({problem}); resume from another checkpoint or `latest`."
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_problem(folder: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted any more (a file missing, changed or cut short
    since it was written), or None. Checkpoints written before checksums are taken as they are."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"its {MARKER} cannot be read: {exc}"
    expected = marker.get("sha256") if isinstance(marker, dict) else None
    if not isinstance(expected, dict):
        return None if isinstance(marker, dict) else f"its {MARKER} is not an object"
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} differs from what was written (truncated or corrupted)"
    return None


def save(
    output_dir: Path,
    step: int,
    write: Callable[[Path], None],
    keep: int | None,
    processes: Processes | None = None,
    write_each: Callable[[Path], None] | None = None,
    rolling: bool = False,
) -> Path:
    """Write a checkpoint, mark it complete, move it into place, prune old ones.

    ``write(folder)`` runs on the main process (adapter, optimizer, counters); ``write_each``
    runs on every process (its own random state). All processes call this together.
    ``rolling``: a checkpoint of the rolling series, ``checkpoint-<step>-rolling``, pruned to
    ``keep`` among rolling ones only.
    """
    processes = processes or Processes()
    name = f"{PREFIX}{step}{ROLLING if rolling else ''}"
    final = output_dir / name
    tmp = output_dir / f".{name}.tmp"
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
        sums = _checksums(tmp)
        marker.write_text(
            json.dumps({"step": step, "time": time.time(), "files": sorted(os.listdir(tmp)), "sha256": sums})
        )
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. the last step after an interval save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        _prune(output_dir, keep, rolling)
    processes.barrier()
    return final


def _prune(output_dir: Path, keep: int | None, rolling: bool = False) -> None:
    for stale in output_dir.glob(f".{PREFIX}*.tmp*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return
    found = complete_checkpoints(output_dir, rolling)
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
    try:
        data: dict[str, Any] = torch.load(folder / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # cut short or damaged (a checkpoint from before checksums)
        raise ConfigError(
            f"The checkpoint file {folder / name} cannot be read ({type(exc).__name__}); resume from another "
            "checkpoint (resume_from_checkpoint), or remove this one."
        ) from None
    return data


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"
