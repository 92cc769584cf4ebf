"""Validation images rendered during training."""

from __future__ import annotations

import re
from typing import Any

from pydantic import field_validator

from stune.options import AliasChoices, Field, Options


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


class ValidationOptions(Options):
    validation_prompt: str | None = Field(None, description="Prompt rendered at every validation.")
    validation_step_interval: int | None = Field(
        100,
        ge=0,
        validation_alias=AliasChoices("validation_step_interval", "validation_steps"),
        description="Render validation images every N optimizer steps (0 or none: only at the end).",
    )
    validation_resolution: str = Field("1024", description="WIDTHxHEIGHT list, e.g. 1024x1024,1280x768.")
    validation_num_inference_steps: int = Field(30, gt=0, description="Sampling steps per validation image.")
    validation_guidance: float = Field(7.5, ge=0, description="Guidance scale of validation images.")
    validation_seed: int | None = Field(None, description="Seed of validation images (default: seed, else 0).")

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _check_resolutions(cls, value: Any) -> Any:
        parse_resolutions(str(value))
        return str(value)

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        return parse_resolutions(self.validation_resolution)
