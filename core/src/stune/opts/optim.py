"""The optimizer, its learning-rate schedule and gradient clipping."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from stune.options import Field, Options

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


class OptimizerOptions(Options):
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["torch-adamw", "adamw"] = Field("torch-adamw", description="Optimizer (torch AdamW).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        "constant_with_warmup", description="Learning-rate schedule."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_num_cycles: int = Field(1, ge=1, description="Cycles of cosine_with_restarts.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    max_grad_norm: float = Field(2.0, ge=0, description="Gradient clipping threshold; 0 disables.")
    grad_clip_method: Literal["value", "norm"] = Field(
        "value", description="value: clamp each gradient element; norm: scale by the global norm."
    )

    @model_validator(mode="after")
    def _schedule(self) -> OptimizerOptions:
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("`lr_scheduler` constant ignores lr_warmup_steps; use constant_with_warmup")
        return self
