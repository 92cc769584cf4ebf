"""Aspect buckets and crops: sizes are aligned, areas match the resolution, aspects the images'."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stune.config import CoreOptions
from stune.data.buckets import bucket_for_aspect, plan_size
from stune.data.config import DatasetConfig, ResolvedDataset
from stune.data.images import apply_plan


def dataset(**entry: Any) -> ResolvedDataset:
    config = CoreOptions.model_validate({"resolution": entry.pop("global_resolution", 1024)})
    return ResolvedDataset(
        DatasetConfig.model_validate({"id": "d", "instance_data_dir": ".", **entry}), config, Path("t")
    )


def test_mixed_aspects_without_crop_give_aligned_buckets_of_the_right_area_and_aspect() -> None:
    rng = random.Random(0)
    ds = dataset(resolution=1024, resolution_type="pixel_area")
    for _ in range(500):
        w, h = rng.randint(300, 5000), rng.randint(300, 5000)
        if not 0.25 <= w / h <= 4:
            continue
        plan = plan_size(w, h, ds, alignment=64, rounding=2, key=f"{w}x{h}")
        bw, bh = plan.bucket
        assert bw % 64 == 0 and bh % 64 == 0
        assert abs(bw * bh - 1024**2) / 1024**2 < 0.13  # rounding each side to 64 px
        assert abs(math.log((bw / bh) / (w / h))) < 0.09  # the image's aspect, to the alignment
        # Without crop the whole image is kept: only what aspect rounding and alignment leave over is cut.
        rw, rh = plan.resize_to
        assert (rw - bw) / rw < 0.05 and (rh - bh) / rh < 0.05
        assert abs(math.log((rw / rh) / (w / h))) < 0.01


def test_near_identical_aspects_share_a_bucket() -> None:
    ds = dataset(resolution=512)
    a = plan_size(1500, 1000, ds, 64, 2, "a").bucket
    b = plan_size(1502, 1000, ds, 64, 2, "b").bucket
    assert a == b


def test_resolution_types() -> None:
    assert bucket_for_aspect(1.5, 512, "pixel", 64) == (768, 512)  # shorter edge 512
    assert bucket_for_aspect(1.0, 1.0, "area", 64) == (1024, 1024)  # one megapixel
    assert bucket_for_aspect(1.0, 1024, "area", 64) == (1024, 1024)  # values above 10 read as a side
    assert bucket_for_aspect(1.0, 1024, "pixel_area", 64) == (1024, 1024)


@pytest.mark.parametrize("style,expected_left", [("center", 500), ("centre", 500), ("corner", 1000)])
def test_square_crop_styles(style: str, expected_left: int) -> None:
    ds = dataset(resolution=1000, crop=True, crop_aspect="square", crop_style=style, resolution_type="pixel")
    plan = plan_size(2000, 1000, ds, 8, 2, "k")
    assert plan.bucket == (1000, 1000)
    assert plan.resize_to == (2000, 1000)  # crops come from the image at its own size
    assert plan.crop_box[0] == expected_left


def test_random_crop_is_fixed_per_image() -> None:
    ds = dataset(resolution=512, crop=True, crop_style="random", resolution_type="pixel")
    first = plan_size(3000, 2000, ds, 64, 2, "img-1")
    assert first == plan_size(3000, 2000, ds, 64, 2, "img-1")
    lefts = {plan_size(3000, 2000, ds, 64, 2, f"img-{i}").crop_box[0] for i in range(20)}
    assert len(lefts) > 10


def test_closest_and_random_crop_aspects() -> None:
    ds = dataset(resolution=512, crop=True, crop_aspect="closest", crop_aspect_buckets=[0.75, 1.0, 1.5])
    bw, bh = plan_size(1700, 1000, ds, 64, 2, "k").bucket
    assert bw > bh and abs(bw / bh - 1.5) < 0.1
    ds = dataset(resolution=512, crop=True, crop_aspect="random", crop_aspect_buckets=[0.75, 1.5])
    aspects = {round(b[0] / b[1], 1) for b in (plan_size(1000, 1000, ds, 64, 2, str(i)).bucket for i in range(20))}
    assert aspects == {0.8, 1.5} or aspects == {0.7, 1.5} or len(aspects) == 2


def test_large_images_are_downsampled_before_cropping() -> None:
    ds = dataset(
        resolution=512,
        crop=True,
        crop_aspect="square",
        crop_style="center",
        maximum_image_size=512,
        target_downsample_size=512,
    )
    plan = plan_size(4000, 3000, ds, 64, 2, "k")
    # Downsampled to ~512² area, then just enough to cover the square: the crop sees 3/4 of the
    # image instead of a 512-pixel detail of a 4000-pixel photo.
    assert plan.resize_to == (683, 512)
    assert plan.bucket == (512, 512)


def test_small_images_are_upscaled_to_cover() -> None:
    ds = dataset(resolution=512, crop=True, crop_aspect="square", resolution_type="pixel")
    plan = plan_size(300, 200, ds, 64, 2, "k")
    assert plan.resize_to[1] >= 512 and plan.resize_to[0] >= 512


def test_apply_plan_gives_the_bucket_size() -> None:
    ds = dataset(resolution=256)
    img = Image.new("RGB", (1000, 600))
    plan = plan_size(1000, 600, ds, 64, 2, "k")
    assert apply_plan(img, plan).size == plan.bucket


def test_buckets_stay_within_a_family_canvas() -> None:
    """A family with a largest canvas (HiDream: 1024²) never gets a bigger bucket, whatever the resolution."""
    rng = random.Random(5)
    canvas = 1024 * 1024
    for _ in range(300):
        aspect = math.exp(rng.uniform(-1.2, 1.2))
        w, h = bucket_for_aspect(aspect, rng.choice([512, 1024, 1536, 2048]), "pixel_area", 64, canvas)
        assert w * h <= canvas and w % 64 == 0 and h % 64 == 0
        assert abs(math.log(w / h / aspect)) < 0.2
    assert bucket_for_aspect(1.0, 2048, "pixel_area", 64, canvas) == (1024, 1024)
    assert bucket_for_aspect(1.0, 512, "pixel_area", 64, canvas) == (512, 512)  # smaller ones are untouched
