"""Dataset options: captions, filters, parquet/JSONL, subsets, masks, the size index, batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stune.data import metadata
from stune.data.cache import DROPPED_CAPTION
from stune.data.config import resolve_datasets
from stune.data.loader import BatchPlan, Sample
from stune.data.metadata import scan_dataset
from stune.errors import ConfigError, UserError
from stune.plugins import PluginHost
from stune.testing import make_images


def resolve(tmp_path: Path, datasets: list[dict[str, Any]], **options: Any) -> Any:
    listing = tmp_path / "datasets.json"
    listing.write_text(json.dumps(datasets))
    config = (
        PluginHost.build(entry_points=False)
        .config_model()
        .model_validate({"data_backend_config": str(listing), "cache_dir": str(tmp_path / "cache"), **options})
    )
    return resolve_datasets(config)


def scan_one(tmp_path: Path, **entry: Any) -> Any:
    listing = resolve(tmp_path, [{"id": "d", "instance_data_dir": str(tmp_path / "img"), **entry}])
    return scan_dataset(listing.datasets[0], 64, 2)


def test_prepend_and_only_instance_prompt(tmp_path: Path) -> None:
    make_images(tmp_path / "img", 2)
    scan = scan_one(tmp_path, caption_strategy="textfile", instance_prompt="sks", prepend_instance_prompt=True)
    assert scan.records[0].captions == ["sks a picture number 0"]
    scan = scan_one(tmp_path, caption_strategy="filename", instance_prompt="sks", only_instance_prompt=True)
    assert {c for r in scan.records for c in r.captions} == {"sks"}


def test_size_and_aspect_filters(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    for name, size in {"small": (100, 100), "wide": (900, 300), "ok": (600, 500)}.items():
        Image.new("RGB", size).save(folder / f"{name}.png")
    scan = scan_one(tmp_path, minimum_image_size=256, maximum_aspect_ratio=2.0, resolution_type="pixel")
    assert [r.path.name for r in scan.records] == ["ok.png"]
    assert {s.path.name: s.reason for s in scan.skipped} == {
        "small.png": "too small",
        "wide.png": "aspect ratio out of range",
    }


def test_jsonl_captions_and_sizes_without_opening_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "img", 3, captions=False)
    rows = [
        {"id": "image_000", "caption": "first", "w": 640, "h": 480},
        {"id": "image_001", "caption": "", "tags": "fallback tags", "w": 480, "h": 640},
    ]
    table = tmp_path / "meta.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(metadata, "oriented_size", lambda path: (_ for _ in ()).throw(AssertionError("opened")))
    scan = scan_one(
        tmp_path,
        caption_strategy="parquet",
        metadata_backend="parquet",
        parquet={
            "path": str(table),
            "filename_column": "id",
            "caption_column": "caption",
            "fallback_caption_column": "tags",
            "width_column": "w",
            "height_column": "h",
        },
    )
    assert [(r.path.name, r.captions, r.width) for r in scan.records] == [
        ("image_000.png", ["first"], 640),
        ("image_001.png", ["fallback tags"], 480),
    ]
    assert [(s.path.name, s.reason) for s in scan.skipped] == [("image_002.png", "missing caption")]


def test_parquet_file(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    make_images(tmp_path / "img", 2, captions=False)
    pq.write_table(
        pa.table({"file": ["image_000.png", "image_001.png"], "text": [["a", "b"], ["c"]]}), tmp_path / "m.parquet"
    )
    scan = scan_one(
        tmp_path,
        caption_strategy="parquet",
        parquet={
            "path": str(tmp_path / "m.parquet"),
            "filename_column": "file",
            "caption_column": "text",
            "identifier_includes_extension": True,
        },
    )
    assert [r.captions for r in scan.records] == [["a", "b"], ["c"]]


def test_max_num_samples_is_a_fixed_subset(tmp_path: Path) -> None:
    make_images(tmp_path / "img", 10)
    first = {r.path for r in scan_one(tmp_path, max_num_samples=4).records}
    second = {r.path for r in scan_one(tmp_path, max_num_samples=4).records}
    assert len(first) == 4 and first == second


def test_size_index_reopens_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "img", 4)
    scan_one(tmp_path)
    opened: list[str] = []
    real = metadata.oriented_size
    monkeypatch.setattr(metadata, "oriented_size", lambda p: opened.append(p.name) or real(p))
    Image.new("RGB", (80, 64)).save(tmp_path / "img" / "image_002.png")
    scan = scan_one(tmp_path)
    assert opened == ["image_002.png"]
    assert next(r for r in scan.records if r.path.name == "image_002.png").width == 80
    # Trusting the index: a new file is not even listed.
    make_images(tmp_path / "new", 1)
    (tmp_path / "new" / "image_000.png").rename(tmp_path / "img" / "brand_new.png")
    assert len(scan_one(tmp_path, skip_file_discovery="metadata").records) == 4
    assert len(scan_one(tmp_path).records) == 5  # a normal scan finds it


def test_masks_are_paired_by_name(tmp_path: Path) -> None:
    make_images(tmp_path / "img", 2)
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "image_000.png")
    listing = resolve(
        tmp_path,
        [
            {
                "id": "d",
                "instance_data_dir": str(tmp_path / "img"),
                "conditioning_data": "m",
                "caption_strategy": "textfile",
            },
            {
                "id": "m",
                "dataset_type": "conditioning",
                "conditioning_type": "mask",
                "instance_data_dir": str(tmp_path / "masks"),
            },
        ],
    )
    scan = scan_dataset(listing.datasets[0], 64, 2)
    assert scan.records[0].mask == tmp_path / "masks" / "image_000.png"
    assert [(s.path.name, s.reason) for s in scan.skipped] == [("image_001.png", "missing mask")]


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"maximum_image_size": 1024}, "together"),
        ({"crop": True, "crop_aspect": "closest"}, "crop_aspect_buckets"),
        ({"skip_file_discovery": "vae bogus"}, "bogus"),
        ({"conditioning_data": "nope"}, "not an enabled conditioning dataset"),
        ({"caption_strategy": "parquet"}, "parquet"),
        ({"crop_style": "face"}, "crop_style"),
    ],
)
def test_dataset_mistakes_are_named(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    (tmp_path / "img").mkdir()
    with pytest.raises(ConfigError, match=message):
        resolve(tmp_path, [{"id": "d", "instance_data_dir": str(tmp_path / "img"), **entry}])


def _samples(ds: str, n: int, size: tuple[int, int] = (64, 64)) -> list[Sample]:
    return [Sample(ds, Path(f"{ds}{i}.png"), Path(f"{ds}{i}.st"), [f"c{i}", f"alt{i}"], size) for i in range(n)]


def test_batches_come_from_one_dataset_and_one_size() -> None:
    samples = _samples("a", 6) + _samples("a", 4, (128, 64)) + _samples("b", 9)
    plan = BatchPlan(samples, {"a": 2, "b": 3}, seed=7, caption_dropout=0.0)
    first, again = plan.epoch(0), plan.epoch(0)
    assert [b.indices for b in first] == [b.indices for b in again]
    assert [b.indices for b in plan.epoch(1)] != [b.indices for b in first]
    assert plan.batches_per_epoch == 3 + 2 + 3
    for batch in first:
        assert len({samples[i].size for i in batch.indices}) == 1
        assert {samples[i].dataset_id for i in batch.indices} == {batch.dataset_id}
        assert len(batch.indices) == {"a": 2, "b": 3}[batch.dataset_id]


def test_probability_front_loads_a_dataset() -> None:
    samples = _samples("a", 40) + _samples("b", 40)
    plan = BatchPlan(samples, {"a": 1, "b": 1}, seed=0, caption_dropout=0.0, probabilities={"a": 10.0, "b": 1.0})
    first_half = [b.dataset_id for b in plan.epoch(0)[:40]]
    assert first_half.count("a") > 30  # every batch is still used once per epoch


def test_caption_dropout_and_too_few_samples() -> None:
    plan = BatchPlan(_samples("a", 50), {"a": 1}, seed=0, caption_dropout=1.0)
    assert all(b.captions == [DROPPED_CAPTION] for b in plan.epoch(0))
    with pytest.raises(UserError, match="raise `repeats`"):
        BatchPlan(_samples("a", 3), {"a": 4}, seed=0, caption_dropout=0.0)


def test_readable_cache_names_mirror_the_dataset(tmp_path: Path) -> None:
    from stune.data.buckets import SizePlan
    from stune.data.cache import LatentCache

    (tmp_path / "img" / "sub").mkdir(parents=True)
    image = tmp_path / "img" / "sub" / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    plan = SizePlan((64, 64), (64, 64), (0, 0, 64, 64))
    hashed = LatentCache(tmp_path / "c", {"m": 1}).path(image, plan)
    readable = LatentCache(tmp_path / "c", {"m": 1}, hash_filenames=False, root=tmp_path / "img").path(image, plan)
    assert hashed.parent == tmp_path / "c" and len(hashed.stem) == 40
    assert readable.parent == tmp_path / "c" / "sub" and readable.name.startswith("cat-")
    other = SizePlan((64, 64), (80, 64), (8, 0, 72, 64))
    assert LatentCache(tmp_path / "c", {"m": 1}).path(image, other) != hashed  # another crop, another entry


def test_background_writer_reports_a_failed_write(tmp_path: Path) -> None:
    import torch

    from stune.data.cache import AsyncWriter

    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(OSError), AsyncWriter(2) as writer:
        writer.write({"x": torch.zeros(1)}, tmp_path / "file" / "entry.safetensors")


def test_trusted_latent_cache_names_the_missing_entry(tmp_path: Path) -> None:
    from stune.data.cache import LatentCache

    with pytest.raises(FileNotFoundError, match="skip_file_discovery"):
        LatentCache.load(tmp_path / "missing.safetensors")
