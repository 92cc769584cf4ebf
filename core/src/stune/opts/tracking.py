"""Experiment trackers (``metrics.jsonl`` in the output folder is always written)."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from stune.options import Field, Options, json_list

TRACKERS = ("tensorboard", "wandb")
# SimpleTuner's own tracker is a local JSONL log: stune always writes one (metrics.jsonl).
_LOCAL_ONLY = ("none", "simpletuner")
_UNSUPPORTED = ("swanlab", "comet_ml", "custom-tracker")


class TrackingOptions(Options):
    report_to: str = Field(
        "none",
        description="Trackers for metrics and validation images: none, tensorboard, wandb, all, "
        "or a comma list (tensorboard,wandb).",
    )
    tracker_project_name: str = Field("stune", min_length=1, description="Project name (wandb project).")
    tracker_run_name: str | None = Field(
        None, description="Run name in the trackers; default: the output folder's name and the start time."
    )
    logging_dir: str = Field(
        "logs", description="Tracker files (tensorboard events, wandb run), relative to output_dir unless absolute."
    )

    webhook_config: str | dict[str, Any] | list[dict[str, Any]] | None = Field(
        None,
        description="Webhooks for progress, validation images and previews, errors and the end of training: "
        'a JSON file or an object/list of {"webhook_url", "webhook_type": raw|discord, "message_prefix", '
        '"log_level", "timeout", "retries"} (docs/tracking.md).',
    )
    webhook_reporting_interval: int | None = Field(
        None, ge=1, description="Post a progress message (step, loss, lr) to the webhooks every N steps."
    )

    @field_validator("webhook_config")
    @classmethod
    def _webhook_config(cls, value: Any) -> Any:
        from stune.webhooks import parse_webhook_config

        parse_webhook_config(value)  # a bad URL or file stops the run before anything is loaded
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> str:
        value = json_list(value)
        if value is not None and not isinstance(value, list | str):
            raise ValueError("give a tracker name (tensorboard, wandb, all, none) or a list of them")
        names = [str(name).strip().lower() for name in (value or [])]
        names = [name for name in names if name]
        for name in names:
            if name in _UNSUPPORTED:
                raise ValueError(f"stune does not support the {name} tracker; use tensorboard or wandb")
            if name not in (*TRACKERS, "all", *_LOCAL_ONLY):
                raise ValueError(f"unknown tracker {name!r}; choose none, tensorboard, wandb, all or a comma list")
        chosen = [t for t in TRACKERS if "all" in names or t in names]
        return ",".join(chosen) or "none"

    @property
    def trackers(self) -> list[str]:
        """The trackers to start, e.g. ``["tensorboard", "wandb"]`` (empty for ``none``)."""
        return [] if self.report_to == "none" else self.report_to.split(",")
