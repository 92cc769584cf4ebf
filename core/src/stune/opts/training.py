"""How long and how big the run is, where it writes, and its checkpoints."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.options import AliasChoices, Field, Options

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_disk_threshold(text: str) -> tuple[int, float | None]:
    """``"10G"`` → (10 GiB in bytes, None); ``"5%"`` → (0, 5.0); ``"1048576"`` → bytes as given.

    Units K, M, G, T are powers of 1024 (an optional trailing ``B``/``iB`` is accepted).
    """
    value = str(text).strip().upper()
    if value.endswith("%"):
        percent = float(value[:-1])
        if not 0 < percent < 100:
            raise ValueError(f"disk_low_threshold {text!r}: a percentage must be between 0 and 100")
        return 0, percent
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", value)
    if not match:
        raise ValueError(f"disk_low_threshold {text!r} is not a size such as 10G, 500M, 1048576 or 5%")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)]), None


class TrainingOptions(Options):
    output_dir: str = Field("output", description="Where the adapter, checkpoints and images go.")
    seed: int | None = Field(None, description="Random seed; a fixed seed makes runs repeatable.")
    train_batch_size: int = Field(1, gt=0, description="Samples per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_train_steps: int | None = Field(
        None, ge=0, description="Optimizer steps to train; when set (>0) it overrides num_train_epochs."
    )
    num_train_epochs: int = Field(1, ge=0, description="Epochs to train when max_train_steps is unset.")
    checkpoint_step_interval: int | None = Field(
        500,
        ge=0,
        validation_alias=AliasChoices("checkpoint_step_interval", "checkpointing_steps"),
        description="Write checkpoint-<step>/ every N optimizer steps (0 or none: never).",
    )
    checkpoints_total_limit: int | None = Field(5, ge=1, description="Keep at most N checkpoints (none: all).")
    checkpoint_epoch_interval: int | None = Field(
        None, ge=0, description="Also write checkpoint-<step>/ each time N more epochs are complete (0 or none: never)."
    )
    checkpointing_rolling_steps: int | None = Field(
        0,
        ge=0,
        description="A second series of checkpoints, checkpoint-<step>-rolling/, every N steps with its own "
        "retention (checkpoints_rolling_total_limit); 0: none.",
    )
    checkpoints_rolling_total_limit: int | None = Field(
        1, ge=1, description="Keep at most N rolling checkpoints (none: all); checkpoints_total_limit is separate."
    )
    disk_low_threshold: str | None = Field(
        None,
        description="Before each checkpoint and validation save, free space on output_dir's disk must be at least "
        "this: bytes, or 500M, 10G, 1T (powers of 1024), or a percentage of the disk such as 5%; none: no check.",
    )
    disk_low_action: Literal["stop", "wait", "script"] = Field(
        "stop",
        description="When space is low: stop (end the run cleanly, nothing half-written), wait (check again every "
        "30 s until space returns), script (run disk_low_script, then stop if still low).",
    )
    disk_low_script: str | None = Field(
        None,
        description="Program run when space is low (before the action), with output_dir as its only argument; "
        "it runs without a shell.",
    )
    post_checkpoint_script: str | None = Field(
        None,
        description="Command run (no shell, in the background, main process) after each checkpoint; "
        "{local_checkpoint_path}, {global_step}, {output_dir}, {model_family}, {tracker_run_name} … are filled in.",
    )
    resume_from_checkpoint: str | None = Field(
        "latest", description="`latest`, a checkpoint folder, or none to start fresh."
    )

    @field_validator("disk_low_threshold", mode="before")
    @classmethod
    def _disk_threshold_value(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            parse_disk_threshold(str(value))
            return str(value)
        return value

    @model_validator(mode="after")
    def _disk_low_script_given(self) -> TrainingOptions:
        if self.disk_low_action == "script" and not self.disk_low_script:
            raise ValueError("`disk_low_action` script needs `disk_low_script`, the program to run when space is low")
        return self
