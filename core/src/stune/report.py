"""``output_dir/report.html``: one self-contained page that shows a run.

Everything comes from files the run leaves in its output folder — ``run.json`` (written when
training starts: family, adapter, key options, datasets, loading snippet), ``metrics.jsonl``,
``dataset_report.json`` and ``validation_images/`` — so :func:`write_report` rebuilds the page at
any time, also for an interrupted or still running run (``st-train report OUTPUT_DIR``). The page
is plain HTML with inline SVG charts and the validation images referenced beside it: no server,
no network, no JavaScript. It is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPORT = "report.html"
RUN_FILE = "run.json"
IMAGES = "validation_images"
_STEP_IMAGE = re.compile(r"^(?P<prefix>step-(?P<step>\d+)(?:-ema)?|base)-(?P<rest>.+)\.(png|jpg|jpeg|webp)$")
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def write_run_file(output_dir: Path, summary: dict[str, Any]) -> Path:
    """Record what the report shows about the run itself (called once when training starts)."""
    return _atomic_write(Path(output_dir) / RUN_FILE, json.dumps(summary, indent=2, default=str))


def write_report(output_dir: Path) -> Path:
    """(Re)build ``output_dir/report.html`` from what is on disk; returns its path."""
    output_dir = Path(output_dir)
    run = _read_json(output_dir / RUN_FILE) or {}
    metrics = _read_metrics(output_dir / "metrics.jsonl")
    datasets = (_read_json(output_dir / "dataset_report.json") or {}).get("datasets", [])
    body = [
        _header(output_dir, run, metrics),
        _summary(run),
        _charts(metrics),
        _validation_grid(output_dir),
        _datasets(datasets),
        _loading(run),
    ]
    page = _PAGE.format(title=html.escape(f"stune — {output_dir.name}"), body="\n".join(b for b in body if b))
    return _atomic_write(output_dir / REPORT, page)


# -- reading -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a kill: the rest is still worth showing
                continue
    return records


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- sections ------------------------------------------------------------------------------------------


def _header(output_dir: Path, run: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    steps = [r["step"] for r in metrics if "loss" in r]
    last = steps[-1] if steps else 0
    total = int(run.get("max_steps") or 0)
    if (output_dir / "plugins.json").is_file() and last >= total:
        status = "finished"
    elif run.get("interrupted"):
        status = f"stopped at step {last} (resume with the same command)"
    else:
        status = f"step {last} of {total or '?'}"
    seconds = [r["step_seconds"] for r in metrics if "step_seconds" in r]
    memory = [r["peak_memory_mb"] for r in metrics if "peak_memory_mb" in r]
    facts = [
        ("status", status),
        ("updated", time.strftime("%Y-%m-%d %H:%M:%S")),
        ("median step", f"{sorted(seconds)[len(seconds) // 2]:.3f} s" if seconds else "—"),
        ("peak memory", f"{max(memory):,.0f} MB ({run.get('memory_kind', 'host RSS')})" if memory else "—"),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return f"<h1>{html.escape(output_dir.name)}</h1><table class='facts'>{rows}</table>"


def _summary(run: dict[str, Any]) -> str:
    if not run:
        return ""
    rows = [(k, run[k]) for k in ("family", "flavour", "model", "adapter", "features", "plugins") if run.get(k)]
    rows += sorted((run.get("options") or {}).items())
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_short(v))}</td></tr>"
        for k, v in rows
        if v not in (None, "")
    )
    return f"<h2>Run</h2><table class='facts'>{cells}</table>"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "…"


def _charts(metrics: list[dict[str, Any]]) -> str:
    train = [r for r in metrics if "loss" in r]
    if not train:
        return "<h2>Training</h2><p>No optimizer step yet.</p>"
    charts = []
    loss = {"loss": [(r["step"], r["loss"]) for r in train]}
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if evals:
        loss["eval loss"] = evals
    charts.append(svg_chart("loss", loss))
    aux = sorted({k for r in train for k in r if k.startswith("aux_loss/") or k == "diffusion_loss"})
    if aux:
        charts.append(svg_chart("loss terms", {k: [(r["step"], r[k]) for r in train if k in r] for k in aux}))
    charts.append(svg_chart("learning rate", {"lr": [(r["step"], r["lr"]) for r in train if "lr" in r]}))
    charts.append(
        svg_chart("gradient norm", {"grad norm": [(r["step"], r["grad_norm"]) for r in train if "grad_norm" in r]})
    )
    charts.append(
        svg_chart("seconds per step", {"step": [(r["step"], r["step_seconds"]) for r in train if "step_seconds" in r]})
    )
    return "<h2>Training</h2><div class='charts'>" + "".join(charts) + "</div>"


def _validation_grid(output_dir: Path) -> str:
    folder = output_dir / IMAGES
    if not folder.is_dir():
        return ""
    cells: dict[str, dict[str, str]] = defaultdict(dict)  # row (prompt, size, index) → column → file
    columns: dict[str, tuple[int, int]] = {}
    for path in sorted(folder.iterdir()):
        match = _STEP_IMAGE.match(path.name)
        if match is None:
            continue
        prefix = match.group("prefix")
        column = "base" if prefix == "base" else prefix
        order = (-1, 0) if prefix == "base" else (int(match.group("step")), 1 if prefix.endswith("-ema") else 0)
        columns[column] = order
        cells[match.group("rest")][column] = f"{IMAGES}/{path.name}"
    if not cells:
        return ""
    ordered = sorted(columns, key=lambda c: columns[c])
    head = "".join(f"<th>{html.escape(_column_title(c))}</th>" for c in ordered)
    rows = []
    for name in sorted(cells):
        row = "".join(
            f"<td><a href='{html.escape(src)}'><img src='{html.escape(src)}' alt='{html.escape(name)}'></a></td>"
            if (src := cells[name].get(c))
            else "<td></td>"
            for c in ordered
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{row}</tr>")
    return f"<h2>Validation images</h2><div class='grid'><table><tr><th></th>{head}</tr>{''.join(rows)}</table></div>"


def _column_title(column: str) -> str:
    if column == "base":
        return "base model"
    step = int(column.split("-")[1])
    return f"step {step}" + (" (EMA)" if column.endswith("-ema") else "")


def _datasets(datasets: list[dict[str, Any]]) -> str:
    if not datasets:
        return ""
    rows, skipped = [], []
    for d in datasets:
        reasons = ", ".join(f"{n} {r}" for r, n in d.get("skipped", {}).items()) or "none"
        buckets = ", ".join(f"{k}: {v}" for k, v in d.get("buckets", {}).items()) or "none"
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (d.get("id"), d.get("type"), d.get("used"), d.get("files_found"), reasons, buckets)
            )
            + "</tr>"
        )
        skipped += [
            f"<li>{html.escape(s['path'])}: {html.escape(s['reason'])}</li>" for s in d.get("skipped_files", [])
        ]
    table = (
        "<table class='list'><tr><th>dataset</th><th>type</th><th>used</th><th>found</th><th>skipped</th>"
        f"<th>buckets</th></tr>{''.join(rows)}</table>"
    )
    if skipped:
        table += f"<details><summary>{len(skipped)} skipped files</summary><ul>{''.join(skipped)}</ul></details>"
    return f"<h2>Datasets</h2>{table}"


def _loading(run: dict[str, Any]) -> str:
    snippet = run.get("loading_example")
    if not snippet:
        return ""
    return f"<h2>Use it</h2><pre>{html.escape(snippet)}</pre>"


# -- charts ------------------------------------------------------------------------------------------


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 460, height: int = 220) -> str:
    """A line chart as inline SVG: one polyline per series, the y axis on a log scale when the
    values span more than two decades (losses, learning rates), min and max labelled."""
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y)]
    if not points:
        return ""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    log = min(ys) > 0 and max(ys) / min(ys) > 100
    ty = (lambda v: math.log10(v)) if log else (lambda v: v)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = ty(min(ys)), ty(max(ys))
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 56, 10, 24, 28
    w, h = width - left - right, height - top - bottom

    def place(x: float, y: float) -> str:
        return f"{left + (x - x0) / (x1 - x0) * w:.1f},{top + (1 - (ty(y) - y0) / (y1 - y0)) * h:.1f}"

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        f"aria-label='{html.escape(title)}'>",
        f"<text x='{left}' y='16' class='t'>{html.escape(title)}{' (log)' if log else ''}</text>",
        f"<rect x='{left}' y='{top}' width='{w}' height='{h}' class='frame'/>",
        f"<text x='{left - 4}' y='{top + 8}' class='l' text-anchor='end'>{_fmt(max(ys))}</text>",
        f"<text x='{left - 4}' y='{top + h}' class='l' text-anchor='end'>{_fmt(min(ys))}</text>",
        f"<text x='{left}' y='{height - 10}' class='l'>{_fmt(x0)}</text>",
        f"<text x='{left + w}' y='{height - 10}' class='l' text-anchor='end'>step {_fmt(x1)}</text>",
    ]
    for index, (name, values) in enumerate(series.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        if len(finite) == 1:
            parts.append(
                f"<circle cx='{place(*finite[0]).split(',')[0]}' cy='{place(*finite[0]).split(',')[1]}' r='3' fill='{colour}'/>"
            )
        elif finite:
            parts.append(
                f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{' '.join(place(x, y) for x, y in finite)}'/>"
            )
        if len(series) > 1:
            parts.append(
                f"<text x='{left + w - 4}' y='{top + 14 + 13 * index}' class='l' text-anchor='end' "
                f"style='fill:{colour}'>{html.escape(name)}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }}
h1 {{ font-size: 1.5em; margin-bottom: 4px; }} h2 {{ font-size: 1.15em; margin-top: 28px; border-bottom: 1px solid #ddd; }}
table.facts th {{ text-align: left; padding-right: 16px; font-weight: 600; vertical-align: top; }}
table.facts td {{ font-family: ui-monospace, monospace; font-size: 0.9em; }}
table.list {{ border-collapse: collapse; }} table.list td, table.list th {{ border: 1px solid #ddd; padding: 3px 8px; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
svg .t {{ font-size: 13px; font-weight: 600; }} svg .l {{ font-size: 11px; fill: #555; }}
svg .frame {{ fill: none; stroke: #ccc; }}
.grid {{ overflow-x: auto; }} .grid th {{ font-size: 0.85em; padding: 4px; }}
.grid img {{ width: 160px; image-rendering: pixelated; display: block; }}
pre {{ background: #f5f5f5; padding: 10px; overflow-x: auto; }}
</style></head><body>
{body}
</body></html>
"""
