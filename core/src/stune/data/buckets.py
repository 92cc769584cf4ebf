"""Aspect buckets: which training size each image gets, and how it is resized and cropped to it.

Pure arithmetic on image sizes (no image is opened), so ``st-train check`` can report buckets
without decoding anything and the plan of every image is known before caching starts.

Units follow ``resolution_type``:

* ``pixel``: lengths of the shorter edge, in pixels;
* ``pixel_area``: the side of a square of equal area, in pixels (1024 → about 1 megapixel);
* ``area``: megapixels (a value above 10 is read as a ``pixel_area`` side, as users often write
  1024 there).

A bucket is a (width, height) pair whose sides are multiples of the family's alignment, whose
area is close to the resolution's and whose aspect ratio is the image's, rounded to
``aspect_bucket_rounding`` decimals (so near-identical aspects share a bucket).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stune.data.config import ResolvedDataset


@dataclass(frozen=True)
class SizePlan:
    """How one image becomes a training sample: resize to ``resize_to``, then cut ``crop_box``."""

    bucket: tuple[int, int]  # (width, height) of the training sample
    resize_to: tuple[int, int]  # the whole image is resized to this first
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image


def measure(width: float, height: float, resolution_type: str) -> float:
    """An image's size in the unit of ``resolution_type``."""
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "area":
        return width * height / 1_000_000
    return math.sqrt(width * height)


def in_unit(value: float, resolution_type: str) -> float:
    """A user value in the unit of ``resolution_type`` (area values above 10 are pixel sides)."""
    if resolution_type == "area" and value > 10:
        return value * value / 1_000_000
    return value


def bucket_for_aspect(
    aspect: float, resolution: float, resolution_type: str, alignment: int, max_pixels: int | None = None
) -> tuple[int, int]:
    """(width, height) of the bucket for ``aspect`` (w/h) at ``resolution``, never above
    ``max_pixels`` (a family's largest canvas) when given."""
    resolution = in_unit(resolution, resolution_type)
    if resolution_type == "pixel":
        short = resolution
        width, height = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        area = resolution * 1_000_000 if resolution_type == "area" else resolution * resolution
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if max_pixels and width * height > max_pixels:
        shrink = math.sqrt(max_pixels / (width * height))
        width, height = width * shrink, height * shrink
    # Of the aligned sizes around (width, height), keep the one closest in aspect (what would be
    # cropped away), then in area: rounding both sides independently can cut 5% of a tall image.
    candidates = [
        (max(alignment, w), max(alignment, h))
        for w in (math.floor(width / alignment) * alignment, math.ceil(width / alignment) * alignment)
        for h in (math.floor(height / alignment) * alignment, math.ceil(height / alignment) * alignment)
    ]
    if max_pixels:
        candidates = [c for c in candidates if c[0] * c[1] <= max_pixels] or [
            min(candidates, key=lambda c: c[0] * c[1])
        ]
    return min(
        candidates,
        key=lambda c: abs(math.log(c[0] / c[1] / aspect)) + 0.25 * abs(math.log(c[0] * c[1] / (width * height))),
    )


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts``: random-looking choices that stay the same every run
    (so a cached crop stays valid), different for every image."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def skip_reason(width: int, height: int, ds: ResolvedDataset) -> str | None:
    """Why an image of this size is not used, or None."""
    entry = ds.entry
    if ds.minimum_image_size:
        minimum = in_unit(ds.minimum_image_size, ds.resolution_type)
        if measure(width, height, ds.resolution_type) < minimum:
            return "too small"
    aspect = width / height
    if (entry.minimum_aspect_ratio and aspect < entry.minimum_aspect_ratio) or (
        entry.maximum_aspect_ratio and aspect > entry.maximum_aspect_ratio
    ):
        return "aspect ratio out of range"
    return None


def plan_size(
    width: int,
    height: int,
    ds: ResolvedDataset,
    alignment: int,
    rounding: int,
    key: str,
    max_pixels: int | None = None,
) -> SizePlan:
    """The bucket of an image and how to resize and crop it there. ``key`` identifies the image
    (random crop positions and random aspects are drawn from it, fixed across runs); buckets
    stay within ``max_pixels`` when the family has a largest canvas."""
    entry = ds.entry
    aspect = width / height
    if entry.crop and entry.crop_aspect == "square":
        target_aspect = 1.0
    elif entry.crop and entry.crop_aspect == "closest" and entry.crop_aspect_buckets:
        target_aspect = min(entry.crop_aspect_buckets, key=lambda a: abs(math.log(a / aspect)))
    elif entry.crop and entry.crop_aspect == "random" and entry.crop_aspect_buckets:
        choices = entry.crop_aspect_buckets
        target_aspect = choices[int(stable_fraction(key, "aspect") * len(choices))]
    else:  # no crop, or crop preserving the image's own aspect
        target_aspect = round(aspect, rounding) if rounding else aspect
        target_aspect = max(target_aspect, 10.0**-rounding if rounding else 1e-6)
    bucket = bucket_for_aspect(target_aspect, ds.resolution, ds.resolution_type, alignment, max_pixels)

    # Scale of the image before cropping. Without crop, the image is fitted to cover the bucket
    # (only alignment leftovers are cut). With crop, the crop is taken from the image at its own
    # size (after the optional downsample of very large images), upscaled only if it is smaller.
    cover = max(bucket[0] / width, bucket[1] / height)
    if entry.crop:
        scale = 1.0
        if ds.maximum_image_size and ds.target_downsample_size:
            maximum = in_unit(ds.maximum_image_size, ds.resolution_type)
            if measure(width, height, ds.resolution_type) > maximum:
                target = in_unit(ds.target_downsample_size, ds.resolution_type)
                scale = target / measure(width, height, ds.resolution_type)
                if ds.resolution_type == "area":
                    scale = math.sqrt(scale)
        scale = max(scale, cover)
    else:
        scale = cover
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    style = entry.crop_style if entry.crop else "center"
    if style in ("center", "centre"):
        left, top = spare_x // 2, spare_y // 2
    elif style == "corner":  # the bottom-right corner
        left, top = spare_x, spare_y
    else:
        left = int(stable_fraction(key, "x") * (spare_x + 1))
        top = int(stable_fraction(key, "y") * (spare_y + 1))
    return SizePlan(bucket, resized, (left, top, left + bucket[0], top + bucket[1]))
