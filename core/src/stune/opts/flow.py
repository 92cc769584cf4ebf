"""The flow-matching noise schedule: how σ is drawn for each training sample."""

from __future__ import annotations

from pydantic import model_validator

from stune.options import Field, Options


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

    @model_validator(mode="after")
    def _shift(self) -> FlowOptions:
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
