"""An exponential moving average of the trained weights."""

from __future__ import annotations

from typing import Literal

from stune.options import Field, Options


class EMAOptions(Options):
    use_ema: bool = Field(False, description="Keep an exponential moving average of the trained weights.")
    ema_decay: float = Field(0.995, gt=0, lt=1, description="EMA decay per update (closer to 1: slower).")
    ema_update_interval: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    ema_warmup_steps: int = Field(
        0,
        ge=0,
        description="Ramp the decay linearly from 0 to ema_decay over the first N optimizer steps, so the average "
        "does not stay anchored to the starting weights; 0: the full decay from step 1.",
    )
    ema_device: Literal["cpu", "accelerator"] = Field(
        "cpu", description="Where the EMA copy lives (cpu saves accelerator memory)."
    )
    ema_validation: Literal["none", "ema_only", "comparison"] = Field(
        "comparison", description="Validation images of the EMA weights: none, instead of, or beside the trained ones."
    )
