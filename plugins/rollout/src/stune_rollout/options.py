"""Scheduled-sampling options, named and defaulted as SimpleTuner names them (``scheduled_sampling_*``).

Torch-free: registering them must keep ``st-train --help`` light.
"""

from __future__ import annotations

from typing import Any, Literal

from stune.errors import ConfigError
from stune.options import Field, Options

#: training timesteps per unit of σ: an offset of k starts the rollout k/1000 closer to pure noise
TRAIN_TIMESTEPS = 1000


class RolloutOptions(Options):
    scheduled_sampling_max_step_offset: int = Field(
        0,
        ge=0,
        le=TRAIN_TIMESTEPS,
        description="Largest rollout, in training timesteps (of 1000): each rolled-out sample starts up to this many "
        "timesteps noisier and the model takes one Euler step per timestep; 0 turns scheduled sampling off.",
    )
    scheduled_sampling_probability: float = Field(
        0.0, ge=0, le=1, description="Chance that a sample is rolled out (used when no ramp is set)."
    )
    scheduled_sampling_strategy: Literal["uniform", "biased_early", "biased_late"] = Field(
        "uniform",
        description="How the offset k is drawn in [0, max]: uniform; biased_early round(u²·max) favours short "
        "rollouts; biased_late round((1−u²)·max) favours long ones.",
    )
    scheduled_sampling_prob_start: float = Field(
        0.0, ge=0, le=1, description="Rollout probability at the start of the ramp."
    )
    scheduled_sampling_prob_end: float = Field(
        0.5, ge=0, le=1, description="Rollout probability at the end of the ramp."
    )
    scheduled_sampling_ramp_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps over which the probability goes from prob_start to prob_end (0: no ramp, "
        "scheduled_sampling_probability applies throughout).",
    )
    scheduled_sampling_start_step: int = Field(
        0, ge=0, description="Optimizer step at which the ramp starts (prob_start before it)."
    )
    scheduled_sampling_ramp_shape: Literal["linear", "cosine"] = Field("linear", description="Shape of the ramp.")
    scheduled_sampling_sampler: Literal["unipc", "euler", "dpm", "rk4"] = Field(
        "unipc",
        description="Solver for ε/v-prediction models. Every stune family is a flow-matching model, whose rollouts "
        "always take Euler steps (as in SimpleTuner), so this option does not change them.",
    )
    scheduled_sampling_order: int = Field(
        2, ge=1, description="Solver order for ε/v-prediction models (not used by flow-matching rollouts)."
    )
    scheduled_sampling_reflexflow: bool | None = Field(
        None,
        description="ReflexFlow on rolled-out samples: loss re-weighting by the exposure bias plus an anti-drift "
        "term. Unset: on whenever scheduled sampling is on (all stune families are flow-matching models).",
    )
    scheduled_sampling_reflexflow_alpha: float = Field(
        1.0,
        ge=0,
        description="ReflexFlow: how strongly the exposure bias re-weights the loss (frequency compensation).",
    )
    scheduled_sampling_reflexflow_beta1: float = Field(
        10.0, ge=0, description="ReflexFlow: weight of the anti-drift (direction) term."
    )
    scheduled_sampling_reflexflow_beta2: float = Field(
        1.0, ge=0, description="ReflexFlow: scale of the re-weighted flow-matching loss of rolled-out samples."
    )


RAMP = ("scheduled_sampling_prob_start", "scheduled_sampling_prob_end", "scheduled_sampling_start_step")
INERT = ("scheduled_sampling_sampler", "scheduled_sampling_order")
REFLEXFLOW = (
    "scheduled_sampling_reflexflow_alpha",
    "scheduled_sampling_reflexflow_beta1",
    "scheduled_sampling_reflexflow_beta2",
)


def _changed(config: Any, key: str) -> bool:
    """Set to something other than its default (a full SimpleTuner config dump repeats every default)."""
    return bool(getattr(config, key) != RolloutOptions.model_fields[key].default)


def check_options(config: Any) -> None:
    """Refuse combinations of scheduled-sampling options that cannot mean what the user wants."""
    if config.scheduled_sampling_max_step_offset == 0:
        # Options that ask for rollouts; turning ReflexFlow off or naming a solver asks for nothing.
        asking = [k for k in RolloutOptions.model_fields if k not in INERT and _changed(config, k)]
        if config.scheduled_sampling_reflexflow is False:
            asking.remove("scheduled_sampling_reflexflow")
        if asking:
            raise ConfigError(
                f"`{asking[0]}` does nothing while scheduled_sampling_max_step_offset is 0; set "
                "scheduled_sampling_max_step_offset to the longest rollout you want (e.g. 4), or remove it."
            )
        return
    ramp = config.scheduled_sampling_ramp_steps > 0
    if ramp and _changed(config, "scheduled_sampling_probability"):
        raise ConfigError(
            "scheduled_sampling_probability and the ramp (scheduled_sampling_ramp_steps > 0) both set the rollout "
            "probability; set the ramp's scheduled_sampling_prob_start/prob_end, or scheduled_sampling_ramp_steps 0."
        )
    unused = [k for k in (*RAMP, "scheduled_sampling_ramp_shape") if _changed(config, k)]
    if not ramp and unused:
        raise ConfigError(
            f"`{unused[0]}` only acts during the probability ramp; set scheduled_sampling_ramp_steps above 0, or "
            "use scheduled_sampling_probability alone."
        )
    unused = [k for k in REFLEXFLOW if _changed(config, k)]
    if config.scheduled_sampling_reflexflow is False and unused:
        raise ConfigError(
            f"`{unused[0]}` does nothing with scheduled_sampling_reflexflow=false; remove it, or turn ReflexFlow on."
        )
