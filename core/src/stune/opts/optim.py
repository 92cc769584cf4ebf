"""The optimizer, its learning-rate schedule and gradient clipping."""

from __future__ import annotations

import ast
from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.options import Field, Options

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "sine",
)
OPTIMIZERS = (
    "torch-adamw",
    "adamw",
    "adamw_bf16",
    "optimi-adamw",
    "optimi-lion",
    "optimi-stableadamw",
    "prodigy",
    "bnb-adamw8bit",
    "bnb-lion8bit",
    "bnb-lion8bit-paged",
)


def parse_optimizer_config(text: str) -> dict[str, Any]:
    """``"weight_decay=0.1, betas=(0.9, 0.99)"`` → {"weight_decay": 0.1, "betas": (0.9, 0.99)}."""
    out: dict[str, Any] = {}
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):  # split on commas outside brackets
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in (p.strip() for p in parts):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"`optimizer_config` entry {part!r} is not key=value")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())
        out[key.strip()] = value
    return out


class OptimizerOptions(Options):
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (prodigy: 1.0 is usual).")
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "torch-adamw",
        description="torch-adamw, adamw_bf16 (bf16 weights, Kahan-summed), optimi-adamw/-lion/-stableadamw, "
        "prodigy, bnb-adamw8bit/-lion8bit/-lion8bit-paged (CUDA).",
    )
    optimizer_config: str | None = Field(
        None, description="Overrides for the optimizer, `key=value,...` (e.g. `weight_decay=0.1,betas=(0.9,0.99)`)."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="First beta of Adam-type optimizers.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Second beta of Adam-type optimizers.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="Weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        "constant_with_warmup", description="Learning-rate schedule."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_num_cycles: int = Field(1, ge=1, description="Cycles of cosine_with_restarts and sine.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    lr_end: float = Field(4e-7, ge=0, description="Final learning rate of the polynomial schedule.")
    max_grad_norm: float = Field(2.0, ge=0, description="Gradient clipping threshold; 0 disables.")
    grad_clip_method: Literal["value", "norm"] = Field(
        "value", description="value: clamp each gradient element; norm: scale by the global norm."
    )

    @field_validator("optimizer_config", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return ",".join(f"{k}={v!r}" for k, v in value.items())
        if isinstance(value, str):
            parse_optimizer_config(value)
        return value

    @model_validator(mode="after")
    def _schedule(self) -> OptimizerOptions:
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("`lr_scheduler` constant ignores lr_warmup_steps; use constant_with_warmup")
        if self.lr_scheduler == "polynomial" and self.lr_end >= self.learning_rate:
            raise ValueError("`lr_end` must be below learning_rate for the polynomial schedule")
        return self

    @property
    def optimizer_overrides(self) -> dict[str, Any]:
        return parse_optimizer_config(self.optimizer_config) if self.optimizer_config else {}
