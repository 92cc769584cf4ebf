"""Sending metrics and validation images to experiment trackers (``report_to``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stune.config import CoreOptions


class Trackers:
    """The trackers of a run; only the main process talks to them."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, images: list[Path], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def start_trackers(config: CoreOptions, accelerator: Any, output_dir: Path) -> Trackers:
    return Trackers(active=accelerator.is_main_process and config.report_to != "none")
