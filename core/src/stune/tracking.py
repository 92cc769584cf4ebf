"""Sending metrics and validation images to experiment trackers (``report_to``).

``metrics.jsonl`` (stune.metrics) is written whatever ``report_to`` says; this module adds
TensorBoard (``torch.utils.tensorboard.SummaryWriter``) and Weights & Biases (``wandb``). Both
write under ``output_dir/logging_dir`` and record the run's options as hyperparameters. Only the
main process starts trackers; on the others every method does nothing.

wandb mode: an explicit ``WANDB_MODE`` is always obeyed. Otherwise the run is online when an API
key is configured (``WANDB_API_KEY`` or the ``~/.netrc`` entry ``wandb login`` writes) and offline
when none is: wandb would otherwise stop and ask for a key at the terminal, which hangs
unattended runs. An offline run is uploaded later with ``wandb sync <dir>``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.config import CoreOptions

log = logging.getLogger("stune.tracking")

# report_to name → the package it needs (import name = distribution name for both).
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
_STEP_PREFIX = re.compile(r"^step-\d+-")


def check_trackers(config: CoreOptions) -> None:
    """Fail at config-check time when a tracker's package is missing (imports nothing heavy)."""
    for name in config.trackers:
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to={name} needs the `{package}` package; install it with "
                f"`pip install 'stune[trackers]'` (or `pip install {package}`)."
            )


def logging_dir(config: CoreOptions, output_dir: Path) -> Path:
    """``logging_dir`` is relative to ``output_dir`` (as in SimpleTuner) unless it is absolute."""
    return Path(output_dir) / config.logging_dir


def run_name(config: CoreOptions, output_dir: Path) -> str:
    if config.tracker_run_name:
        return config.tracker_run_name
    return f"{Path(output_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"


def wandb_key_configured() -> bool:
    """Whether wandb would find an API key without asking (environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _image_tag(path: Path) -> str:
    """``step-000010-validation-64x64.png`` → ``validation/validation-64x64`` (the same tag every step)."""
    return "validation/" + _STEP_PREFIX.sub("", path.stem)


def _series(key: str) -> str:
    return key if "/" in key or key.startswith("eval") else f"train/{key}"


def _shareable(config: CoreOptions) -> dict[str, Any]:
    from stune.publishing import shareable_values

    return shareable_values(config)


def _hparams(config: CoreOptions) -> dict[str, Any]:
    """The run's options, JSON-ready (lists and dicts as JSON text, for TensorBoard's hparams)."""
    values = _shareable(config)  # credentials in publishing_config / webhook_config stay out
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in values.items()}


class Trackers:
    """The trackers of a run; only the main process talks to them."""

    def __init__(self, active: bool, tensorboard: Any = None, wandb_run: Any = None) -> None:
        self.active = active
        self.tensorboard = tensorboard  # torch.utils.tensorboard.SummaryWriter
        self.wandb_run = wandb_run  # wandb.Run
        self.tensorboard_session_end: Any = None  # the HParams "session ended" record, written by finish

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Numbers of one step under their metrics.jsonl names: the training step's as ``train/<name>``,
        others (``eval_loss``, names with a ``/``) unchanged. ``step`` is the x axis, not a series."""
        if not self.active:
            return
        values = {_series(k): float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_images(self, images: list[Path], step: int) -> None:
        """Validation images of one step, each under a tag that stays the same across steps."""
        if not self.active or not images:
            return
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            for path in images:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.tensorboard.add_image(_image_tag(path), pixels, step, dataformats="HWC")
            self.tensorboard.flush()  # validation is rare; make its images visible at once
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log(
                {_image_tag(p): wandb.Image(str(p), caption=_STEP_PREFIX.sub("", p.stem)) for p in images}, step=step
            )

    def finish(self, exit_code: int = 0) -> None:
        """Close the trackers; ``exit_code`` != 0 marks the run failed (wandb) or unfinished (TensorBoard)."""
        if not self.active:
            return
        self.active = False
        if self.tensorboard is not None:
            if exit_code == 0 and self.tensorboard_session_end is not None:
                self.tensorboard.file_writer.add_summary(self.tensorboard_session_end)  # HParams status: done
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)


def start_trackers(config: CoreOptions, accelerator: Any, output_dir: Path) -> Trackers:
    """Start the trackers ``report_to`` names (on the main process only)."""
    if not accelerator.is_main_process or not config.trackers:
        return Trackers(active=False)
    folder = logging_dir(config, output_dir)
    name = run_name(config, output_dir)
    trackers = Trackers(active=True)
    if "tensorboard" in config.trackers:
        trackers.tensorboard, trackers.tensorboard_session_end = _start_tensorboard(config, folder / name)
    if "wandb" in config.trackers:
        trackers.wandb_run = _start_wandb(config, folder, name)
    return trackers


def _start_tensorboard(config: CoreOptions, folder: Path) -> tuple[Any, Any]:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer: Any = SummaryWriter(log_dir=str(folder), flush_secs=30)
    # The options go in as hyperparameters (HParams tab, compared across runs, linked to the loss)
    # and as one JSON text (Text tab) that shows every option at a glance.
    values = _hparams(config)
    experiment, session_start, session_end = hparams(values, {"train/loss": 0.0})  # type: ignore[no-untyped-call]
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)
    writer.add_text("config", "```json\n" + json.dumps(values, indent=2) + "\n```", 0)
    writer.flush()
    log.info("tensorboard: logging to %s (view with `tensorboard --logdir %s`)", folder, folder.parent)
    return writer, session_end


def _start_wandb(config: CoreOptions, folder: Path, name: str) -> Any:
    import wandb

    # WANDB_MODE and WANDB_DIR win when set. They are passed on explicitly because wandb reads the
    # environment once per process, and a second run in the same process may see other values.
    mode: Any = os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")
    directory = Path(os.environ.get("WANDB_DIR") or folder)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=config.tracker_project_name,
        name=name,
        dir=str(directory),
        config=_shareable(config),
        tags=["stune", *([config.model_family] if config.model_family else [])],
        mode=mode,
    )
    if mode == "offline":
        why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no wandb API key configured"
        log.info("wandb: offline run (%s); upload it later with `wandb sync %s`", why, Path(run.dir).parent)
    return run
