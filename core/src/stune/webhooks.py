"""Webhooks (``webhook_config``): a run's progress, validation images, previews, errors and its end
posted to HTTP endpoints, as SimpleTuner does.

Each endpoint is ``{"webhook_url": …, "webhook_type": "raw" | "discord", "message_prefix": …,
"log_level": …, "timeout": …, "retries": …}``; ``webhook_config`` is one such object, a list of
them, or the path of a JSON file holding either. ``raw`` endpoints get one JSON object per message
(``event``, ``level``, ``message``, ``step``, ``metrics`` and images as base64 PNG); ``discord``
endpoints get ``{"content": message}`` and images as a multipart upload (``files[i]``).

Delivery never holds training up: messages go into a bounded queue that one worker thread empties;
each post has a timeout and a few retries, and a message that still fails (or finds the queue full)
is dropped with a warning. Only the main process sends.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError
from stune.hookspecs import hookimpl
from stune.jsonfile import read_json_option

if TYPE_CHECKING:
    from PIL import Image

    from stune.session import Session
    from stune.state import TrainState

log = logging.getLogger("stune.webhooks")
PLUGIN_NAME = "stune.webhooks"
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
TYPES = ("raw", "discord")
_KEYS = {"webhook_url", "webhook_type", "message_prefix", "log_level", "timeout", "retries", "ssl_no_verify"}
_QUEUE_SIZE = 256
_DISCORD_LIMIT = 2000  # characters of one Discord message


@dataclass(frozen=True)
class Endpoint:
    url: str
    kind: str = "raw"
    prefix: str = ""
    level: int = LEVELS["info"]
    timeout: float = 5.0
    retries: int = 2


def parse_webhook_config(value: Any) -> list[Endpoint]:
    """``webhook_config`` (an object, a list of objects, JSON text or a JSON file path) → endpoints.
    Every mistake is a ConfigError naming the option."""
    if value is None:
        return []
    data = read_json_option(value, "webhook_config")
    entries = data if isinstance(data, list) else [data]
    endpoints = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError("webhook_config entries must be JSON objects with a webhook_url.")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise ConfigError(
                f"webhook_config has the unknown key `{unknown[0]}`; keys are: {', '.join(sorted(_KEYS))}."
            )
        url = entry.get("webhook_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError("webhook_config needs a webhook_url starting with http:// or https://.")
        kind = str(entry.get("webhook_type", "raw")).lower()
        if kind not in TYPES:
            raise ConfigError(f"webhook_config webhook_type `{kind}` is not one of: {', '.join(TYPES)}.")
        level = str(entry.get("log_level", "info")).lower()
        if level not in LEVELS:
            raise ConfigError(f"webhook_config log_level `{level}` is not one of: {', '.join(LEVELS)}.")
        try:
            timeout, retries = float(entry.get("timeout", 5.0)), int(entry.get("retries", 2))
        except (TypeError, ValueError) as exc:
            raise ConfigError("webhook_config timeout must be seconds and retries a whole number.") from exc
        if timeout <= 0 or retries < 0:
            raise ConfigError("webhook_config timeout must be above 0 and retries at least 0.")
        prefix = str(entry.get("message_prefix") or "")
        endpoints.append(Endpoint(url, kind, prefix, LEVELS[level], timeout, retries))
    return endpoints


@dataclass
class Message:
    event: str
    message: str
    level: str = "info"
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, PNG bytes)


class WebhookSender:
    """The queue and the one worker thread that posts messages to every endpoint."""

    def __init__(self, endpoints: list[Endpoint], run_name: str, interval: int | None) -> None:
        self.endpoints = endpoints
        self.run_name = run_name
        self.interval = interval
        self.delivered = 0
        self.dropped = 0
        self._queue: queue.Queue[Message | None] = queue.Queue(maxsize=_QUEUE_SIZE)
        self._thread = threading.Thread(target=self._work, name="stune-webhooks", daemon=True)
        self._thread.start()

    # -- what training calls -------------------------------------------------------------------------
    def send(self, message: Message) -> None:
        """Queue a message; never blocks (a full queue drops it)."""
        if not any(LEVELS[message.level] >= e.level for e in self.endpoints):
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("webhook queue full (endpoint slow or down): messages are being dropped")

    def preview(self, name: str, step: int, image: Image.Image) -> None:
        """An image being denoised (validation_preview)."""
        self.send(
            Message(
                "validation_preview", f"{name}: sampling step {step}", images=[(f"{name}-s{step}.png", _png(image))]
            )
        )

    def close(self, wait: float | None = None) -> None:
        """Deliver what is queued within ``wait`` seconds (default: two messages' worth of timeouts
        and retries, at most 10 s), then stop the worker: a dead endpoint costs at most that once, and
        the worker is a daemon that never keeps the process alive."""
        if wait is None:
            wait = min(10.0, 2 * max(e.timeout * (e.retries + 1) for e in self.endpoints))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                continue
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- hooks (registered on the run's plugin manager) -----------------------------------------------
    @hookimpl
    def on_train_start(self, state: TrainState) -> None:
        self.send(
            Message(
                "train_start",
                f"training started at step {state.global_step} of {state.max_train_steps}",
                step=state.global_step,
            )
        )

    @hookimpl
    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.interval and state.global_step % self.interval == 0:
            loss = metrics.get("loss")
            text = f"step {state.global_step}/{state.max_train_steps}" + (
                f", loss {loss:.4f}" if loss is not None else ""
            )
            values = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.send(Message("progress", text, step=state.global_step, metrics=values))

    @hookimpl
    def on_validation_done(self, state: TrainState, images: list[Path]) -> None:
        files = [(p.name, p.read_bytes()) for p in images if p.is_file()]
        self.send(
            Message(
                "validation", f"validation images at step {state.global_step}", step=state.global_step, images=files
            )
        )

    @hookimpl
    def on_checkpoint_saved(self, state: TrainState, path: Path) -> None:
        self.send(Message("checkpoint", f"checkpoint saved: {path.name}", step=state.global_step))

    @hookimpl
    def on_train_end(self, state: TrainState, output_dir: Path) -> None:
        self.send(
            Message(
                "train_end",
                f"training finished at step {state.global_step}; outputs in {output_dir}",
                step=state.global_step,
            )
        )

    def interrupted(self, state: TrainState, signum: int, checkpoints: list[Path]) -> None:
        """A signal stopped the run between steps (after saving a checkpoint it can resume from)."""
        import signal

        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        saved = f"; {checkpoints[-1].name} saved, resume_from_checkpoint=latest continues" if checkpoints else ""
        text = f"training interrupted by {name} at step {state.global_step} of {state.max_train_steps}{saved}"
        self.send(Message("interrupted", text, level="warning", step=state.global_step))

    # -- the worker -----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            for endpoint in self.endpoints:
                if LEVELS[message.level] >= endpoint.level:
                    self._deliver(endpoint, message)

    def _deliver(self, endpoint: Endpoint, message: Message) -> None:
        body, content_type = (_discord if endpoint.kind == "discord" else _raw)(endpoint, message, self.run_name)
        for attempt in range(endpoint.retries + 1):
            request = urllib.request.Request(
                endpoint.url, data=body, method="POST", headers={"Content-Type": content_type, "User-Agent": "stune"}
            )
            try:
                with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
                    response.read()
                self.delivered += 1
                return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                error = exc
            if attempt < endpoint.retries:
                time.sleep(min(2.0, 0.25 * 2**attempt))
        log.warning(
            "webhook %s: %s not delivered after %d tries (%s)", endpoint.url, message.event, endpoint.retries + 1, error
        )


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _text(endpoint: Endpoint, message: Message) -> str:
    return f"{endpoint.prefix} {message.message}".strip() if endpoint.prefix else message.message


def _raw(endpoint: Endpoint, message: Message, run_name: str) -> tuple[bytes, str]:
    payload = {
        "event": message.event,
        "level": message.level,
        "message": _text(endpoint, message),
        "run": run_name,
        "step": message.step,
        "metrics": message.metrics,
        "images": [{"name": n, "png_base64": base64.b64encode(data).decode("ascii")} for n, data in message.images],
        "timestamp": time.time(),
    }
    return json.dumps(payload).encode("utf-8"), "application/json"


def _discord(endpoint: Endpoint, message: Message, run_name: str) -> tuple[bytes, str]:
    content = _text(endpoint, message)[:_DISCORD_LIMIT]
    if not message.images:
        return json.dumps({"content": content}).encode("utf-8"), "application/json"
    boundary = uuid.uuid4().hex
    parts = [_form_part(boundary, 'name="payload_json"', "application/json", json.dumps({"content": content}).encode())]
    for i, (name, data) in enumerate(message.images[:10]):  # Discord takes 10 files a message
        parts.append(_form_part(boundary, f'name="files[{i}]"; filename="{name}"', "image/png", data))
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _form_part(boundary: str, disposition: str, content_type: str, data: bytes) -> bytes:
    head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
    return head.encode() + data + b"\r\n"


def sender(session: Session) -> WebhookSender | None:
    """The run's sender, when ``webhook_config`` is set (validation previews reach it through this)."""
    plugin = session.host.pm.get_plugin(PLUGIN_NAME)
    return plugin if isinstance(plugin, WebhookSender) else None


@contextlib.contextmanager
def reporting(session: Session) -> Iterator[WebhookSender | None]:
    """While a run trains: its webhook sender registered as a plugin (observer hooks), an error
    message when the run fails, and the queue flushed (bounded) at the end."""
    config = session.config
    endpoints = parse_webhook_config(getattr(config, "webhook_config", None))
    if not endpoints or os.environ.get("RANK", "0") != "0":
        yield None
        return
    name = getattr(config, "tracker_run_name", None) or Path(str(config.output_dir)).resolve().name
    webhook = WebhookSender(endpoints, name, getattr(config, "webhook_reporting_interval", None))
    session.host.pm.register(webhook, name=PLUGIN_NAME)
    try:
        yield webhook
    except BaseException as exc:
        kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
        webhook.send(Message(kind, f"training stopped: {type(exc).__name__}: {exc}"[:1500], level="error"))
        raise
    finally:
        session.host.pm.unregister(name=PLUGIN_NAME)
        webhook.close()
