"""Fixtures for the web interface's tests: a project folder for the tiny FLUX model, a real
``st-train server`` in a child process, and a reader of its server-sent events."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stune.testing import make_images, offline_env

IMAGES = 8


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image folder and one cache for every run of the session: captions and latents are
    encoded once (the caches are keyed by content and model, so sharing them is safe)."""
    root = tmp_path_factory.mktemp("web-shared")
    make_images(root / "images", IMAGES, (64, 64))
    return {"images": root / "images", "cache": root / "cache"}


def tiny_flux_config(model: Path, shared: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """A config for a few fast steps of the tiny FLUX model (what the page's form is filled with)."""
    return {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "cache_dir": str(shared["cache"]),
        "resolution": 64,
        "train_batch_size": 2,
        "learning_rate": 3e-3,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "tokenizer_max_length": 32,
        "seed": 7,
        "validation_disable": True,
        **extra,
    }


def tiny_dataset(shared: dict[str, Path]) -> dict[str, Any]:
    return {
        "id": "pictures",
        "type": "local",
        "instance_data_dir": str(shared["images"]),
        "caption_strategy": "textfile",
    }


class Server:
    """``st-train server`` in a child process, for as long as a test needs it."""

    def __init__(self, project: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.project = project
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stune.cli", "server", "--dir", str(project), "--port", "0", *args],
            env=offline_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()
        match = re.search(r"(http://\S+?/)(\?token=(\S+))?\s", self.banner)
        assert match, self.banner + (self.process.stdout.read() if self.process.poll() is not None else "")
        self.token = match.group(3)
        port = int(re.search(r":(\d+)/", match.group(1)).group(1))  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self) -> str:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read() if self.process.stdout else ""

    def events(self, after: int | None = None, until: Any = None, timeout: float = 300) -> Iterator[dict[str, Any]]:
        """Server-sent events as dicts ({"id", "event", "data"}), read until ``until(event)`` is true."""
        headers = {"Last-Event-ID": str(after)} if after is not None else {}
        deadline = time.monotonic() + timeout
        with httpx.stream("GET", f"{self.url}/api/events", headers=headers, timeout=timeout) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event: dict[str, Any] = {}
            for line in response.iter_lines():
                assert time.monotonic() < deadline, "no end of the run in time"
                if line.startswith("id: "):
                    event["id"] = int(line[4:])
                elif line.startswith("event: "):
                    event["event"] = line[7:]
                elif line.startswith("data: "):
                    event["data"] = json.loads(line[6:])
                elif not line and "event" in event:
                    yield event
                    if until is not None and until(event):
                        return
                    event = {}


@pytest.fixture
def start_server() -> Iterator[Any]:
    servers: list[Server] = []

    def start(project: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        server = Server(project, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def finished(event: dict[str, Any]) -> bool:
    return event["event"] == "status" and event["data"]["state"] in ("finished", "stopped", "killed", "failed", "ended")


def stop_children(project: Path) -> None:
    """A test that failed half-way leaves no training process behind."""
    state = project / ".stune-web" / "run.json"
    if state.is_file():
        pid = json.loads(state.read_text())["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
