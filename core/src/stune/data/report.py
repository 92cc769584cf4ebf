"""What was found, used and skipped in every dataset (``st-train check`` and ``dataset_report.json``)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stune.data.config import DatasetList, ResolvedDataset, resolve_datasets
from stune.data.images import load_rgb
from stune.data.metadata import Scan, Skipped, group_label, scan_dataset
from stune.errors import UserError

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily

log = logging.getLogger("stune.data")


def world_size() -> int:
    """Processes of this run, as torchrun and accelerate announce them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DatasetReport:
    dataset: ResolvedDataset
    scan: Scan
    effective_batch: int
    extra_skipped: list[Skipped] = field(default_factory=list)
    #: False with disable_bucket_pruning: a bucket smaller than a batch is filled by repeating its samples
    pruning: bool = True

    @property
    def skipped(self) -> list[Skipped]:
        return self.scan.skipped + self.extra_skipped

    @property
    def usable(self) -> list[Any]:
        bad = {s.path for s in self.extra_skipped}
        return [r for r in self.scan.records if r.path not in bad]

    def bucket_samples(self) -> Counter[tuple[int, ...]]:
        """Samples per epoch (images × (1 + repeats)) of every bucket (with its references' bucket
        when they have their own size: a batch shares both)."""
        counts: Counter[tuple[int, ...]] = Counter()
        for record in self.usable:
            counts[record.group] += 1 + self.dataset.repeats
        return counts

    @property
    def kept_buckets(self) -> dict[tuple[int, ...], int]:
        if self.dataset.kind != "image" or not self.pruning:
            return dict(self.bucket_samples())
        return {b: n for b, n in self.bucket_samples().items() if n >= self.effective_batch}

    @property
    def dropped_buckets(self) -> dict[tuple[int, ...], int]:
        if self.dataset.kind != "image" or not self.pruning:
            return {}
        return {b: n for b, n in self.bucket_samples().items() if n < self.effective_batch}

    def as_dict(self) -> dict[str, Any]:
        reasons = Counter(s.reason for s in self.skipped)
        captions = [c for r in self.usable[:3] for c in r.captions[:1]]
        kept = self.kept_buckets
        return {
            "id": self.dataset.id,
            "type": self.dataset.kind,
            "folder": str(self.dataset.folder),
            "files_found": self.scan.found,
            "used": len(self.usable),
            "skipped": dict(reasons),
            "skipped_files": [{"path": str(s.path), "reason": s.reason, "detail": s.detail} for s in self.skipped],
            "buckets": {group_label(g): n // (1 + self.dataset.repeats) for g, n in sorted(kept.items())},
            "dropped_buckets": {
                group_label(g): f"{n} samples < batch {self.effective_batch}"
                for g, n in sorted(self.dropped_buckets.items())
            },
            "repeats": self.dataset.repeats,
            "samples_per_epoch": sum(kept.values()),
            "batch_size": self.dataset.batch_size,
            "probability": self.dataset.entry.probability,
            "regularisation": self.dataset.is_regularisation,
            "masks": str(self.dataset.masks.folder) if self.dataset.masks else None,
            "references": str(self.dataset.references.folder) if self.dataset.references else None,
            "example_captions": captions,
        }


@dataclass
class Report:
    datasets: list[DatasetReport]
    text_cache_dir: Path
    text_write_batch_size: int = 128

    @property
    def training(self) -> list[DatasetReport]:
        return [d for d in self.datasets if d.dataset.kind == "image"]

    @property
    def evaluation(self) -> list[DatasetReport]:
        return [d for d in self.datasets if d.dataset.kind == "eval"]

    def as_dict(self) -> dict[str, Any]:
        return {"datasets": [d.as_dict() for d in self.datasets if d.dataset.kind != "conditioning"]}

    def as_text(self) -> str:
        lines = []
        for d in self.datasets:
            if d.dataset.kind == "conditioning":
                continue
            info = d.as_dict()
            role = {"image": "", "eval": " [eval: held out]"}[d.dataset.kind]
            if info["regularisation"]:
                role += " [regularisation]"
            lines.append(f"dataset {info['id']} ({info['folder']}){role}")
            lines.append(f"  files found: {info['files_found']}, used: {info['used']}")
            for reason, count in info["skipped"].items():
                lines.append(f"  skipped {count}: {reason}")
            for s in d.skipped:
                lines.append(f"    {s.path}: {s.reason}" + (f" ({s.detail})" if s.detail else ""))
            buckets = ", ".join(f"{k}: {v}" for k, v in info["buckets"].items()) or "none"
            lines.append(f"  buckets (images): {buckets}")
            for bucket, why in info["dropped_buckets"].items():
                lines.append(f"  bucket {bucket} dropped: {why}")
            if info["masks"]:
                lines.append(f"  loss masks from: {info['masks']}")
            if info["references"]:
                lines.append(f"  reference images from: {info['references']}")
            lines.append(
                f"  samples per epoch: {info['samples_per_epoch']} (repeats {info['repeats']}, "
                f"batch {info['batch_size']}, probability {info['probability']})"
            )
            for caption in info["example_captions"]:
                lines.append(f"  caption: {caption}")
        return "\n".join(lines)

    def write(self, output_dir: Path) -> Path:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "dataset_report.json"
        path.write_text(json.dumps(self.as_dict(), indent=2), encoding="utf-8")
        return path

    def log_problems(self) -> None:
        """Warn about every skipped file and every bucket too small to train on."""
        for d in self.datasets:
            for skipped in d.skipped:
                log.warning(
                    "dataset %s: skipped %s (%s) %s", d.dataset.id, skipped.path, skipped.reason, skipped.detail
                )
            for group, count in d.dropped_buckets.items():
                log.warning(
                    "dataset %s: bucket %s has %d samples, fewer than a batch of %d: not trained on",
                    d.dataset.id,
                    group_label(group),
                    count,
                    d.effective_batch,
                )

    def check_trainable(self) -> None:
        """A dataset with no usable image, or datasets that cannot fill one batch, stop the run."""
        for d in self.datasets:
            if d.dataset.kind in ("image", "eval") and not d.usable:
                raise UserError(_no_images_message(d))
        for d in self.training:
            if not d.kept_buckets:
                samples = sum(d.bucket_samples().values())
                raise UserError(
                    f"Dataset `{d.dataset.id}` gives {samples} samples per epoch, too few for one batch of "
                    f"{d.effective_batch} in any size bucket (batch × accumulation × processes); "
                    "raise its `repeats` or lower train_batch_size."
                )


def _no_images_message(report: DatasetReport) -> str:
    reasons = Counter(s.reason for s in report.skipped)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "no image files in it"
    return (
        f"Dataset `{report.dataset.id}` has no usable image in {report.dataset.folder} "
        f"({report.scan.found} files found; skipped: {why}); add images or fix its settings "
        "(caption_strategy, minimum_image_size, aspect limits)."
    )


def scan_all(config: CoreOptions, family: ModelFamily, processes: int | None = None) -> Report:
    """Scan every dataset (no model is loaded); ``processes`` defaults to WORLD_SIZE."""
    listing: DatasetList = resolve_datasets(config)
    effective = config.gradient_accumulation_steps * (processes or world_size())
    reports = [
        DatasetReport(
            dataset=ds,
            # A conditioning dataset (masks, reference images) is read through the dataset it pairs with.
            scan=Scan(ds.id)
            if ds.kind == "conditioning"
            else scan_dataset(ds, family.alignment, config.aspect_bucket_rounding, family.maximum_canvas_pixels),
            effective_batch=ds.batch_size * effective,
            pruning=not config.disable_bucket_pruning,
        )
        for ds in listing.datasets
    ]
    return Report(reports, listing.text_cache_dir, listing.text_write_batch_size)


def verify_decoding(report: Report) -> None:
    """Decode every used image fully (truncated files only fail here); failures become skips."""

    def check(path: Path) -> str | None:
        try:
            load_rgb(path)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for d in report.datasets:
            records = d.usable
            paths = [r.path for r in records]
            for path, error in zip(paths, pool.map(check, paths), strict=True):
                if error:
                    d.extra_skipped.append(Skipped(path, "unreadable", error))
            paired = [r for r in records if r.reference is not None]
            references = [r.reference for r in paired]
            for record, error in zip(paired, pool.map(check, references), strict=True):
                if error:
                    d.extra_skipped.append(Skipped(record.path, "unreadable reference", f"{record.reference}: {error}"))
