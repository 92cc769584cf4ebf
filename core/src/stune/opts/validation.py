"""Validation images rendered during training, and the prompt library they come from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from stune.errors import ConfigError
from stune.jsonfile import read_json
from stune.options import AliasChoices, Field, Options

#: nickname of ``validation_prompt`` among the library's nicknames (and in image file names)
MAIN_NICKNAME = "validation"
#: keys a library entry written as an object may hold its prompt under (SimpleTuner's names)
_PROMPT_KEYS = ("prompt", "caption", "lyrics")
#: keys a library entry may hold an input image under (edit models such as FLUX Kontext)
_IMAGE_KEYS = ("image", "input_image", "validation_input")


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """``"1024"`` → [(1024, 1024)]; ``"1024x1024,1280x768"`` → two (width, height) pairs."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not match:
            raise ValueError(f"validation_resolution entry {part!r} is not WIDTHxHEIGHT or a single number")
        width = int(match.group(1))
        height = int(match.group(2) or width)
        sizes.append((width, height))
    if not sizes:
        raise ValueError("validation_resolution is empty")
    return sizes


def file_slug(nickname: str) -> str:
    """The part of an image file name a nickname becomes (safe on every filesystem)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nickname).strip("_.")[:60] or "prompt"


def load_prompt_library(path: str | Path) -> dict[str, str]:
    """Read a ``user_prompt_library`` file: ``{"nickname": "prompt", ...}``.

    As in SimpleTuner an entry may also be an object holding the prompt under ``prompt`` (or
    ``caption``, ``lyrics``). Every mistake is a :class:`ConfigError` naming the file.
    """
    what = "user_prompt_library file"
    data: Any = read_json(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"The {what} {path} must hold one JSON object of nickname: prompt pairs.")
    prompts: dict[str, str] = {}
    slugs: dict[str, str] = {}
    for nickname, entry in data.items():
        prompt = entry
        if isinstance(entry, dict):
            prompt = next((entry[k] for k in _PROMPT_KEYS if isinstance(entry.get(k), str)), None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f'The {what} {path} has no prompt for `{nickname}`; give a string, or an object with a "prompt" string.'
            )
        if not str(nickname).strip():
            raise ConfigError(f"The {what} {path} has an empty nickname; nicknames name the image files.")
        slug = file_slug(nickname)
        if slug in slugs:
            raise ConfigError(
                f"The {what} {path} has nicknames `{slugs[slug]}` and `{nickname}` that give the same file name "
                f"`{slug}`; rename one of them."
            )
        slugs[slug] = nickname
        prompts[nickname] = prompt
    return prompts


def load_prompt_images(path: str | Path) -> dict[str, Path]:
    """Nickname → input image of the library entries that give one (``{"prompt": …, "image": path}``);
    relative paths are read from the library file's folder. A missing file is a ConfigError."""
    data: Any = read_json(path, "user_prompt_library file")
    images: dict[str, Path] = {}
    for nickname, entry in (data if isinstance(data, dict) else {}).items():
        value = next((entry[k] for k in _IMAGE_KEYS if isinstance(entry, dict) and isinstance(entry.get(k), str)), None)
        if value is None:
            continue
        image = Path(value) if Path(value).is_absolute() else Path(path).parent / value
        if not image.is_file():
            raise ConfigError(
                f"The user_prompt_library file {path} gives `{nickname}` the input image {image}, which does not exist."
            )
        images[nickname] = image
    return images


class ValidationOptions(Options):
    validation_disable: bool = Field(False, description="Render no validation images at all.")
    validation_prompt: str | None = Field(
        None, description=f"Prompt rendered at every validation (files named `{MAIN_NICKNAME}`)."
    )
    user_prompt_library: str | None = Field(
        None,
        description='JSON file of more validation prompts, {"nickname": "prompt", ...}; nicknames name the files.',
    )
    validation_negative_prompt: str = Field(
        "blurry, cropped, ugly", description="Negative prompt of validation images (where the family uses one)."
    )
    validation_step_interval: int | None = Field(
        100,
        ge=0,
        validation_alias=AliasChoices("validation_step_interval", "validation_steps"),
        description="Render validation images every N optimizer steps (0 or none: only at the end).",
    )
    validation_resolution: str = Field("1024", description="WIDTHxHEIGHT list, e.g. 1024x1024,1280x768.")
    validation_input: str | None = Field(
        None,
        description="Edit models (FLUX Kontext): the image the validation prompts are applied to, or a folder of "
        "images named after the prompt nicknames; default: the library entry's `image`, else the eval set's "
        "reference images.",
    )
    validation_num_inference_steps: int = Field(30, gt=0, description="Sampling steps per validation image.")
    validation_guidance: float = Field(7.5, ge=0, description="Guidance scale of validation images.")
    validation_seed: int | None = Field(
        None, description="Seed of validation images (default: seed, else 0); image i of a prompt uses seed + i."
    )
    num_validation_images: int = Field(1, ge=1, description="Images per prompt and resolution at each validation.")
    validation_guidance_rescale: float = Field(
        0.0, ge=0, le=1, description="CFG rescale (pipelines that support it); 0 disables."
    )
    validation_torch_compile: bool = Field(
        False, description="torch.compile the transformer for validation (compiled once, reused every time)."
    )
    validation_preview: bool = Field(
        False, description="Also save the image being denoised every validation_preview_steps steps."
    )
    validation_preview_steps: int = Field(1, ge=1, description="Sampling steps between preview images.")
    disable_benchmark: bool = Field(
        False,
        description="Skip the base-model images (`base-…` files) rendered once before training to compare against.",
    )

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _check_resolutions(cls, value: Any) -> Any:
        parse_resolutions(str(value))
        return str(value)

    @field_validator("user_prompt_library")
    @classmethod
    def _check_library(cls, value: str | None) -> str | None:
        if value is not None:
            load_prompt_library(value)  # a missing or malformed file stops the run here, not mid-training
        return value

    @model_validator(mode="after")
    def _main_nickname_free(self) -> ValidationOptions:
        library = load_prompt_library(self.user_prompt_library) if self.user_prompt_library else {}
        if self.validation_prompt and MAIN_NICKNAME in {file_slug(n) for n in library}:
            raise ValueError(
                f"The user_prompt_library nickname `{MAIN_NICKNAME}` is taken by validation_prompt; rename it"
            )
        return self

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        return parse_resolutions(self.validation_resolution)
