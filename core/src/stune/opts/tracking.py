"""Experiment trackers (metrics.jsonl is always written)."""

from __future__ import annotations

from typing import Literal

from stune.options import Field, Options


class TrackingOptions(Options):
    report_to: Literal["none"] = Field("none", description="Trackers to send metrics and images to.")
