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
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_optimizer_config(text: str) -> dict[str, Any]:
    """``"weight_decay=0.1, betas=(0.9, 0.99)"`` → {"weight_decay": 0.1, "betas": (0.9, 0.99)}.

    Values are Python literals (numbers, tuples, ``True``/``true``, ``None``/``none``); anything
    else is kept as a string. Commas inside brackets do not split entries.
    """
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
        raw = raw.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = _WORDS.get(raw.lower(), raw)
        if key.strip() == "betas" and not (
            isinstance(value, tuple | list) and all(isinstance(b, int | float) for b in value)
        ):
            raise ValueError(f"`optimizer_config` betas must be a tuple such as betas=(0.9,0.99), not {raw!r}")
        out[key.strip()] = value
    return out


class OptimizerOptions(Options):
    learning_rate: float = Field(
        1e-4, gt=0, description="Peak learning rate; prodigy scales its own estimate by it (1.0 unless set)."
    )
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "torch-adamw",
        description="torch-adamw (alias adamw), adamw_bf16 (bf16 weights, Kahan-summed), "
        "optimi-adamw/-lion/-stableadamw, prodigy, bnb-adamw8bit/-lion8bit/-lion8bit-paged (bitsandbytes; on a CPU from 0.50).",
    )
    optimizer_config: str | None = Field(
        None,
        description="Overrides for the optimizer, `key=value,...` (e.g. `weight_decay=0.1,betas=(0.9,0.99)`); "
        "they win over every other option.",
    )
    optimizer_beta1: float | None = Field(
        None, ge=0, lt=1, description="First beta for any optimizer (wins over adam_beta1)."
    )
    optimizer_beta2: float | None = Field(
        None, ge=0, lt=1, description="Second beta for any optimizer (wins over adam_beta2)."
    )
    adam_beta1: float | None = Field(
        None, ge=0, lt=1, description="First beta; default: the optimizer's own (SimpleTuner's defaults, 0.9)."
    )
    adam_beta2: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Second beta; default: the optimizer's own (0.999 for torch-adamw, adamw_bf16 and "
        "bnb-adamw8bit, 0.99 for the others).",
    )
    adam_weight_decay: float | None = Field(
        None,
        ge=0,
        description="Weight decay; default: the optimizer's own (0.01; 0 for optimi-adamw, Lion and prodigy).",
    )
    adam_epsilon: float | None = Field(
        None,
        gt=0,
        description="Epsilon; default: the optimizer's own (1e-8 for torch-adamw and prodigy, else 1e-6).",
    )
    prodigy_steps: int | None = Field(
        None,
        ge=0,
        description="Steps over which prodigy adapts its step size, then keeps it; default 25% of the run, "
        "0 never stops.",
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        "constant_with_warmup",
        description="Learning-rate schedule after the warm-up; sine: waves between learning_rate and lr_end.",
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_scale: bool = Field(
        False,
        description="Multiply learning_rate by train_batch_size × gradient_accumulation_steps × processes.",
    )
    lr_scale_sqrt: bool = Field(
        False, description="With lr_scale: multiply by the square root of that product instead."
    )
    lr_num_cycles: int = Field(1, ge=1, description="Cycles of cosine_with_restarts and sine.")
    lr_power: float = Field(0.8, gt=0, description="Power of the polynomial schedule.")
    lr_end: float = Field(4e-7, ge=0, description="Final learning rate of polynomial; lowest of sine.")
    max_grad_norm: float = Field(
        2.0, ge=0, description="Gradient clipping threshold; 0 disables (never clipped: optimi-stableadamw, prodigy)."
    )
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
        if self.optimizer == "prodigy" and "learning_rate" not in self.model_fields_set:
            self.learning_rate = 1.0  # Prodigy finds the step size itself; lr only scales it
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("`lr_scheduler` constant ignores lr_warmup_steps; use constant_with_warmup")
        if self.lr_scheduler in ("polynomial", "sine") and self.lr_end >= self.learning_rate:
            raise ValueError(f"`lr_end` must be below learning_rate for the {self.lr_scheduler} schedule")
        return self

    @property
    def optimizer_overrides(self) -> dict[str, Any]:
        return parse_optimizer_config(self.optimizer_config) if self.optimizer_config else {}
