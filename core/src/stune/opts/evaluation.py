"""Evaluation loss: the flow-matching loss on held-out (``dataset_type: eval``) images, with fixed
noise and σ so that the number is comparable from one evaluation to the next."""

from __future__ import annotations

from typing import Literal

from stune.options import Field, Options


class EvaluationOptions(Options):
    eval_steps_interval: int | None = Field(
        None,
        ge=0,
        description="Compute the eval loss every N optimizer steps (none or 0: only at the end, if there are "
        "eval datasets).",
    )
    eval_epoch_interval: float | None = Field(
        None,
        ge=0,
        description="Also compute the eval loss each time N more epochs are complete; fractions run several times "
        "an epoch (0.5: twice); 0 or none: no.",
    )
    eval_dataset_pooling: bool = Field(
        False,
        description="One eval loss over every eval dataset together; false: each eval dataset also gets its own "
        "eval_loss/<dataset id> (eval_loss stays the mean over all eval images).",
    )
    eval_timesteps: int = Field(
        28, gt=0, description="σ values the eval loss is averaged over (the scheduler's inference schedule)."
    )
    num_eval_images: int = Field(4, gt=0, description="Eval images the eval loss uses (the first N, in path order).")
    eval_dataset_id: str | None = Field(None, description="Use only this eval dataset (default: every eval dataset).")
    evaluation_type: Literal["none", "clip"] = Field(
        "none",
        description="clip: score every validation image against its prompt with CLIP (100 × max(cos, 0)), "
        "logged per prompt and averaged in metrics.jsonl and the trackers.",
    )
    pretrained_evaluation_model_name_or_path: str = Field(
        "openai/clip-vit-large-patch14-336",
        description="The CLIP model (transformers CLIPModel folder or Hub id) evaluation_type clip scores with.",
    )
    eval_loss_disable: bool = Field(False, description="Never compute the eval loss, even with eval datasets.")
