"""Stopping a run on SIGINT/SIGTERM at the next step boundary, with a checkpoint."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("stune.train")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by a signal handler; read once per optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log.warning("%s received: stopping after this step, with a checkpoint", signal.Signals(signum).name)
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch SIGINT/SIGTERM while training (only possible from the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, accelerator: Any) -> int | None:
        """The signal to stop on, the same on every process (one stopping alone would hang the others)."""
        if accelerator.num_processes == 1:
            return self.signum
        mine = torch.tensor(float(self.signum or 0), device=accelerator.device)
        agreed = int(accelerator.reduce(mine, "max"))
        return agreed or None
