"""CLIP score of validation images (``evaluation_type: clip``), as SimpleTuner's evaluation logs it.

The score of an image and its prompt is ``100 × max(cos(image embedding, text embedding), 0)``
with the CLIP model ``pretrained_evaluation_model_name_or_path`` (transformers ``CLIPModel``, its
tokenizer and image processor). Each validation writes one ``metrics.jsonl`` line with
``eval/clip_score`` (the mean over every image) and ``eval/clip_score/<nickname>`` per validation
prompt; the trackers get the same numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stune.errors import UserError
from stune.opts.validation import file_slug

if TYPE_CHECKING:
    from stune.config import CoreOptions

_MODELS: dict[tuple[str, str], tuple[Any, Any, Any]] = {}


def _load(path: str, device: torch.device) -> tuple[Any, Any, Any]:
    key = (path, str(device))
    if key not in _MODELS:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            model: Any = CLIPModel.from_pretrained(path)
            model = model.eval().requires_grad_(False).to(device)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = CLIPImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Could not load the CLIP model {path!r} for evaluation_type clip: {str(exc).splitlines()[0]}; "
                "fix pretrained_evaluation_model_name_or_path (a local folder or Hub id)."
            ) from exc
        _MODELS[key] = (model, tokenizer, processor)
    return _MODELS[key]


def clip_score(images: list[Path], prompts: list[str], path: str, device: torch.device) -> list[float]:
    """``100 × max(cos, 0)`` of each image against its prompt."""
    from PIL import Image

    model, tokenizer, processor = _load(path, device)
    pictures = []
    for image in images:
        with Image.open(image) as opened:
            pictures.append(opened.convert("RGB"))
    limit = min(int(getattr(tokenizer, "model_max_length", 77) or 77), model.config.text_config.max_position_embeddings)
    text = tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt").to(device)
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"].to(device, model.dtype)
    with torch.no_grad():
        image_embeds = _features(model.get_image_features(pixel_values=pixels))
        text_embeds = _features(model.get_text_features(**text))
    cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return [float(100 * max(value, 0.0)) for value in cosine.tolist()]


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output holding the projected embeddings; 4.x the tensor itself
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def validation_record(config: CoreOptions, images: list[Path], step: int, device: torch.device) -> dict[str, Any]:
    """The metrics.jsonl line of one validation's CLIP scores ({} when there is nothing to score)."""
    from stune.validation import rendered_prompts

    prompts = rendered_prompts(config)
    pairs: list[tuple[str, Path]] = []
    for path in images:
        for nickname in prompts:
            if re.search(rf"-{re.escape(file_slug(nickname))}-\d+x\d+(?:-\d+)?$", path.stem):
                pairs.append((nickname, path))
                break
    if not pairs:
        return {}
    scores = clip_score(
        [p for _, p in pairs], [prompts[n] for n, _ in pairs], config.pretrained_evaluation_model_name_or_path, device
    )
    by_prompt: dict[str, list[float]] = {}
    for (nickname, _), score in zip(pairs, scores, strict=True):
        by_prompt.setdefault(nickname, []).append(score)
    return {
        "step": step,
        "eval/clip_score": sum(scores) / len(scores),
        **{f"eval/clip_score/{n}": sum(v) / len(v) for n, v in by_prompt.items()},
    }
