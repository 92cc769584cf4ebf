"""Validation images: render the configured prompts with the adapter active and save them."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stune.family import ValidationRequest

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.data.cache import TextEmbedCache
    from stune.family import Components, ModelFamily

log = logging.getLogger("stune.validation")


def validation_prompts(config: CoreOptions) -> dict[str, str]:
    """Nickname → prompt for every validation prompt."""
    prompts: dict[str, str] = {}
    if config.validation_prompt:
        prompts["validation"] = config.validation_prompt
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "prompt"


def render(
    family: ModelFamily,
    components: Components,
    transformer: torch.nn.Module,
    config: CoreOptions,
    text_cache: TextEmbedCache,
    step: int,
    output_dir: Path,
) -> list[Path]:
    """Render every (prompt, resolution) pair; return the written files."""
    prompts = validation_prompts(config)
    if not prompts:
        return []
    seed = config.validation_seed if config.validation_seed is not None else (config.seed or 0)
    requests = [
        ValidationRequest(
            name=name,
            prompt=prompt,
            embeds=text_cache.load(prompt),
            negative_embeds=text_cache.load(""),
            width=width,
            height=height,
            seed=seed,
        )
        for name, prompt in prompts.items()
        for width, height in config.validation_sizes
    ]
    was_training = transformer.training
    transformer.eval()
    try:
        with torch.no_grad():
            images = family.render_validation(components, transformer, requests)
    finally:
        transformer.train(was_training)
    folder = output_dir / "validation_images"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for request, image in zip(requests, images, strict=True):
        path = folder / f"step-{step:06d}-{_slug(request.name)}-{request.width}x{request.height}.png"
        image.save(path)
        written.append(path)
    log.info("validation images for step %d: %s", step, ", ".join(p.name for p in written))
    return written
