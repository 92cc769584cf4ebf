"""Image reading (modes, EXIF), captions, dataset scanning of bad files, the batch plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stune.data.config import resolve_datasets
from stune.data.images import load_rgb, oriented_size
from stune.data.metadata import file_captions, scan_dataset
from stune.errors import ConfigError
from stune.plugins import PluginHost
from stune.testing import make_images


@pytest.mark.parametrize(
    "mode,pixel,expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent over white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("L", 128, (128, 128, 128)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
    ],
)
def test_odd_modes_become_rgb(tmp_path: Path, mode: str, pixel: object, expected: tuple[int, int, int]) -> None:
    path = tmp_path / ("img.tiff" if mode in ("CMYK", "I;16") else "img.png")
    Image.new(mode, (4, 4), pixel).save(path)  # type: ignore[arg-type]
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == expected


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] * 256)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert load_rgb(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert oriented_size(tmp_path / "r.jpg") == (20, 40)
    shown = load_rgb(tmp_path / "r.jpg")
    assert shown.size == (20, 40)
    assert sum(shown.getpixel((10, 5))) > 600  # the white half is on top after rotation


def test_captions(tmp_path: Path) -> None:
    image = tmp_path / "a_red_dog.png"
    image.write_bytes(b"")
    assert file_captions(image, "filename", None) == ["a red dog"]
    assert file_captions(image, "instanceprompt", "sks dog") == ["sks dog"]
    assert file_captions(image, "textfile", None) == []
    image.with_suffix(".txt").write_text("first caption\n\nsecond caption\n")
    assert file_captions(image, "textfile", None) == ["first caption", "second caption"]


def _run_config(tmp_path: Path, folder: Path, **dataset: object) -> object:
    host = PluginHost.build(entry_points=False)
    datasets = tmp_path / "datasets.json"
    datasets.write_text(json.dumps([{"id": "set", "instance_data_dir": str(folder), **dataset}]))
    return host.config_model().model_validate(
        {"data_backend_config": str(datasets), "caption_strategy": "textfile", "cache_dir": str(tmp_path / "cache")}
    )


def test_scan_skips_bad_files_and_keeps_folder_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_images(folder, 3)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    for name in ("empty", "notes"):
        (folder / f"{name}.txt").write_text("a caption")
    (folder / "uncaptioned.png").write_bytes((folder / "image_000.png").read_bytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    config = _run_config(tmp_path, folder)
    [ds] = resolve_datasets(config).datasets  # type: ignore[arg-type]
    scan = scan_dataset(ds, 64, 2)
    assert scan.found == 6  # .txt files are captions, not images
    assert len(scan.records) == 3
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert reasons == {"empty.png": "unreadable", "notes.png": "unreadable", "uncaptioned.png": "missing caption"}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_missing_folder_is_named(tmp_path: Path) -> None:
    config = _run_config(tmp_path, tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"`set`.*nope.*does not exist"):
        resolve_datasets(config)  # type: ignore[arg-type]


def test_unknown_dataset_key(tmp_path: Path) -> None:
    config = _run_config(tmp_path, tmp_path, repeets=3)
    with pytest.raises(ConfigError, match=r"`repeets`.*`repeats`"):
        resolve_datasets(config)  # type: ignore[arg-type]


def test_image_array_range() -> None:
    from stune.data.images import to_array

    arr = to_array(Image.new("RGB", (2, 2), (255, 0, 128)))
    assert arr.shape == (3, 2, 2)
    assert np.isclose(arr[0].max(), 1.0) and np.isclose(arr[1].min(), -1.0)
