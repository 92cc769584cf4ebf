"""Scanning datasets and reporting what was found, used and skipped (``st-train check``)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stune.data.config import ResolvedDataset, resolve_datasets
from stune.data.images import Scan, Skipped, captions_for, list_images, oriented_size, square_side

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily


def scan_dataset(ds: ResolvedDataset) -> Scan:
    """Every image of a dataset with its captions and size; unreadable or uncaptioned files are skipped."""
    from stune.data.images import ImageRecord

    scan = Scan(dataset_id=ds.id)
    for path in list_images(ds.folder):
        scan.found += 1
        try:
            width, height = oriented_size(path)
        except Exception as exc:  # any decoder error: the file is reported, the run goes on
            scan.skipped.append(Skipped(path, "unreadable", f"{type(exc).__name__}: {exc}"))
            continue
        captions = captions_for(path, ds.caption_strategy, ds.instance_prompt)
        if not captions:
            scan.skipped.append(Skipped(path, "missing caption", f"no {path.with_suffix('.txt').name}"))
            continue
        scan.records.append(ImageRecord(path=path, captions=captions, width=width, height=height))
    return scan


@dataclass
class DatasetReport:
    dataset: ResolvedDataset
    scan: Scan
    size: tuple[int, int]
    extra_skipped: list[Skipped] = field(default_factory=list)

    @property
    def skipped(self) -> list[Skipped]:
        return self.scan.skipped + self.extra_skipped

    @property
    def used(self) -> int:
        return len(self.scan.records) - len(self.extra_skipped)

    def as_dict(self) -> dict[str, Any]:
        reasons = Counter(s.reason for s in self.skipped)
        captions = [c for r in self.scan.records[:3] for c in r.captions[:1]]
        return {
            "id": self.dataset.id,
            "folder": str(self.dataset.folder),
            "files_found": self.scan.found,
            "used": self.used,
            "skipped": dict(reasons),
            "skipped_files": [{"path": str(s.path), "reason": s.reason, "detail": s.detail} for s in self.skipped],
            "buckets": {f"{self.size[0]}x{self.size[1]}": self.used},
            "repeats": self.dataset.repeats,
            "samples_per_epoch": self.used * (1 + self.dataset.repeats),
            "example_captions": captions,
        }


@dataclass
class Report:
    datasets: list[DatasetReport]

    def as_dict(self) -> dict[str, Any]:
        return {"datasets": [d.as_dict() for d in self.datasets]}

    def as_text(self) -> str:
        lines = []
        for d in self.datasets:
            info = d.as_dict()
            lines.append(f"dataset {info['id']} ({info['folder']})")
            lines.append(f"  files found: {info['files_found']}, used: {info['used']}")
            for s in d.skipped:
                lines.append(f"  skipped ({s.reason}): {s.path}" + (f" — {s.detail}" if s.detail else ""))
            buckets = ", ".join(f"{k}: {v}" for k, v in info["buckets"].items())
            lines.append(f"  buckets: {buckets}")
            lines.append(f"  samples per epoch: {info['samples_per_epoch']} (repeats {info['repeats']})")
            for caption in info["example_captions"]:
                lines.append(f"  caption: {caption}")
        return "\n".join(lines)

    def write(self, output_dir: Path) -> Path:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "dataset_report.json"
        path.write_text(json.dumps(self.as_dict(), indent=2), encoding="utf-8")
        return path


def check_datasets(config: CoreOptions, family: ModelFamily) -> Report:
    """Scan every enabled image dataset (no model is loaded)."""
    reports = []
    for ds in resolve_datasets(config):
        side = square_side(ds.resolution, ds.resolution_type, family.alignment)
        reports.append(DatasetReport(dataset=ds, scan=scan_dataset(ds), size=(side, side)))
    return Report(reports)
