"""Training state: what a checkpoint records and observers receive."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Counters of a run. ``global_step`` counts optimizer steps; ``epoch`` is 0-based;
    ``batches_in_epoch`` counts micro-batches consumed in the current epoch (for exact resume)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    max_train_steps: int = 0
    output_dir: Path = field(default_factory=Path)
    is_main_process: bool = True

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data

    def restore(self, data: dict[str, Any]) -> None:
        self.global_step = int(data["global_step"])
        self.epoch = int(data["epoch"])
        self.batches_in_epoch = int(data["batches_in_epoch"])
