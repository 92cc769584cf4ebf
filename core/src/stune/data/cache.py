"""On-disk caches of VAE latents and text embeddings (safetensors, one file per entry).

An entry's file name is a hash of everything that shapes it: for latents the image file (path,
size, modification time), the training size and crop, and the model identity; for text the
caption and the text-encoder identity (model, token length, padding rule). Change any of those
and the entry is simply not found and re-encoded; nothing is ever read stale. Writes go to a
temporary name and are renamed into place, so a run killed mid-cache leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

log = logging.getLogger("stune.cache")


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:40]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: list[Any], window: int) -> Iterable[Any]:
    """``pool.map`` that keeps at most ``window`` results in flight (decoded images are large)."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class TextEmbedCache:
    """Caption → dict of tensors. Keeps the most recently used entries in memory."""

    def __init__(self, folder: Path, identity: dict[str, Any], memory_entries: int = 256) -> None:
        self.folder = folder
        self.identity = identity
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._memory_entries = memory_entries

    def path(self, caption: str) -> Path:
        return self.folder / f"{fingerprint({'caption': caption, **self.identity})}.safetensors"

    def missing(self, captions: Iterable[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if not self.path(c).is_file()]

    def fill(
        self, captions: Iterable[str], encode: Callable[[list[str]], list[dict[str, torch.Tensor]]], batch_size: int
    ) -> int:
        """Encode and store every caption not cached yet; returns how many were encoded."""
        todo = self.missing(captions)
        if not todo:
            return 0
        with tqdm(total=len(todo), desc="caching text embeddings", unit="caption", leave=False) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for caption, tensors in zip(chunk, encode(chunk), strict=True):
                    atomic_save(tensors, self.path(caption))
                bar.update(len(chunk))
        return len(todo)

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        if caption in self._memory:
            self._memory.move_to_end(caption)
            return self._memory[caption]
        tensors = load_file(str(self.path(caption)))
        self._memory[caption] = tensors
        if len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)
        return tensors


class LatentCache:
    """(image, size, crop) → scaled latent ``mean`` and ``std``."""

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = folder
        self.identity = identity

    def path(self, image: Path, size: tuple[int, int], crop: str) -> Path:
        stat = image.stat()
        key = {
            "image": str(image.resolve()),
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "size": list(size),
            "crop": crop,
            **self.identity,
        }
        return self.folder / f"{fingerprint(key)}.safetensors"

    @staticmethod
    def fill(
        jobs: list[tuple[Path, Path]],
        prepare: Callable[[Path], np.ndarray],
        encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        batch_size: int,
    ) -> tuple[int, dict[Path, str]]:
        """Encode the (image, cache path) jobs whose cache file is missing.

        ``prepare`` decodes one image to a CHW float array (run on a thread pool, so decoding
        overlaps encoding); ``encode`` turns a batch into latents. Returns the number encoded
        and the images that failed to decode, with the decoder's error.
        """
        todo = [(image, target) for image, target in jobs if not target.is_file()]
        failures: dict[Path, str] = {}
        if not todo:
            return 0, failures
        encoded = 0
        workers = max(1, min(8, os.cpu_count() or 1))

        def safe_prepare(image: Path) -> np.ndarray | str:
            try:
                return prepare(image)
            except Exception as exc:  # corrupt or truncated file: skip it, say why
                return f"{type(exc).__name__}: {exc}"

        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(todo), desc="caching latents", unit="image", leave=False) as bar,
        ):
            decoded = _bounded_map(pool, safe_prepare, [image for image, _ in todo], window=2 * workers + batch_size)
            batch: list[tuple[Path, np.ndarray]] = []
            for (image, target), array in zip(todo, decoded, strict=True):
                if isinstance(array, str):
                    failures[image] = array
                    bar.update(1)
                    continue
                batch.append((target, array))
                if len(batch) == batch_size:
                    encoded += LatentCache._encode_batch(batch, encode)
                    bar.update(len(batch))
                    batch = []
            if batch:
                encoded += LatentCache._encode_batch(batch, encode)
                bar.update(len(batch))
        return encoded, failures

    @staticmethod
    def _encode_batch(
        batch: list[tuple[Path, np.ndarray]], encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    ) -> int:
        # Images of one batch share a size (the caller groups them), so they stack.
        by_shape: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = {}
        for target, array in batch:
            by_shape.setdefault(array.shape, []).append((target, array))
        for group in by_shape.values():
            pixels = torch.from_numpy(np.stack([a for _, a in group]))
            out = encode(pixels)
            for i, (target, _) in enumerate(group):
                atomic_save({k: v[i].detach().cpu() for k, v in out.items()}, target)
        return len(batch)

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))
