"""Batches for training: every batch comes from one size bucket, in an order fixed by (seed, epoch).

The whole plan of an epoch (batch order, which caption each sample uses, which samples drop their
caption) is drawn from a generator seeded with (seed, epoch). Resuming at batch *k* of epoch *e*
therefore replays exactly what an uninterrupted run would have seen, with no sampler state to
save beyond two integers. Batches are loaded from the caches on a background thread, so the disk
reads overlap the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stune.data.cache import LatentCache, TextEmbedCache
from stune.errors import UserError

EMPTY_CAPTION = ""


@dataclass
class Sample:
    dataset_id: str
    image: Path
    latent_path: Path
    captions: list[str]
    size: tuple[int, int]  # (width, height) of the training crop


@dataclass
class PlannedBatch:
    indices: list[int]
    captions: list[str]  # "" where caption dropout hit


class BatchPlan:
    """Deterministic per-epoch batching over samples grouped by size."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int, caption_dropout: float) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(samples):
            self.buckets.setdefault(sample.size, []).append(index)
        self.dropped_buckets = {size: len(ix) for size, ix in self.buckets.items() if len(ix) < batch_size}
        self.batches_per_epoch = sum(len(ix) // batch_size for ix in self.buckets.values())
        if self.batches_per_epoch == 0:
            raise UserError(
                f"The datasets give {len(samples)} samples, too few for one batch of {batch_size} "
                f"from a single size; raise `repeats` on a dataset or lower train_batch_size."
            )

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for size in sorted(self.buckets):
            members = self.buckets[size]
            order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
            usable = len(order) - len(order) % self.batch_size
            batches += [order[i : i + self.batch_size] for i in range(0, usable, self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        planned = []
        for indices in batches:
            captions = []
            for index in indices:
                options = self.samples[index].captions
                pick = (
                    options[int(torch.randint(len(options), (1,), generator=gen))] if len(options) > 1 else options[0]
                )
                dropped = float(torch.rand((), generator=gen)) < self.caption_dropout
                captions.append(EMPTY_CAPTION if dropped else pick)
            planned.append(PlannedBatch(indices, captions))
        return planned


class BatchLoader:
    """Loads planned batches from the caches, a few ahead on a background thread."""

    def __init__(self, plan: BatchPlan, text_cache: TextEmbedCache, prefetch: int = 2) -> None:
        self.plan = plan
        self.text_cache = text_cache
        self.prefetch = prefetch

    def load(self, batch: PlannedBatch) -> dict[str, Any]:
        samples = [self.plan.samples[i] for i in batch.indices]
        latents = [LatentCache.load(s.latent_path) for s in samples]
        embeds = [self.text_cache.load(c) for c in batch.captions]
        return {
            "latent_mean": torch.stack([x["mean"] for x in latents]),
            "latent_std": torch.stack([x["std"] for x in latents]),
            "embeds": {key: torch.stack([e[key] for e in embeds]) for key in embeds[0]},
            "captions": batch.captions,
            "paths": [str(s.image) for s in samples],
        }

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """Batches of ``epoch`` from position ``start`` on."""
        planned = self.plan.epoch(epoch)[start:]
        if self.prefetch <= 0:
            for batch in planned:
                yield self.load(batch)
            return
        out: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker() -> None:
            try:
                for batch in planned:
                    if stop.is_set():
                        return
                    out.put(self.load(batch))
                out.put(None)
            except BaseException as exc:  # surface loader errors in the training thread
                out.put(exc)

        thread = threading.Thread(target=worker, name="stune-batch-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
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
