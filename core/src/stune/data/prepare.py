"""From dataset list to training samples: scan folders, plan sizes, fill the latent and text caches."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from stune.data.cache import DROPPED_CAPTION, LatentCache, LatentJob, TextEmbedCache, entry_is_sound
from stune.data.images import load_mask, load_sample
from stune.data.loader import Sample
from stune.data.metadata import Skipped
from stune.data.report import Report, scan_all
from stune.distributed import Processes
from stune.offload import Placement

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
    latent_jobs: dict[str, list[LatentJob]]  # dataset id → jobs
    captions: list[str]
    trusted_latents: set[str]  # datasets whose latents are not checked (skip_file_discovery: vae)
    trusted_captions: set[str]  # captions not checked (skip_file_discovery: text)
    #: dataset id → image → the job caching the latent of its reference image (edit pairs)
    reference_jobs: dict[str, dict[Path, LatentJob]] = field(default_factory=dict)

    @property
    def missing_captions(self) -> list[str]:
        return self.text_cache.missing(c for c in self.captions if c not in self.trusted_captions)

    @property
    def missing_latents(self) -> int:
        return sum(
            1
            for ds_id, jobs in [
                *self.latent_jobs.items(),
                *((k, list(v.values())) for k, v in self.reference_jobs.items()),
            ]
            if ds_id not in self.trusted_latents
            for job in jobs
            if not entry_is_sound(job.target)
        )


@dataclass
class PreparedData:
    samples: list[Sample]  # training samples (image datasets)
    eval_samples: list[Sample]  # held out (eval datasets)
    text_cache: TextEmbedCache
    report: Report
    encoded_latents: int
    encoded_captions: int


def scan(config: CoreOptions, family: ModelFamily, processes: int | None = None) -> Report:
    """Scan every dataset; stop with a clear error if one cannot be trained on."""
    report = scan_all(config, family, processes)
    report.check_trainable()
    return report


def plan_caches(config: CoreOptions, family: ModelFamily, report: Report, extra_prompts: list[str]) -> CachePlan:
    """Cache file of every image and caption; nothing is encoded yet."""
    text_cache = TextEmbedCache(
        report.text_cache_dir,
        {"kind": "text", **family.text_cache_identity()},
        dropped_identity=family.unconditional_identity(),
        collate=family.collate_embeds,
    )
    latent_identity = {"kind": "latent", **family.latent_cache_identity()}
    jobs: dict[str, list[LatentJob]] = {}
    reference_jobs: dict[str, dict[Path, LatentJob]] = {}
    captions: list[str] = []
    trusted_latents: set[str] = set()
    trusted_captions: set[str] = set()
    for d in report.datasets:
        ds = d.dataset
        if ds.kind == "conditioning":
            continue
        cache = LatentCache(
            ds.latent_cache_dir,
            latent_identity,
            hash_filenames=ds.entry.hash_filenames,
            root=ds.folder,
        )
        jobs[ds.id] = [
            LatentJob(r.path, cache.path(r.path, r.plan, r.mask), r.plan, r.mask) for r in d.usable if r.plan
        ]
        if ds.references is not None:  # the references are cached in their own dataset's cache folder
            refs = ds.references
            ref_cache = LatentCache(
                refs.latent_cache_dir, latent_identity, hash_filenames=refs.entry.hash_filenames, root=refs.folder
            )
            reference_jobs[ds.id] = {
                r.path: LatentJob(r.reference, ref_cache.path(r.reference, r.reference_plan), r.reference_plan)
                for r in d.usable
                if r.reference is not None and r.reference_plan is not None
            }
        dataset_captions = [c for r in d.usable for c in r.captions]
        captions += dataset_captions
        if "vae" in ds.entry.skips:
            trusted_latents.add(ds.id)
        if "text" in ds.entry.skips:
            trusted_captions.update(dataset_captions)
    return CachePlan(
        report,
        text_cache,
        jobs,
        [*captions, DROPPED_CAPTION, *extra_prompts],
        trusted_latents,
        trusted_captions,
        reference_jobs,
    )


def fill_caches(
    plan: CachePlan,
    config: CoreOptions,
    family: ModelFamily,
    components: Components,
    host: PluginHost,
    device: torch.device,
    processes: Processes | None = None,
    placement: Placement | None = None,
) -> PreparedData:
    """Encode whatever is missing from the caches; return the training and eval samples.

    With several processes each encodes its own share of the images and captions (a fixed split
    of the full lists, so no entry is encoded twice), then all wait for each other.
    """
    processes = processes or Processes()
    placement = placement or Placement(device, config)
    encoded_latents = 0
    vae = components.vae
    startup = config.offload_during_startup
    if startup:  # only the encoder at work stays on the accelerator
        for name, encoder in components.text_encoders.items():
            placement.off(name, encoder, "offload_during_startup")

    def encode_images(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), placement.using({"vae": vae}, "encoding images"):  # enable_model_cpu_offload
            return family.encode_images(components, pixels.to(vae.device, dtype=vae.dtype))

    def prepare(job: LatentJob) -> tuple[np.ndarray, np.ndarray | None]:
        pixels = load_sample(job.image, job.plan)
        mask = load_mask(job.mask, job.plan, family.vae_scale_factor) if job.mask is not None else None
        return pixels, mask

    write_batch = config.write_batch_size
    for d in plan.report.datasets:
        jobs = plan.latent_jobs.get(d.dataset.id)
        if not jobs or d.dataset.id in plan.trusted_latents:
            continue
        batch = d.dataset.entry.write_batch_size or write_batch
        count, failures = LatentCache.fill(processes.share(jobs), prepare, encode_images, config.vae_batch_size, batch)
        encoded_latents += count
        for shared in processes.gather(sorted(failures.items())):
            for path, error in shared:
                d.extra_skipped.append(Skipped(path, "unreadable", error))
        pairs = plan.reference_jobs.get(d.dataset.id, {})
        unique = list({job.target: job for job in pairs.values()}.values())
        count, failures = LatentCache.fill(
            processes.share(unique), prepare, encode_images, config.vae_batch_size, batch
        )
        encoded_latents += count
        for shared in processes.gather(sorted(failures.items())):
            for reference, error in shared:  # an image whose reference cannot be decoded is skipped too
                for image, job in pairs.items():
                    if job.image == reference:
                        d.extra_skipped.append(Skipped(image, "unreadable reference", f"{reference}: {error}"))
    plan.report.check_trainable()  # decoding may have removed the last images of a dataset

    if startup:
        placement.off("vae", vae, "offload_during_startup")
        for name, encoder in components.text_encoders.items():
            placement.on(name, encoder, "offload_during_startup")

    def encode_text(prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        captions = [p for p in prompts if p != DROPPED_CAPTION]
        with torch.no_grad():
            encoded = iter(
                host.hooks.encode_text(family=family, components=components, prompts=captions, config=config)
                if captions
                else []
            )
            dropped = family.unconditional_embeds(components) if len(captions) < len(prompts) else {}
        return [dropped if p == DROPPED_CAPTION else next(encoded) for p in prompts]

    captions = list(dict.fromkeys(c for c in plan.captions if c not in plan.trusted_captions))
    with placement.using(dict(components.text_encoders), "encoding captions"):
        encoded_captions = plan.text_cache.fill(
            processes.share(captions), encode_text, config.text_encoder_batch_size, plan.report.text_write_batch_size
        )
    family.report_truncation()  # captions an encoder cut at its token limit (counted by the family)
    processes.barrier()  # every process reads every entry from here on

    samples: list[Sample] = []
    eval_samples: list[Sample] = []
    for d in plan.report.datasets:
        ds = d.dataset
        if ds.kind == "conditioning":
            continue
        kept = d.kept_buckets
        jobs_by_image = {job.image: job for job in plan.latent_jobs[ds.id]}
        references = plan.reference_jobs.get(ds.id, {})
        for record in d.usable:
            if record.plan is None or record.group not in kept:
                continue
            job = jobs_by_image[record.path]
            sample = Sample(
                dataset_id=ds.id,
                image=record.path,
                latent_path=job.target,
                captions=record.captions,
                size=record.group,
                is_regularisation=ds.is_regularisation,
                has_mask=job.mask is not None,
                reference_latent_path=references[record.path].target if record.path in references else None,
            )
            if ds.kind == "eval":
                eval_samples.append(sample)
            else:
                samples += [sample] * (1 + ds.repeats)
    return PreparedData(samples, eval_samples, plan.text_cache, plan.report, encoded_latents, encoded_captions)
