"""On-disk caches of VAE latents and text embeddings (safetensors, one file per entry).

An entry's file name is a hash of everything that shapes it: for latents the image file (path,
size, modification time), its size plan (bucket, resize, crop box), its loss mask and the model
identity; for text the caption and the text-encoder identity (model, token length, padding
rule). Change any of those and the entry is simply not found and re-encoded; nothing is ever
read stale. Writes go to a temporary name and are renamed into place, so a run killed mid-cache
leaves no half entry; they happen on a background thread so encoding does not wait for the disk.
Every entry carries a SHA-256 of its tensors in its safetensors metadata: an entry truncated or
flipped by one bit (a full disk, a bad copy, a file system without atomic renames) is found when
the caches are checked at start-up, removed and encoded again, never read as a wrong tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stune.data.buckets import SizePlan
from stune.errors import UserError

log = logging.getLogger("stune.data")

#: the caption key of what a dropped caption trains on (caption dropout); never a real caption
DROPPED_CAPTION = "\x00(dropped caption)"


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:40]


#: the safetensors metadata entry holding the SHA-256 of an entry's tensors
CHECKSUM_KEY = "stune_sha256"
#: (path, size, mtime) of entries whose checksum matched in this process: each is read once
_VERIFIED: set[tuple[str, int, int]] = set()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (whatever order the file stores them in)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A link left at either name is replaced, never written through (os.replace swaps the link itself):
    # a cache folder may sit on another disk through a linked folder, but no entry writes outside it.
    tmp.unlink(missing_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={CHECKSUM_KEY: tensor_digest(tensors)})
    os.replace(tmp, path)


def read_entry(path: Path) -> dict[str, torch.Tensor] | str:
    """The tensors of a cache entry, or why they cannot be trusted (unreadable, checksum differs)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors: dict[str, torch.Tensor] = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # truncated, a damaged header: safetensors says what it could not read
        return f"{type(exc).__name__}: {exc}"
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensor_digest(tensors) != expected:  # entries from before checksums: as read
        return "its tensors do not match the checksum written with them"
    return tensors


def entry_is_sound(path: Path) -> bool:
    """Whether the cache entry exists and reads back as written; a damaged one is removed (and
    logged) so that it is encoded again."""
    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    read = read_entry(path)
    if isinstance(read, str):
        log.warning("cache entry %s is damaged (%s); it is encoded again", path, read)
        path.unlink(missing_ok=True)
        return False
    _VERIFIED.add(key)
    return True


def load_entry(path: Path) -> dict[str, torch.Tensor]:
    """A cache entry for training; one damaged since start-up stops the run with one sentence (and is
    removed, so the same command encodes it again and resumes)."""
    try:
        stat = path.stat()
        if (str(path), stat.st_size, stat.st_mtime_ns) in _VERIFIED:
            # checked at start-up and not rewritten since: no checksum in the training step again
            return load_file(str(path))
    except (OSError, SafetensorError):
        pass  # gone or unreadable now: read_entry says why
    read = read_entry(path)
    if isinstance(read, str):
        path.unlink(missing_ok=True)
        raise UserError(
            f"The cache entry {path} was damaged during the run ({read[:200]}); it is removed: run the same "
            "command again to encode it anew and resume."
        )
    return read


class AsyncWriter:
    """Writes cache entries on a background thread, at most ``pending`` waiting at once."""

    def __init__(self, pending: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stune-cache-writer")
        self._futures: deque[Future[None]] = deque()
        self._pending = max(1, pending)

    def write(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self._futures.append(self._pool.submit(atomic_save, tensors, path))
        while len(self._futures) > self._pending:
            self._futures.popleft().result()

    def close(self) -> None:
        try:
            while self._futures:
                self._futures.popleft().result()  # re-raises a failed write here
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: list[Any], window: int) -> Iterable[Any]:
    """``pool.map`` that keeps at most ``window`` results in flight (decoded images are large)."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _stack(entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([entry[key] for entry in entries]) for key in entries[0]}


class TextEmbedCache:
    """Caption → dict of tensors. Keeps the most recently used entries in memory.

    ``identity``: what shapes every entry (the text encoders); ``dropped_identity``: what also
    shapes the :data:`DROPPED_CAPTION` entry (the family's unconditional-embedding options);
    ``collate``: how entries become a batch (the family's ``collate_embeds``; default: stacked).
    """

    def __init__(
        self,
        folder: Path,
        identity: dict[str, Any],
        memory_entries: int = 256,
        dropped_identity: dict[str, Any] | None = None,
        collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.folder = folder
        self.identity = identity
        self.dropped_identity = dropped_identity or {}
        self.collate = collate or _stack
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._memory_entries = memory_entries

    def path(self, caption: str) -> Path:
        key: dict[str, Any] = {"caption": caption, **self.identity}
        if caption == DROPPED_CAPTION:
            key["unconditional"] = self.dropped_identity
        return self.folder / f"{fingerprint(key)}.safetensors"

    def missing(self, captions: Iterable[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if not entry_is_sound(self.path(c))]

    def fill(
        self,
        captions: Iterable[str],
        encode: Callable[[list[str]], list[dict[str, torch.Tensor]]],
        batch_size: int,
        write_batch_size: int = 128,
    ) -> int:
        """Encode and store every caption not cached yet; returns how many were encoded."""
        todo = self.missing(captions)
        if not todo:
            return 0
        with (
            AsyncWriter(write_batch_size) as writer,
            tqdm(total=len(todo), desc="caching text embeddings", unit="caption", leave=False) as bar,
        ):
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for caption, tensors in zip(chunk, encode(chunk), strict=True):
                    writer.write(tensors, self.path(caption))
                bar.update(len(chunk))
        return len(todo)

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        if caption in self._memory:
            self._memory.move_to_end(caption)
            return self._memory[caption]
        path = self.path(caption)
        if not path.is_file():
            raise FileNotFoundError(
                f"the text-embedding cache has no entry for caption {caption!r} ({path}); "
                "remove `text` from skip_file_discovery so missing captions are encoded"
            )
        tensors = load_entry(path)
        self._memory[caption] = tensors
        if len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)
        return tensors


@dataclass
class LatentJob:
    image: Path
    target: Path
    plan: SizePlan
    mask: Path | None = None


def _file_identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class LatentCache:
    """(image, size plan, mask) → scaled latent ``mean`` and ``std`` (and the latent-grid ``mask``)."""

    def __init__(self, folder: Path, identity: dict[str, Any], hash_filenames: bool = True, root: Path | None = None):
        self.folder = folder
        self.identity = identity
        self.hash_filenames = hash_filenames
        self.root = root

    def path(self, image: Path, plan: SizePlan, mask: Path | None = None) -> Path:
        key = {
            "image": _file_identity(image),
            "plan": [plan.bucket, plan.resize_to, plan.crop_box],
            "mask": _file_identity(mask) if mask is not None else None,
            **self.identity,
        }
        digest = fingerprint(key)
        if self.hash_filenames or self.root is None:
            return self.folder / f"{digest}.safetensors"
        # Readable names that mirror the dataset's folders, still unique per plan and model.
        rel = image.relative_to(self.root).with_suffix("")
        return self.folder / rel.parent / f"{rel.name}-{digest[:12]}.safetensors"

    @staticmethod
    def fill(
        jobs: list[LatentJob],
        prepare: Callable[[LatentJob], tuple[np.ndarray, np.ndarray | None]],
        encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        batch_size: int,
        write_batch_size: int = 128,
        workers: int | None = None,
    ) -> tuple[int, dict[Path, str]]:
        """Encode the jobs whose cache file is missing.

        ``prepare`` decodes one image (and its mask) to arrays, on a thread pool so decoding
        overlaps encoding; ``encode`` turns a batch of pixels into latents. Jobs are grouped by
        bucket, so every VAE batch has one size. Returns the number encoded and the images that
        failed to decode, with the decoder's error.
        """
        todo = sorted((j for j in jobs if not entry_is_sound(j.target)), key=lambda j: j.plan.bucket)
        failures: dict[Path, str] = {}
        if not todo:
            return 0, failures
        encoded = 0
        workers = workers or max(1, min(8, os.cpu_count() or 1))

        def safe_prepare(job: LatentJob) -> tuple[np.ndarray, np.ndarray | None] | str:
            try:
                return prepare(job)
            except Exception as exc:  # corrupt or truncated file: skip it, say why
                return f"{type(exc).__name__}: {exc}"

        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            AsyncWriter(write_batch_size) as writer,
            tqdm(total=len(todo), desc="caching latents", unit="image", leave=False) as bar,
        ):
            decoded = _bounded_map(pool, safe_prepare, todo, window=2 * workers + batch_size)
            batch: list[tuple[LatentJob, tuple[np.ndarray, np.ndarray | None]]] = []
            for job, arrays in zip(todo, decoded, strict=True):
                if isinstance(arrays, str):
                    failures[job.image] = arrays
                    bar.update(1)
                    continue
                if batch and batch[0][0].plan.bucket != job.plan.bucket:
                    encoded += LatentCache._encode_batch(batch, encode, writer)
                    bar.update(len(batch))
                    batch = []
                batch.append((job, arrays))
                if len(batch) == batch_size:
                    encoded += LatentCache._encode_batch(batch, encode, writer)
                    bar.update(len(batch))
                    batch = []
            if batch:
                encoded += LatentCache._encode_batch(batch, encode, writer)
                bar.update(len(batch))
        return encoded, failures

    @staticmethod
    def _encode_batch(
        batch: list[tuple[LatentJob, tuple[np.ndarray, np.ndarray | None]]],
        encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        writer: AsyncWriter,
    ) -> int:
        pixels = torch.from_numpy(np.stack([arrays[0] for _, arrays in batch]))
        out = encode(pixels)
        for i, (job, (_, mask)) in enumerate(batch):
            entry = {k: v[i].detach().cpu().contiguous() for k, v in out.items()}
            if mask is not None:
                entry["mask"] = torch.from_numpy(mask)
            writer.write(entry, job.target)
        return len(batch)

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FileNotFoundError(
                f"the latent cache has no entry {path}; remove `vae` from skip_file_discovery so missing "
                "latents are encoded"
            )
        return load_entry(path)
