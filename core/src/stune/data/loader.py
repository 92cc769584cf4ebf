"""Batches for training: every batch comes from one dataset and one size bucket, in an order fixed
by (seed, epoch).

The whole plan of an epoch (which dataset each batch comes from, the batch order, which caption
each sample uses, which samples drop their caption) is drawn from a generator seeded with (seed,
epoch). Resuming at batch *k* of epoch *e* therefore replays exactly what an uninterrupted run
would have seen, with no sampler state to save beyond two integers. An epoch uses every batch of
every training dataset once; which dataset comes next is drawn with weight
``probability × batches it has left``. Batches are loaded from the caches on a background
thread, so the disk reads overlap the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stune.data.cache import DROPPED_CAPTION, LatentCache, TextEmbedCache
from stune.distributed import Processes
from stune.errors import UserError


@dataclass
class Sample:
    dataset_id: str
    image: Path
    latent_path: Path
    captions: list[str]
    size: tuple[int, ...]  # (width, height) of the training crop (+ its reference's, when it has its own)
    is_regularisation: bool = False
    has_mask: bool = False
    reference_latent_path: Path | None = None  # the cached latent of the image an edit starts from


@dataclass
class PlannedBatch:
    dataset_id: str
    indices: list[int]
    captions: list[str]  # DROPPED_CAPTION where caption dropout hit


class BatchPlan:
    """Deterministic per-epoch batching over samples grouped by dataset and size."""

    def __init__(
        self,
        samples: list[Sample],
        batch_sizes: dict[str, int],
        seed: int,
        caption_dropout: float,
        probabilities: dict[str, float] | None = None,
        processes: Processes | None = None,
        fill_partial: bool = False,
    ) -> None:
        self.processes = processes or Processes()
        # disable_bucket_pruning: a bucket's last, partial batch (or a bucket smaller than a batch) is
        # completed with repeats of its own samples, since a batch never mixes sizes.
        self.fill_partial = fill_partial
        self.samples = samples
        self.batch_sizes = batch_sizes
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.probabilities = {k: v for k, v in (probabilities or {}).items()}
        self.groups: dict[str, dict[tuple[int, ...], list[int]]] = {}
        for index, sample in enumerate(samples):
            self.groups.setdefault(sample.dataset_id, {}).setdefault(sample.size, []).append(index)
        self.dropped_buckets = {
            (ds, size): len(ix)
            for ds, buckets in self.groups.items()
            for size, ix in buckets.items()
            if len(ix) < batch_sizes[ds] and not fill_partial
        }
        total = sum(
            -(-len(ix) // batch_sizes[ds]) if fill_partial else len(ix) // batch_sizes[ds]
            for ds, buckets in self.groups.items()
            for ix in buckets.values()
        )
        self.batches_per_epoch = total // self.processes.world  # per process
        if self.batches_per_epoch == 0:
            raise UserError(
                f"The datasets give {len(samples)} samples, too few for one batch from a single size; "
                "raise `repeats` on a dataset or lower train_batch_size."
            )

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        per_dataset: dict[str, list[list[int]]] = {}
        for ds in sorted(self.groups):
            size = self.batch_sizes[ds]
            batches: list[list[int]] = []
            for bucket in sorted(self.groups[ds]):
                members = self.groups[ds][bucket]
                order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
                usable = len(order) - len(order) % size
                batches += [order[i : i + size] for i in range(0, usable, size)]
                if self.fill_partial and usable < len(order):
                    rest = order[usable:]
                    batches.append(rest + [order[i % len(order)] for i in range(size - len(rest))])
            per_dataset[ds] = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        names = [ds for ds in per_dataset if per_dataset[ds]]
        planned: list[PlannedBatch] = []
        while names:
            weights = torch.tensor([self.probabilities.get(ds, 1.0) * len(per_dataset[ds]) for ds in names])
            pick = names[int(torch.multinomial(weights, 1, generator=gen))] if len(names) > 1 else names[0]
            indices = per_dataset[pick].pop()
            if not per_dataset[pick]:
                names.remove(pick)
            planned.append(PlannedBatch(pick, indices, [self._caption(i, gen) for i in indices]))
        # Every process sees the same plan and takes every world-th batch, so each process steps
        # the same number of times and no batch is trained twice.
        return self.processes.share(planned[: self.batches_per_epoch * self.processes.world])

    def _caption(self, index: int, gen: torch.Generator) -> str:
        options = self.samples[index].captions
        pick = options[int(torch.randint(len(options), (1,), generator=gen))] if len(options) > 1 else options[0]
        dropped = float(torch.rand((), generator=gen)) < self.caption_dropout
        return DROPPED_CAPTION if dropped else pick


class BatchLoader:
    """Loads planned batches from the caches, a few ahead on a background thread."""

    def __init__(self, plan: BatchPlan, text_cache: TextEmbedCache, prefetch: int = 2) -> None:
        self.plan = plan
        self.text_cache = text_cache
        self.prefetch = prefetch

    def load(self, batch: PlannedBatch) -> dict[str, Any]:
        samples = [self.plan.samples[i] for i in batch.indices]
        return load_batch(samples, batch.captions, self.text_cache)

    def _planned(self, epoch: int, start: int) -> Iterator[tuple[int, int, PlannedBatch]]:
        while True:
            for position, batch in enumerate(self.plan.epoch(epoch)[start:], start=start):
                yield epoch, position, batch
            epoch, start = epoch + 1, 0

    def stream(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, position in the epoch, batch) from ``start`` of ``epoch`` on, epoch after epoch,
        endlessly; one background thread loads ahead across epoch boundaries."""
        if self.prefetch <= 0:
            for batch_epoch, position, batch in self._planned(epoch, start):
                yield batch_epoch, position, self.load(batch)
            return
        out: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker() -> None:
            try:
                for batch_epoch, position, batch in self._planned(epoch, start):
                    if stop.is_set():
                        return
                    out.put((batch_epoch, position, self.load(batch)))
            except BaseException as exc:  # surface loader errors in the training thread
                out.put(exc)

        thread = threading.Thread(target=worker, name="stune-batch-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def load_batch(samples: list[Sample], captions: list[str], text_cache: TextEmbedCache) -> dict[str, Any]:
    """A batch of cached latents, caption embeddings, loss weights (datasets with masks) and the
    latents of reference images (edit pairs: ``batch["conditioning"]["reference_latents"]``, the
    distribution's mean — a reference is an input, not something to sample)."""
    latents = [LatentCache.load(s.latent_path) for s in samples]
    embeds = [text_cache.load(c) for c in captions]
    batch: dict[str, Any] = {
        "latent_mean": torch.stack([x["mean"] for x in latents]),
        "latent_std": torch.stack([x["std"] for x in latents]),
        "embeds": text_cache.collate(embeds),
        "captions": captions,
        "paths": [str(s.image) for s in samples],
        "is_regularisation": samples[0].is_regularisation,
    }
    if samples[0].has_mask:
        batch["loss_weight"] = torch.stack([x["mask"] for x in latents]).unsqueeze(1).float()
    references = [s.reference_latent_path for s in samples]
    if references[0] is not None:
        means = [LatentCache.load(path)["mean"] for path in references if path is not None]
        batch["conditioning"] = {"reference_latents": torch.stack(means)}
    return batch
