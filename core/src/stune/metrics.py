"""``metrics.jsonl``: one JSON object per optimizer step, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, output_dir: Path, resume_step: int) -> None:
        self.path = output_dir / "metrics.jsonl"
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume_step >= 0:
            # Drop lines past the resumed step: they belong to the interrupted run's lost steps.
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def append_record(output_dir: Path, record: dict[str, Any]) -> None:
    """One more line for ``metrics.jsonl`` from outside the training loop (validation's CLIP scores)."""
    with (output_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
