"""Checkpoints are complete or invisible; retention; random state round-trips without pickle."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stune import checkpoint
from stune.errors import ConfigError


def _write(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"x" * 10)


def test_latest_skips_incomplete_and_temporary(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 10, _write, keep=None)
    (tmp_path / "checkpoint-20").mkdir()  # no completion marker: killed mid-write by an older tool
    (tmp_path / ".checkpoint-30.tmp-99999").mkdir()  # our own temporary name
    assert checkpoint.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"


def test_no_checkpoint_means_fresh_start(tmp_path: Path) -> None:
    assert checkpoint.resolve_resume(tmp_path, "latest") is None
    assert checkpoint.resolve_resume(tmp_path, "none") is None


def test_explicit_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, "checkpoint-5")


def test_retention_keeps_newest_and_cleans_stale_temporaries(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint-3.tmp-1").mkdir()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, _write, keep=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [3, 4]
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_rng_state_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = checkpoint.capture_rng()
    checkpoint.write_state(tmp_path, {"rng": state})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    checkpoint.restore_rng(checkpoint.read_state(tmp_path)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
