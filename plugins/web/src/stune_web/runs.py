"""Runs: the one a project is training (a child ``st-train`` process), and every finished one on disk.

A run started from the page is ``python -m stune.cli train [--num_processes=N]
[--resume_from_checkpoint=…]`` in the project folder, in its own process group, writing its output
to ``<output_dir>/train.log`` (a file, not a pipe: the run outlives the server if the server stops,
and a restarted server picks it up again from ``.stune-web/run.json``). Stopping it is SIGINT to the
group, as Ctrl-C in a terminal: ``st-train`` saves a checkpoint and exits 130.

What the page sees comes from the files the run writes anyway — the log, ``metrics.jsonl``,
``validation_images/`` and ``checkpoint-<step>/`` — turned into numbered events (status, log,
progress, eval, image, checkpoint) in the order they happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stune.errors import UserError

STATE_DIR = ".stune-web"
LOG_NAME = "train.log"
POLL_SECONDS = 0.25
MAX_EVENTS = 20_000
# The core logs this line once the metrics file is ready and the first step is next.
_TRAINING = re.compile(r"training (\d+) steps from step (\d+)")
_ERROR = re.compile(r"^st-train: error: (.*)$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_IMAGE = re.compile(r"\.(png|jpe?g|webp)$", re.IGNORECASE)
_STEP_OF_IMAGE = re.compile(r"^step-(\d+)")


class Events:
    """Numbered events, kept for clients that connect late or reconnect (``Last-Event-ID``)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.last_id = 0
        #: the first event of the latest run: a new page replays from here
        self.run_start = 1
        self._changed = asyncio.Event()

    def publish(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        self.last_id += 1
        item = {"id": self.last_id, "event": kind, "data": data}
        self.items.append(item)
        if len(self.items) > MAX_EVENTS:
            del self.items[: len(self.items) - MAX_EVENTS]
        self._changed.set()
        return item

    def after(self, last: int) -> list[dict[str, Any]]:
        if not self.items or self.items[-1]["id"] <= last:
            return []
        return [item for item in self.items if item["id"] > last]

    async def stream(self, last: int, keepalive: float = 15.0) -> AsyncIterator[dict[str, Any] | None]:
        """Events after ``last`` as they come; ``None`` when nothing happened for ``keepalive`` seconds."""
        while True:
            items = self.after(last)
            if items:
                for item in items:
                    yield item
                last = items[-1]["id"]
                continue
            self._changed.clear()
            if self.after(last):
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), keepalive)
            except TimeoutError:
                yield None


@dataclass
class ActiveRun:
    """The run a project is training now (or trained last, until the next one starts)."""

    output_dir: Path
    command: list[str]
    env: dict[str, str]
    log_path: Path
    log_offset: int
    pid: int
    started: float
    id: str = ""  # how the page names the run (its folder relative to the project)
    process: Any = None  # our own child (subprocess.Popen); None when picked up after a server restart
    state: str = "starting"  # starting → running → stopping → finished | stopped | killed | failed | ended
    returncode: int | None = None
    error: str | None = None
    max_steps: int | None = None
    first_step: int | None = None
    step: int = 0
    stop_requested: bool = False
    step_seconds: list[float] = field(default_factory=list)

    def alive(self) -> bool:
        if self.process is not None:
            return bool(self.process.poll() is None)
        return _pid_alive(self.pid)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "output_dir": str(self.output_dir),
            "command": self.command,
            "env": self.env,
            "pid": self.pid,
            "started": self.started,
            "returncode": self.returncode,
            "error": self.error,
            "max_steps": self.max_steps,
            "first_step": self.first_step,
            "step": self.step,
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A finished child of ours that nobody waited for is a zombie: dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    return True


class Runner:
    """Starts, watches and stops the project's run; one at a time."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self.events = Events()
        self.run: ActiveRun | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _id(self, output_dir: Path) -> str:
        from stune_web.outputs import run_id

        return run_id(self.project, output_dir)

    @property
    def state_file(self) -> Path:
        return self.project / STATE_DIR / "run.json"

    # -- starting ------------------------------------------------------------------------------------
    async def start(self, args: list[str], env: dict[str, str], output_dir: Path) -> ActiveRun:
        import subprocess

        async with self._lock:
            if self.run is not None and self.run.alive():
                raise Busy(f"A run is already training in this project (pid {self.run.pid}); stop it first.")
            other = self._recorded_run()
            if other is not None:
                raise Busy(f"A run is already training in this project (pid {other['pid']}); stop it first.")
            output_dir.mkdir(parents=True, exist_ok=True)
            log_path = output_dir / LOG_NAME
            command = [sys.executable, "-m", "stune.cli", "train", *args]
            with log_path.open("ab") as log:
                header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} st-train {' '.join(args)} (stune-web)\n"
                log.write(header.encode())
                offset = log.tell()
                child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **env}
                process = subprocess.Popen(
                    command,
                    cwd=self.project,
                    env=child_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: SIGINT reaches accelerate's workers too
                )
            run = ActiveRun(
                output_dir, command, env, log_path, offset, process.pid, time.time(), self._id(output_dir), process
            )
            self._record(run)
            self._begin(run)
            return run

    def _begin(self, run: ActiveRun) -> None:
        self.run = run
        self.events.run_start = self.events.publish("status", run.summary())["id"]
        self._task = asyncio.get_running_loop().create_task(self._watch(run))

    def _record(self, run: ActiveRun) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "pid": run.pid,
            "output_dir": str(run.output_dir),
            "command": run.command,
            "env": run.env,
            "log": str(run.log_path),
            "log_offset": run.log_offset,
            "started": run.started,
        }
        self.state_file.write_text(json.dumps(data, indent=2), encoding="utf-8")

    def _recorded_run(self) -> dict[str, Any] | None:
        """The run another server (or this one before a restart) started and that still trains."""
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        pid = int(data.get("pid", 0))
        if pid <= 0 or not _pid_alive(pid) or not _is_stune(pid):
            with contextlib.suppress(OSError):
                self.state_file.unlink()
            return None
        return dict(data)

    def reattach(self) -> None:
        """Pick up a run a previous server started and left training."""
        data = self._recorded_run()
        if data is None or self.run is not None:
            return
        run = ActiveRun(
            Path(data["output_dir"]),
            list(data["command"]),
            dict(data.get("env", {})),
            Path(data["log"]),
            int(data.get("log_offset", 0)),
            int(data["pid"]),
            float(data.get("started", time.time())),
            self._id(Path(data["output_dir"])),
        )
        self._begin(run)

    # -- stopping ----------------------------------------------------------------------------------
    async def stop(self, force: bool = False) -> ActiveRun:
        run = self.run
        if run is None or not run.alive():
            raise UserError("No run is training in this project.")
        try:
            group = os.getpgid(run.pid)
            os.killpg(group, signal.SIGKILL if force else signal.SIGINT)
        except ProcessLookupError:
            pass
        run.stop_requested = True
        if run.state not in ("finished", "failed", "stopped", "killed", "ended"):
            run.state = "stopping"
            self.events.publish("status", run.summary())
        return run

    async def shutdown(self) -> None:
        """The server stops: the run goes on (it writes to its log file); the watcher ends."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- watching ------------------------------------------------------------------------------------
    async def _watch(self, run: ActiveRun) -> None:
        watcher = _Watcher(run, self.events)
        while True:
            alive = run.alive()
            watcher.poll()
            if not alive:
                break
            await asyncio.sleep(POLL_SECONDS)
        watcher.poll(final=True)  # what was written between the last look and the exit
        if run.process is not None:
            run.returncode = run.process.wait()
        if run.returncode == 0:
            run.state = "finished"
        elif run.returncode is not None and run.returncode < 0 and run.stop_requested:
            run.state = "killed"  # "Kill now": the last checkpoint written is what is left
        elif run.returncode in (130, 128 + signal.SIGTERM) or (run.stop_requested and run.returncode is None):
            run.state = "stopped"
        elif run.returncode is None:
            run.state = "finished" if watcher.finished else ("stopped" if watcher.stopped else "ended")
        else:
            run.state = "failed"
        self.events.publish("status", run.summary())
        with contextlib.suppress(OSError):
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            if int(data.get("pid", 0)) == run.pid:
                self.state_file.unlink()


class Busy(UserError):
    """A second run was asked for while one trains."""


def _is_stune(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return any(b"stune" in part or b"st-train" in part for part in cmdline)


class _Watcher:
    """Turns what the run writes into events, each thing once and in order."""

    def __init__(self, run: ActiveRun, events: Events) -> None:
        self.run = run
        self.events = events
        self.log_offset = run.log_offset
        self.partial = b""
        self.metrics_offset = 0
        self.reading_metrics = False
        self.evals: set[int] = set()
        self.images = set(_images(run.output_dir))
        self.pending: dict[str, int] = {}  # image → size at the last look (images are written in place)
        self.checkpoints = set(_checkpoints(run.output_dir))
        self.finished = False
        self.stopped = False

    def poll(self, final: bool = False) -> None:
        self._log()
        if self.reading_metrics:
            self._metrics()
        self._files(final)

    def _log(self) -> None:
        try:
            with self.run.log_path.open("rb") as handle:
                handle.seek(self.log_offset)
                chunk = handle.read()
        except OSError:
            return
        if not chunk:
            return
        self.log_offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.events.publish("log", {"line": line})
            self._read_line(line)

    def _read_line(self, line: str) -> None:
        run = self.run
        match = _TRAINING.search(line)
        if match and not self.reading_metrics:
            run.max_steps, run.first_step = int(match.group(1)), int(match.group(2))
            run.step = run.first_step
            run.state = "running"
            self.reading_metrics = True
            self.events.publish("status", run.summary())
            return
        error = _ERROR.match(line)
        if error:
            run.error = error.group(1)
        if "st-train: stopped by signal" in line:
            self.stopped = True
        if " done: " in line and "steps; adapter in" in line:
            self.finished = True

    def _metrics(self) -> None:
        path = self.run.output_dir / "metrics.jsonl"
        try:
            with path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < self.metrics_offset:  # rewritten (a resume trims lost steps): read it again
                    self.metrics_offset = 0
                handle.seek(self.metrics_offset)
                chunk = handle.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines
        self.metrics_offset += end
        for raw in chunk[:end].splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        run = self.run
        step = int(record.get("step", 0))
        if "loss" in record and step > run.step:
            run.step = step
            if "step_seconds" in record:
                run.step_seconds = [*run.step_seconds[-19:], float(record["step_seconds"])]
            typical = sorted(run.step_seconds)[len(run.step_seconds) // 2] if run.step_seconds else None
            remaining = (run.max_steps or step) - step
            self.events.publish(
                "progress",
                {
                    "step": step,
                    "max_steps": run.max_steps,
                    "epoch": record.get("epoch"),
                    "loss": record.get("loss"),
                    "lr": record.get("lr"),
                    "grad_norm": record.get("grad_norm"),
                    "step_seconds": record.get("step_seconds"),
                    "samples_per_second": record.get("samples_per_second"),
                    "it_s": 1 / typical if typical else None,
                    "eta_seconds": remaining * typical if typical else None,
                },
            )
        elif "eval_loss" in record and step not in self.evals and step > (run.first_step or 0):
            self.evals.add(step)
            self.events.publish("eval", {"step": step, "eval_loss": record["eval_loss"]})

    def _files(self, final: bool) -> None:
        folder = self.run.output_dir / "validation_images"
        for name in _images(self.run.output_dir):
            if name in self.images:
                continue
            try:
                size = (folder / name).stat().st_size
            except OSError:
                continue
            # An image is announced once its size stopped changing between two looks (or the run ended).
            if size and (self.pending.get(name) == size or final):
                self.images.add(name)
                self.pending.pop(name, None)
                step = _STEP_OF_IMAGE.match(name)
                self.events.publish("image", {"name": name, "step": int(step.group(1)) if step else None})
            else:
                self.pending[name] = size
        for name in _checkpoints(self.run.output_dir):
            if name not in self.checkpoints:
                self.checkpoints.add(name)
                self.events.publish("checkpoint", {"name": name, "step": int(name.split("-")[1])})


def _images(output_dir: Path) -> list[str]:
    folder = output_dir / "validation_images"
    try:
        return sorted(p.name for p in folder.iterdir() if _IMAGE.search(p.name) and not p.name.startswith("."))
    except OSError:
        return []


def _checkpoints(output_dir: Path) -> list[str]:
    try:
        names = [p.name for p in output_dir.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(names, key=lambda n: int(n.split("-")[1]))
