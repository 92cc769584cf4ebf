"""Finding images, reading their sizes, and preparing pixels (and masks) for the VAE.

Only PIL and numpy here: `st-train check` scans datasets without importing torch. Files in a
dataset folder are only ever opened for reading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from stune.data.buckets import SizePlan

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}  # animated: the first frame
# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files ignored)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def check_pixels(img: Image.Image) -> None:
    """Refuse an image that has no pixels, or more than Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, read at each call: a program may raise or lower it). Pillow
    itself only warns between the limit and twice the limit; a dataset skips those too."""
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"the image has no pixels ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} is {width * height} pixels, over Pillow's decompression-bomb limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS)"
        )


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, reading only the header."""
    with Image.open(path) as img:
        check_pixels(img)
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def load_rgb(path: Path) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert any mode (RGBA over white, 16-bit, CMYK) to RGB."""
    with Image.open(path) as opened:
        check_pixels(opened)  # before decoding: a bomb is refused from its header
        opened.load()  # an animated GIF/WebP: its first frame
        img: Image.Image = opened
        img = ImageOps.exif_transpose(img) or img
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if array.max() > 255 else 255.0
            img = Image.fromarray((array / scale * 255.0).clip(0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")


def apply_plan(img: Image.Image, plan: SizePlan) -> Image.Image:
    """Resize the whole image as planned, then cut the planned crop (exactly the bucket's size)."""
    if img.size != plan.resize_to:
        img = img.resize(plan.resize_to, Image.Resampling.LANCZOS)
    return img.crop(plan.crop_box)


def load_sample(path: Path, plan: SizePlan) -> np.ndarray:
    """The training pixels of an image: CHW float32 in [-1, 1] at the bucket's size."""
    return to_array(apply_plan(load_rgb(path), plan))


def load_mask(path: Path, plan: SizePlan, scale_factor: int) -> np.ndarray:
    """A mask image cropped exactly like its training image, averaged down to the latent grid,
    as weights in [0, 1] (white trains, black is ignored)."""
    with Image.open(path) as img:
        check_pixels(img)
        img.load()
        grey = (ImageOps.exif_transpose(img) or img).convert("L")
    if grey.size != plan.resize_to:
        # The mask may come at another resolution than its image; stretch it onto the image first.
        grey = grey.resize(plan.resize_to, Image.Resampling.BILINEAR)
    grey = grey.crop(plan.crop_box)
    latent = (plan.bucket[0] // scale_factor, plan.bucket[1] // scale_factor)
    grey = grey.resize(latent, Image.Resampling.BOX)  # area average: partial cells get partial weight
    return np.asarray(grey, dtype=np.float32) / 255.0


def to_array(img: Image.Image) -> np.ndarray:
    """HWC uint8 → CHW float32 in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))
