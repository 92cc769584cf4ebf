"""Discovering a dataset: its images, their sizes, captions, masks and training-size plans.

Sizes come from the image headers (``metadata_backend: discovery``) or from parquet/JSONL
columns (``metadata_backend: parquet``). Header reads are remembered in an index in the
dataset's cache folder, keyed by file size and modification time, so a second scan of a large
dataset opens only new or changed files; ``skip_file_discovery: "metadata"`` (or ``aspect``)
trusts that index without even listing the folder. Nothing is written to the dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stune.data.buckets import SizePlan, plan_size, skip_reason
from stune.data.captions import edited_captions
from stune.data.config import ResolvedDataset
from stune.data.images import list_images, oriented_size
from stune.errors import ConfigError

INDEX_NAME = ".stune-index-{id}.json"
log = logging.getLogger("stune.data")


@dataclass
class ImageRecord:
    path: Path
    captions: list[str]
    width: int  # after EXIF orientation
    height: int
    plan: SizePlan | None = None
    mask: Path | None = None
    reference: Path | None = None  # the image an edit starts from (reference datasets)
    reference_plan: SizePlan | None = None

    @property
    def group(self) -> tuple[int, ...]:
        """What a batch must share: the bucket, and the reference's bucket when it has its own."""
        assert self.plan is not None
        if self.reference_plan is None or self.reference_plan.bucket == self.plan.bucket:
            return self.plan.bucket
        return (*self.plan.bucket, *self.reference_plan.bucket)


def group_label(group: tuple[int, ...]) -> str:
    """``64x64``, or ``64x64+128x64`` for a bucket whose references have their own size."""
    return "+".join(f"{group[i]}x{group[i + 1]}" for i in range(0, len(group), 2))


@dataclass
class Skipped:
    path: Path
    reason: str
    detail: str = ""


@dataclass
class Scan:
    dataset_id: str
    found: int = 0
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


# -- sizes -------------------------------------------------------------------------------------------


class SizeIndex:
    """(width, height) or the decoder's error per image, remembered across runs."""

    def __init__(self, ds: ResolvedDataset) -> None:
        self.path = ds.latent_cache_dir / INDEX_NAME.format(id=ds.id)
        self.folder = ds.folder
        self.entries: dict[str, list[Any]] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.entries = {}  # a damaged index is only a slower scan
        self.changed = False

    def listed(self) -> list[Path]:
        return [self.folder / rel for rel in sorted(self.entries)]

    def size(self, path: Path) -> tuple[int, int] | str:
        rel = path.relative_to(self.folder).as_posix()
        stat = path.stat()
        known = self.entries.get(rel)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[3] if known[2] is None else (known[2], known[3])
        try:
            width, height = oriented_size(path)
            entry: list[Any] = [stat.st_size, stat.st_mtime_ns, width, height]
        except Exception as exc:  # any decoder error: the file is reported, the run goes on
            entry = [stat.st_size, stat.st_mtime_ns, None, f"{type(exc).__name__}: {exc}"]
        self.entries[rel] = entry
        self.changed = True
        return entry[3] if entry[2] is None else (entry[2], entry[3])

    def trusted(self, path: Path) -> tuple[int, int] | str:
        known = self.entries[path.relative_to(self.folder).as_posix()]
        return known[3] if known[2] is None else (known[2], known[3])

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)  # a link planted there is replaced, not written through
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache folder only costs speed


# -- captions --------------------------------------------------------------------------------------------


class CaptionTable:
    """Rows of a parquet or JSONL file, looked up by image file name."""

    def __init__(self, ds: ResolvedDataset) -> None:
        source = ds.entry.parquet
        assert source is not None
        self.source = source
        path = Path(source.path)
        if not path.is_file():
            raise ConfigError(f"Dataset `{ds.id}`: the parquet file {path} does not exist; fix parquet.path.")
        rows = _read_rows(path, ds.id)
        self.rows: dict[str, dict[str, Any]] = {}
        for row in rows:
            if source.filename_column not in row:
                raise ConfigError(
                    f"Dataset `{ds.id}`: {path} has no column `{source.filename_column}`; set parquet.filename_column "
                    "(or the global parquet_filename_column)."
                )
            self.rows[str(row[source.filename_column])] = row

    def row(self, path: Path, folder: Path) -> dict[str, Any] | None:
        rel = path.relative_to(folder)
        if self.source.identifier_includes_extension:
            keys = [rel.as_posix(), path.name]
        else:
            keys = [rel.with_suffix("").as_posix(), path.stem]
        return next((self.rows[k] for k in keys if k in self.rows), None)

    def captions(self, row: dict[str, Any]) -> list[str]:
        for column in (self.source.caption_column, self.source.fallback_caption_column):
            value = row.get(column) if column else None
            values = value if isinstance(value, list) else [value]
            captions = [capped(str(v), "parquet caption").strip() for v in values if v is not None and str(v).strip()]
            if captions:
                return captions
        return []

    def size(self, row: dict[str, Any]) -> tuple[int, int] | None:
        w, h = self.source.width_column, self.source.height_column
        if w and h and row.get(w) and row.get(h):
            return int(row[w]), int(row[h])
        return None


def _read_rows(path: Path, dataset_id: str) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows: list[dict[str, Any]] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"Dataset `{dataset_id}`: {path} line {number} is not JSON ({exc.msg})."
                    ) from None
        return rows
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"Dataset `{dataset_id}` reads {path}, which needs pyarrow; `pip install 'stune[parquet]'` "
            "or give the captions as a .jsonl file."
        ) from None
    table: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return table


#: longer captions are cut here: no text encoder reads more than a few thousand characters (T5: 512
#: tokens), and a megabyte caption would sit in memory and in every cache key of its image
MAX_CAPTION_CHARS = 8192


def capped(text: str, where: str) -> str:
    if len(text) <= MAX_CAPTION_CHARS:
        return text
    log.warning(
        "%s is %d characters long; it is cut to %d (the text encoders read fewer still: their tokenizers "
        "truncate to their token length)",
        where,
        len(text),
        MAX_CAPTION_CHARS,
    )
    return text[:MAX_CAPTION_CHARS]


def read_caption_file(path: Path) -> str:
    """A caption file's text: UTF-8, else decoded with replacement characters and a warning."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        log.warning("caption file %s is not UTF-8 (byte %d); undecodable bytes are replaced by \ufffd", path, exc.start)
        text = data.decode("utf-8", errors="replace")
    return capped(text.replace("\x00", " "), f"caption file {path}")


def file_captions(path: Path, strategy: str, instance_prompt: str | None, split_lines: bool = True) -> list[str]:
    """The caption(s) of an image from its name, its .txt file or the instance prompt."""
    if strategy == "instanceprompt":
        return [instance_prompt or ""]
    if strategy == "textfile":
        text_path = path.with_suffix(".txt")
        if not text_path.is_file():
            return []
        text = read_caption_file(text_path)
        if not split_lines:  # disable_multiline_split: the whole file is one caption
            return [text.strip()] if text.strip() else []
        lines = [line.strip() for line in text.splitlines()]
        return [line for line in lines if line]
    return [" ".join(path.stem.replace("_", " ").split())]


def with_instance_prompt(captions: list[str], ds: ResolvedDataset) -> list[str]:
    prompt = ds.instance_prompt or ""
    if ds.entry.only_instance_prompt:
        return [prompt]
    if ds.entry.prepend_instance_prompt and ds.caption_strategy != "instanceprompt":
        return [f"{prompt} {c}".strip() for c in captions]
    return captions


# -- the scan ------------------------------------------------------------------------------------------------


def _mask_files(conditioning: ResolvedDataset) -> dict[str, Path]:
    return {p.relative_to(conditioning.folder).with_suffix("").as_posix(): p for p in list_images(conditioning.folder)}


def _pair_reference(
    record: ImageRecord,
    key: str,
    references: dict[str, Path],
    sizes: SizeIndex,
    refs: ResolvedDataset,
    alignment: int,
    rounding: int,
    max_pixels: int | None,
) -> Skipped | None:
    """Find and plan an image's reference (the picture its edit starts from); why not, if it cannot."""
    assert record.plan is not None
    reference = references.get(key)
    if reference is None:
        return Skipped(record.path, "missing reference", f"no image named {key}.* in {refs.folder}")
    size = sizes.size(reference)
    if isinstance(size, str):
        return Skipped(record.path, "unreadable reference", f"{reference}: {size}")
    if refs.entry.conditioning_type == "reference_strict":
        if size != (record.width, record.height):
            return Skipped(
                record.path,
                "reference size differs",
                f"{reference} is {size[0]}x{size[1]}, the image {record.width}x{record.height} (reference_strict)",
            )
        record.reference_plan = record.plan  # cropped exactly like its target: pixel-aligned pairs
    else:
        key_text = str(reference.resolve())
        record.reference_plan = plan_size(
            size[0], size[1], refs, alignment, rounding, key=key_text, max_pixels=max_pixels
        )
    record.reference = reference
    return None


def _subset_key(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()


def scan_dataset(ds: ResolvedDataset, alignment: int, rounding: int, max_pixels: int | None = None) -> Scan:
    """Every image of a dataset with its captions, size, mask, reference and size plans; the rest
    skipped with a reason."""
    scan = Scan(dataset_id=ds.id)
    index = SizeIndex(ds)
    trust_index = bool(ds.entry.skips & {"metadata", "aspect"}) and bool(index.entries)
    paths = index.listed() if trust_index else list_images(ds.folder)
    table = CaptionTable(ds) if ds.entry.parquet is not None else None
    masks = _mask_files(ds.masks) if ds.masks is not None else None
    references = _mask_files(ds.references) if ds.references is not None else None
    reference_sizes = SizeIndex(ds.references) if ds.references is not None else None
    for path in paths:
        scan.found += 1
        if trust_index and not path.is_file():  # listed by the index, gone from the folder since
            if not ds.ignore_missing_files:
                raise ConfigError(
                    f"Dataset `{ds.id}`: {path} is listed in its trusted index (skip_file_discovery) but no longer "
                    "exists; set ignore_missing_files true to skip such files, or remove metadata/aspect from "
                    "skip_file_discovery to rescan the folder."
                )
            scan.skipped.append(Skipped(path, "missing file", "listed in the index, gone from the folder"))
            continue
        row = table.row(path, ds.folder) if table is not None else None
        if ds.caption_strategy == "parquet":
            captions = table.captions(row) if (table is not None and row is not None) else []
        else:
            captions = file_captions(
                path, ds.caption_strategy, ds.instance_prompt, not ds.entry.disable_multiline_split
            )
        if not captions and not ds.entry.only_instance_prompt:
            where = (
                "no row in the parquet file"
                if ds.caption_strategy == "parquet"
                else f"no {path.with_suffix('.txt').name}"
            )
            scan.skipped.append(Skipped(path, "missing caption", where))
            continue
        size = (
            table.size(row)
            if (table is not None and row is not None and ds.entry.metadata_backend == "parquet")
            else None
        )
        if size is None:
            size_or_error = index.trusted(path) if trust_index else index.size(path)
            if isinstance(size_or_error, str):
                bomb = size_or_error.startswith("DecompressionBombError")
                scan.skipped.append(Skipped(path, "over the pixel limit" if bomb else "unreadable", size_or_error))
                continue
            size = size_or_error
        reason = skip_reason(size[0], size[1], ds)
        if reason:
            scan.skipped.append(Skipped(path, reason, f"{size[0]}x{size[1]}"))
            continue
        mask = None
        if masks is not None:
            mask = masks.get(path.relative_to(ds.folder).with_suffix("").as_posix())
            if mask is None:
                scan.skipped.append(Skipped(path, "missing mask", f"no mask for it in {ds.masks.folder}"))  # type: ignore[union-attr]
                continue
        record = ImageRecord(path, with_instance_prompt(edited_captions(captions, ds), ds), size[0], size[1], mask=mask)
        record.plan = plan_size(
            size[0], size[1], ds, alignment, rounding, key=str(path.resolve()), max_pixels=max_pixels
        )
        upscale = max(record.plan.resize_to[0] / size[0], record.plan.resize_to[1] / size[1])
        if ds.max_upscale_threshold is not None and upscale > 1 + ds.max_upscale_threshold + 1e-9:
            detail = f"{size[0]}x{size[1]} needs ×{upscale:.2f} for {record.plan.bucket[0]}x{record.plan.bucket[1]}"
            scan.skipped.append(Skipped(path, "upscaled beyond max_upscale_threshold", detail))
            continue
        if references is not None and reference_sizes is not None and ds.references is not None:
            key = path.relative_to(ds.folder).with_suffix("").as_posix()
            problem = _pair_reference(
                record, key, references, reference_sizes, ds.references, alignment, rounding, max_pixels
            )
            if problem is not None:
                scan.skipped.append(problem)
                continue
        scan.records.append(record)
    index.save()
    if reference_sizes is not None:
        reference_sizes.save()
    limit = ds.entry.max_num_samples
    if limit and len(scan.records) > limit:
        # A fixed subset: the same images every run, whatever the seed.
        keep = set(sorted(range(len(scan.records)), key=lambda i: _subset_key(scan.records[i].path))[:limit])
        for i, record in enumerate(scan.records):
            if i not in keep:
                scan.skipped.append(Skipped(record.path, "beyond max_num_samples"))
        scan.records = [r for i, r in enumerate(scan.records) if i in keep]
    return scan
