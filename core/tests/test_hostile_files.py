"""Hostile files in a dataset folder: decompression bombs, images with no or one pixel, animated,
16-bit and CMYK images, captions that are not UTF-8 or a megabyte long, symlinks. Each is
generated here with Pillow; each is either trained on (decoded as documented) or skipped with a
reason the report counts, never a crash. And nothing is ever written into a dataset folder."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from stune.data.config import resolve_datasets
from stune.data.images import load_rgb, oriented_size
from stune.data.metadata import MAX_CAPTION_CHARS, scan_dataset
from stune.plugins import PluginHost
from stune.testing import make_images


def _scan(tmp_path: Path, **entry: Any) -> Any:
    listing = tmp_path / "datasets.json"
    listing.write_text(json.dumps([{"id": "d", "instance_data_dir": str(tmp_path / "img"), **entry}]))
    config = (
        PluginHost.build(entry_points=False)
        .config_model()
        .model_validate(
            {
                "data_backend_config": str(listing),
                "cache_dir": str(tmp_path / "cache"),
                "minimum_image_size": 0,
                "resolution": 64,
                "resolution_type": "pixel",
                "caption_strategy": "textfile",
            }
        )
    )
    return scan_dataset(resolve_datasets(config).datasets[0], 16, 2)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zero_pixel_png(path: Path) -> None:
    """A PNG whose header says 0x0 (Pillow refuses to write one, so the bytes are put together here)."""
    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _caption(path: Path, text: str = "a caption") -> None:
    path.with_suffix(".txt").write_text(text)


def test_decompression_bombs_are_skipped_by_pillows_limit(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    make_images(folder, 1)
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    # Bilevel images compress to almost nothing: a few kilobytes that would decode to 100+ megapixels.
    over_twice = (int((2 * limit) ** 0.5) + 64,) * 2  # Pillow raises DecompressionBombError itself
    over_once = (int(limit**0.5) + 64,) * 2  # Pillow only warns: stune refuses it too
    for name, size in {"bomb": over_twice, "warned": over_once}.items():
        Image.new("1", size).save(folder / f"{name}.png")
        _caption(folder / f"{name}.png")
        assert (folder / f"{name}.png").stat().st_size < 2_000_000
    scan = _scan(tmp_path)
    assert [r.path.name for r in scan.records] == ["image_000.png"]
    skipped = {s.path.name: s for s in scan.skipped}
    assert skipped.keys() == {"bomb.png", "warned.png"}
    assert all(s.reason == "over the pixel limit" for s in skipped.values())
    assert "MAX_IMAGE_PIXELS" in skipped["warned.png"].detail
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(folder / "warned.png")  # decoding refuses it too (an index trusted with skip_file_discovery)


def test_the_limit_is_read_when_images_are_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "img", 2, size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # a program lowering Pillow's limit
    assert {s.reason for s in _scan(tmp_path).skipped} == {"over the pixel limit"}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # ... or lifting it
    assert oriented_size(tmp_path / "img" / "image_000.png") == (64, 64)


def test_zero_and_one_pixel_images(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    _zero_pixel_png(folder / "empty.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "dot.png")
    for name in ("empty", "dot"):
        _caption(folder / f"{name}.png")
    scan = _scan(tmp_path)
    assert {s.path.name: s.reason for s in scan.skipped} == {"empty.png": "unreadable"}
    (dot,) = scan.records
    assert dot.plan is not None and min(dot.plan.bucket) >= 16  # one pixel, upscaled to a bucket
    assert load_rgb(dot.path).getpixel((0, 0)) == (200, 10, 10)


def test_animated_16_bit_and_cmyk_images_decode(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(folder / "anim.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep.png")  # uint16 → mode I;16
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "print.jpg", quality=95)
    for path in folder.iterdir():
        _caption(path)
    assert Image.open(folder / "deep.png").mode == "I;16"
    assert getattr(Image.open(folder / "anim.webp"), "n_frames", 1) == 2
    scan = _scan(tmp_path)
    assert not scan.skipped and len(scan.records) == 4
    for name in ("anim.gif", "anim.webp"):  # the first frame, red
        assert np.abs(np.asarray(load_rgb(folder / name), dtype=int) - [255, 0, 0]).max() <= 2, name
    deep = np.asarray(load_rgb(folder / "deep.png"), dtype=int)
    assert deep.shape == (32, 32, 3) and deep[0, 0, 0] == 0 and deep[-1, -1, 0] >= 250  # scaled from 16 bits
    assert np.abs(np.asarray(load_rgb(folder / "print.jpg"), dtype=int)[16, 16] - [255, 0, 0]).max() <= 8


def test_captions_not_utf8_or_a_megabyte_long(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "img"
    paths = make_images(folder, 3, captions=False)
    paths[0].with_suffix(".txt").write_bytes("café in Latin-1".encode("latin-1"))
    paths[1].with_suffix(".txt").write_text("word " * 250_000)  # 1.25 MB
    paths[2].with_suffix(".txt").write_bytes(b"nul\x00inside")
    with caplog.at_level(logging.WARNING, logger="stune.data"):
        scan = _scan(tmp_path)
    captions = {r.path.name: r.captions for r in scan.records}
    assert captions["image_000.png"] == ["caf\ufffd in Latin-1"]
    assert len(captions["image_001.png"][0]) <= MAX_CAPTION_CHARS
    assert captions["image_002.png"] == ["nul inside"]
    warnings = caplog.text
    assert "not UTF-8" in warnings and "image_000.txt" in warnings
    assert "1250000 characters long" in warnings and f"cut to {MAX_CAPTION_CHARS}" in warnings


def test_symlinks_in_a_dataset_are_read_and_nothing_is_written_there(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    make_images(outside, 1)
    folder = tmp_path / "img"
    make_images(folder, 1)
    (folder / "linked.png").symlink_to(outside / "image_000.png")
    _caption(folder / "linked.png")
    (folder / "sub").symlink_to(outside, target_is_directory=True)  # a linked folder is not walked into
    before = {p: p.stat().st_mtime_ns for p in [*folder.rglob("*"), *outside.rglob("*")] if p.is_file()}
    scan = _scan(tmp_path)
    assert sorted(r.path.name for r in scan.records) == ["image_000.png", "linked.png"]
    after = {p: p.stat().st_mtime_ns for p in [*folder.rglob("*"), *outside.rglob("*")] if p.is_file()}
    assert after == before  # the size index went to the cache folder
    assert list((tmp_path / "cache").rglob(".stune-index-d.json"))


def test_cache_writes_replace_links_instead_of_writing_through(tmp_path: Path) -> None:
    import os

    import torch

    from stune.data.cache import atomic_save, read_entry

    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = cache / "entry.safetensors"
    entry.symlink_to(outside)  # a link planted at an entry's name
    (cache / f".entry.safetensors.{os.getpid()}.tmp").symlink_to(outside)  # ... and at its temporary name
    atomic_save({"mean": torch.ones(2)}, entry)
    assert outside.read_text() == "precious"
    assert not entry.is_symlink()
    read = read_entry(entry)
    assert not isinstance(read, str) and torch.equal(read["mean"], torch.ones(2))
