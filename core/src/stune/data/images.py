"""Finding images, reading their captions and sizes, and preparing pixels for the VAE.

Only PIL and numpy here: `st-train check` scans datasets without importing torch. Files in a
dataset folder are only ever opened for reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


@dataclass
class ImageRecord:
    path: Path
    captions: list[str]
    width: int  # after EXIF orientation
    height: int


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


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files ignored)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(part.startswith(".") for part in p.parts)
    )


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, reading only the header."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def captions_for(path: Path, strategy: str, instance_prompt: str | None) -> list[str]:
    """The caption(s) of an image; an empty list means it has none."""
    if strategy == "instanceprompt":
        return [instance_prompt or ""]
    if strategy == "textfile":
        text_path = path.with_suffix(".txt")
        if not text_path.is_file():
            return []
        lines = [line.strip() for line in text_path.read_text(encoding="utf-8", errors="replace").splitlines()]
        return [line for line in lines if line]
    # filename: the file's stem with separators turned into spaces
    return [" ".join(path.stem.replace("_", " ").split())]


def square_side(resolution: float, resolution_type: str, alignment: int) -> int:
    """Side of the square training size for ``resolution``, rounded to ``alignment``."""
    # pixel and pixel_area both name an edge length for square crops; area is in megapixels.
    side = math.sqrt(resolution * 1_000_000) if resolution_type == "area" else resolution
    return max(alignment, round(side / alignment) * alignment)


def load_rgb(path: Path) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert any mode (RGBA over white, 16-bit, CMYK) to RGB."""
    with Image.open(path) as img:
        img.load()
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


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width×height, then cut the centre."""
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, Image.Resampling.LANCZOS)
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_array(img: Image.Image) -> np.ndarray:
    """HWC uint8 → CHW float32 in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))
