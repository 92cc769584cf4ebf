"""How long and how big the run is, where it writes, and its checkpoints."""

from __future__ import annotations

from stune.options import AliasChoices, Field, Options


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
    resume_from_checkpoint: str | None = Field(
        "latest", description="`latest`, a checkpoint folder, or none to start fresh."
    )
