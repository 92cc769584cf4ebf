"""From dataset list to training samples: scan folders, fill the latent and text caches."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stune.data.cache import LatentCache, TextEmbedCache
from stune.data.config import resolve_datasets
from stune.data.images import Skipped, load_rgb, resize_center_crop, square_side, to_array
from stune.data.loader import EMPTY_CAPTION, Sample
from stune.data.report import DatasetReport, Report, scan_dataset
from stune.errors import UserError

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import Components, ModelFamily
    from stune.plugins import PluginHost

log = logging.getLogger("stune.data")


@dataclass
class CachePlan:
    """What the caches must hold, known before any model is loaded."""

    report: Report
    text_cache: TextEmbedCache
    latent_jobs: dict[str, list[tuple[Path, Path]]]  # dataset id → (image, cache file)
    captions: list[str]

    @property
    def missing_captions(self) -> list[str]:
        return self.text_cache.missing(self.captions)

    @property
    def missing_latents(self) -> int:
        return sum(1 for jobs in self.latent_jobs.values() for _, target in jobs if not target.is_file())


@dataclass
class PreparedData:
    samples: list[Sample]
    text_cache: TextEmbedCache
    report: Report
    encoded_latents: int
    encoded_captions: int


def scan(config: CoreOptions, family: ModelFamily) -> Report:
    """Scan every dataset; a dataset with no usable image is an error naming it and why."""
    reports = []
    for ds in resolve_datasets(config):
        side = square_side(ds.resolution, ds.resolution_type, family.alignment)
        report = DatasetReport(dataset=ds, scan=scan_dataset(ds), size=(side, side))
        if not report.scan.records:
            raise UserError(_no_images_message(report))
        reports.append(report)
    return Report(reports)


def _no_images_message(report: DatasetReport) -> str:
    reasons = Counter(s.reason for s in report.skipped)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "no image files in it"
    return (
        f"Dataset `{report.dataset.id}` has no usable image in {report.dataset.folder} "
        f"({report.scan.found} files found; skipped: {why}); add images or fix its caption_strategy."
    )


def _prepare_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    return to_array(resize_center_crop(load_rgb(path), *size))


def plan_caches(config: CoreOptions, family: ModelFamily, report: Report, extra_prompts: list[str]) -> CachePlan:
    """Cache file of every image and caption; nothing is encoded yet."""
    identity = family.cache_identity()
    text_cache = TextEmbedCache(report.datasets[0].dataset.text_cache_dir, {"kind": "text", **identity})
    jobs = {}
    for ds_report in report.datasets:
        cache = LatentCache(ds_report.dataset.latent_cache_dir, {"kind": "latent", **identity})
        jobs[ds_report.dataset.id] = [
            (r.path, cache.path(r.path, ds_report.size, "center")) for r in ds_report.scan.records
        ]
    captions = [c for d in report.datasets for r in d.scan.records for c in r.captions]
    return CachePlan(report, text_cache, jobs, [*captions, EMPTY_CAPTION, *extra_prompts])


def fill_caches(
    plan: CachePlan, config: CoreOptions, family: ModelFamily, components: Components, host: PluginHost
) -> PreparedData:
    """Encode whatever is missing from the caches; return the training samples."""
    samples: list[Sample] = []
    encoded_latents = 0
    vae = components.vae

    def encode_images(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return family.encode_images(components, pixels.to(vae.device, dtype=vae.dtype))

    for ds_report in plan.report.datasets:
        ds = ds_report.dataset
        jobs = plan.latent_jobs[ds.id]
        prepare = partial(_prepare_image, size=ds_report.size)
        count, failures = LatentCache.fill(jobs, prepare, encode_images, config.vae_batch_size)
        encoded_latents += count
        for path, error in failures.items():
            ds_report.extra_skipped.append(Skipped(path, "unreadable", error))
        for record, (_, latent_path) in zip(ds_report.scan.records, jobs, strict=True):
            if record.path not in failures:
                samples += [Sample(ds.id, record.path, latent_path, record.captions, ds_report.size)] * (1 + ds.repeats)
        if ds_report.used == 0:
            raise UserError(_no_images_message(ds_report))

    def encode_text(prompts: list[str]) -> list[dict[str, Any]]:
        with torch.no_grad():
            out: list[dict[str, Any]] = host.hook.encode_text(
                family=family, components=components, prompts=prompts, config=config
            )
        return out

    encoded_captions = plan.text_cache.fill(plan.captions, encode_text, batch_size=8)
    return PreparedData(samples, plan.text_cache, plan.report, encoded_latents, encoded_captions)
