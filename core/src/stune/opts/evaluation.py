"""Evaluation loss: the flow-matching loss on held-out (``dataset_type: eval``) images, with fixed
noise and σ so that the number is comparable from one evaluation to the next."""

from __future__ import annotations

from stune.options import Field, Options


class EvaluationOptions(Options):
    eval_steps_interval: int | None = Field(
        None,
        ge=0,
        description="Compute the eval loss every N optimizer steps (none or 0: only at the end, if there are "
        "eval datasets).",
    )
    eval_timesteps: int = Field(
        28, gt=0, description="σ values the eval loss is averaged over (the scheduler's inference schedule)."
    )
    num_eval_images: int = Field(4, gt=0, description="Eval images the eval loss uses (the first N, in path order).")
    eval_dataset_id: str | None = Field(None, description="Use only this eval dataset (default: every eval dataset).")
    eval_loss_disable: bool = Field(False, description="Never compute the eval loss, even with eval datasets.")
