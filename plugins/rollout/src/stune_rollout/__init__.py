"""stune-rollout: scheduled sampling (rollouts that reduce exposure bias), batched.

This module only registers; torch is imported by the feature's methods when a run uses them.
"""

from __future__ import annotations

from typing import Any

import stune


@stune.hookimpl
def register_options(register: Any) -> None:
    from stune_rollout.options import RolloutOptions

    register(RolloutOptions)


@stune.hookimpl
def register_features(register: Any) -> None:
    from stune_rollout.feature import ScheduledSampling

    register(ScheduledSampling)


@stune.hookimpl
def check_config(config: Any) -> None:
    # The feature checks itself when it is on; this catches rollout options set while it is off.
    from stune_rollout.options import check_options

    if not config.scheduled_sampling_max_step_offset:
        check_options(config)
