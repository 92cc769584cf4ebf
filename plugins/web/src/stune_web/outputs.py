"""Runs on disk: finding them in the project, what each left (adapter, checkpoints, validation
images, the loading snippet from ``run.json``), their curves — drawn with the report's own
:func:`stune.report.svg_chart` — and one chart comparing several runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from stune.report import svg_chart

RUN_MARKERS = ("run.json", "metrics.jsonl")
_SKIP = {"config", "cache", "datasets", "node_modules", "__pycache__", "validation_images", ".git", ".venv"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_IMAGE = re.compile(r"^(?P<column>step-(?P<step>\d+)(?:-ema)?|base)-(?P<name>.+)\.(png|jpe?g|webp)$", re.IGNORECASE)
METRICS = {
    "loss": "loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "eval_loss": "eval loss",
    "step_seconds": "seconds per step",
}


def run_id(project: Path, folder: Path) -> str:
    """How the page names a run: its folder relative to the project, else its absolute path."""
    try:
        return folder.resolve().relative_to(project.resolve()).as_posix() or "."
    except ValueError:
        return str(folder.resolve())


def discover(project: Path, also: list[Path]) -> dict[str, Path]:
    """Run folders: up to two levels below the project, and the given folders (the configured
    output_dir, the active run's), when they hold a run."""
    found: dict[str, Path] = {}

    def consider(folder: Path) -> None:
        if any((folder / marker).is_file() for marker in RUN_MARKERS):
            found[run_id(project, folder)] = folder.resolve()

    for folder in also:
        consider(folder)
    level = [project]
    for _depth in range(2):
        below = []
        for parent in level:
            try:
                entries = list(os.scandir(parent))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".") and entry.name not in _SKIP:
                    if _CHECKPOINT.match(entry.name):
                        continue
                    consider(Path(entry.path))
                    below.append(Path(entry.path))
        level = below
    return dict(sorted(found.items()))


def metrics_of(folder: Path) -> list[dict[str, Any]]:
    records = []
    path = folder / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def details(project: Path, folder: Path) -> dict[str, Any]:
    """What the outputs page shows about one run."""
    run = _read_json(folder / "run.json") or {}
    metrics = metrics_of(folder)
    steps = [r for r in metrics if "loss" in r]
    checkpoints = []
    for entry in sorted(
        (p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
    ):
        checkpoints.append({"name": entry.name, "step": int(entry.name.split("-")[1]), "files": _files(entry, folder)})
    adapter = [f for f in _files(folder, folder, recursive=False) if f["name"].endswith((".safetensors", ".json"))]
    adapter = [f for f in adapter if f["name"] not in ("run.json", "dataset_report.json", "plugins.json")]
    if (folder / "transformer").is_dir():
        adapter.append(
            {"path": "transformer", "name": "transformer/ (a diffusers folder)", "size": _size(folder / "transformer")}
        )
    last = steps[-1] if steps else {}
    if (folder / "plugins.json").is_file() and last and last.get("step", 0) >= int(run.get("max_steps") or 0):
        status = "finished"
    elif run.get("interrupted"):
        status = "stopped"
    else:
        status = "unfinished" if steps else "not started"
    return {
        "id": run_id(project, folder),
        "path": str(folder),
        "status": status,
        "run": run,
        "last": last,
        "steps": len(steps),
        "adapter": adapter,
        "checkpoints": checkpoints,
        "images": images(folder),
        "loading_example": run.get("loading_example"),
        "report": (folder / "report.html").is_file(),
        "log": (folder / "train.log").is_file(),
    }


def images(folder: Path) -> list[dict[str, Any]]:
    """Validation images, oldest step first: the base model's, then each step's (EMA after)."""
    found = []
    directory = folder / "validation_images"
    if not directory.is_dir():
        return []
    for path in directory.iterdir():
        match = _IMAGE.match(path.name)
        if match is None:
            continue
        step = int(match.group("step")) if match.group("step") else -1
        found.append(
            {
                "file": f"validation_images/{path.name}",
                "step": step,
                "column": match.group("column"),
                "name": match.group("name"),
                "ema": match.group("column").endswith("-ema"),
            }
        )
    return sorted(found, key=lambda i: (i["step"], i["ema"], i["name"]))


def charts(folder: Path) -> list[str]:
    """Loss (with the eval loss), learning rate and gradient norm of one run, as inline SVG."""
    metrics = metrics_of(folder)
    train = [r for r in metrics if "loss" in r]
    if not train:
        return []
    loss = {"loss": [(r["step"], r["loss"]) for r in train]}
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if evals:
        loss["eval loss"] = evals
    out = [svg_chart("loss", loss)]
    out.append(svg_chart("learning rate", {"lr": [(r["step"], r["lr"]) for r in train if "lr" in r]}))
    out.append(
        svg_chart("gradient norm", {"grad norm": [(r["step"], r["grad_norm"]) for r in train if "grad_norm" in r]})
    )
    return [c for c in out if c]


def compare(project: Path, folders: dict[str, Path], metric: str) -> str:
    """One chart: ``metric`` of every given run, one line each."""
    if metric not in METRICS:
        raise KeyError(metric)
    series = {}
    for name, folder in folders.items():
        points = [(r["step"], r[metric]) for r in metrics_of(folder) if metric in r and "step" in r]
        if points:
            series[name] = points
    return svg_chart(f"{METRICS[metric]}: {len(series)} runs", series, width=760, height=320) if series else ""


def resolve_file(folder: Path, relative: str) -> Path | None:
    """A file inside the run folder, or None (no path escapes the run)."""
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder.resolve()) or not target.is_file():
        return None
    return target


def _files(root: Path, base: Path, recursive: bool = True) -> list[dict[str, Any]]:
    out = []
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            out.append({"path": path.relative_to(base).as_posix(), "name": path.name, "size": path.stat().st_size})
    return out


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
