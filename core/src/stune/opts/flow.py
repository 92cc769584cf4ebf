"""The flow-matching noise schedule: how σ is drawn for each training sample."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.options import Field, Options, json_list


class FlowOptions(Options):
    flow_schedule_shift: float = Field(3.0, ge=0, description="Static sigma shift s: s·σ/(1+(s−1)·σ); 0 disables.")
    flow_schedule_auto_shift: bool = Field(
        False, description="Resolution-dependent shift from the scheduler's base/max shift (replaces the static one)."
    )
    flow_sigmoid_scale: float = Field(1.0, gt=0, description="σ = sigmoid(scale·N(0,1)) before the shift.")
    flow_use_uniform_schedule: bool = Field(False, description="σ ~ U(0, 1) (then shifted) instead of logit-normal.")
    flow_use_beta_schedule: bool = Field(
        False, description="σ ~ Beta(alpha, beta) (then shifted) instead of logit-normal."
    )
    flow_beta_schedule_alpha: float = Field(2.0, gt=0, description="alpha of the Beta schedule.")
    flow_beta_schedule_beta: float = Field(2.0, gt=0, description="beta of the Beta schedule.")
    flow_custom_timesteps: list[float] | None = Field(
        None,
        description="Draw each sample's σ uniformly from this list instead of a distribution (no shift applied; "
        "values above 1 are timesteps out of 1000); also replaces a family's own schedule.",
    )
    flow_cubic_schedule_weights: list[float] | None = Field(
        None,
        description="Draw σ from this density instead of logit-normal: the weights sit at evenly spaced σ from 0 "
        "to 1 and are joined by a monotone cubic (PCHIP) curve; the draw is then shifted.",
    )
    loss_type: Literal["l2", "huber", "smooth_l1"] = Field(
        "l2",
        description="l2: squared error; huber: pseudo-Huber 2c(sqrt(e²+c²)−c); smooth_l1: 2(sqrt(e²+c²)−c), "
        "with e the velocity error and c from huber_c and huber_schedule.",
    )
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr",
        description="c over σ for huber/smooth_l1: constant: huber_c; exponential: huber_c^σ (1 clean, huber_c at "
        "pure noise); snr: huber_c + (1−huber_c)(1−σ)² (1 clean, huber_c at pure noise).",
    )
    huber_c: float = Field(
        0.1, gt=0, le=1, description="Where huber/smooth_l1 turn from squared to linear error (the value at σ=1)."
    )

    @field_validator("flow_custom_timesteps", mode="before")
    @classmethod
    def _timesteps(cls, value: Any) -> Any:
        value = json_list(value)
        if isinstance(value, list) and not value:
            raise ValueError("the list is empty; give σ values (0–1] or timesteps (1–1000], or remove it")
        if isinstance(value, list) and any(not 0 < float(v) <= 1000 for v in value):
            raise ValueError("values must be σ in (0, 1] or timesteps in (1, 1000]")
        return value

    @field_validator("flow_cubic_schedule_weights", mode="before")
    @classmethod
    def _cubic(cls, value: Any) -> Any:
        value = json_list(value)
        if isinstance(value, list):
            numbers = [n for n in (_weight(v) for v in value) if n is not None]
            if len(numbers) != len(value) or len(numbers) < 2 or min(numbers) < 0 or not any(numbers):
                raise ValueError(
                    "give at least two finite weights ≥ 0, not all 0 (the density at evenly spaced σ from 0 to 1)"
                )
            return numbers
        return value

    @model_validator(mode="after")
    def _shift(self) -> FlowOptions:
        if self.flow_cubic_schedule_weights and (self.flow_use_uniform_schedule or self.flow_use_beta_schedule):
            raise ValueError(
                "`flow_cubic_schedule_weights` replaces the uniform or beta schedule; turn "
                "flow_use_uniform_schedule / flow_use_beta_schedule off or remove the weights"
            )
        if self.flow_use_uniform_schedule and self.flow_use_beta_schedule:
            raise ValueError("`flow_use_uniform_schedule` and `flow_use_beta_schedule` exclude each other; keep one")
        if (
            self.flow_schedule_auto_shift
            and "flow_schedule_shift" in self.model_fields_set
            and self.flow_schedule_shift > 0
        ):
            raise ValueError(
                "`flow_schedule_auto_shift` replaces `flow_schedule_shift`; remove flow_schedule_shift "
                "or set it to 0, or turn auto shift off"
            )
        return self


def _weight(value: Any) -> float | None:
    """A finite number given as a number or as text ("1,2,1" on the command line), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
