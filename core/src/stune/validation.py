"""Validation images: render the configured prompts with the adapter active and save them.

Prompts come from ``validation_prompt`` (nickname ``validation``) and the ``user_prompt_library``
file (nickname → prompt). Every prompt is encoded into the text cache at start-up, before the
text encoders are dropped, so rendering needs only the transformer and the VAE. Each prompt is
rendered at every ``validation_resolution``, ``num_validation_images`` times (image *i* with
seed ``validation_seed + i``, so the same seed gives the same starting noise at every step), into
``output_dir/validation_images/step-<step>-<nickname>-<W>x<H>[-<i>].png``. Base-model images
(adapter off, before training) are named ``base-<nickname>-<W>x<H>[-<i>].png``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from stune.attention import validation_attention
from stune.family import ValidationRequest
from stune.opts.validation import MAIN_NICKNAME, file_slug, load_prompt_images, load_prompt_library

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.data.cache import TextEmbedCache
    from stune.data.report import Report
    from stune.family import Components, ModelFamily
    from stune.run import Run

log = logging.getLogger("stune.validation")

FOLDER = "validation_images"
BASE_PREFIX = "base"
#: key of the negative prompt in :func:`validation_prompts` (cached, never rendered by itself)
NEGATIVE_KEY = "(negative prompt)"


def rendered_prompts(config: CoreOptions) -> dict[str, str]:
    """Nickname → prompt of every prompt a validation renders (none when validation is disabled)."""
    if config.validation_disable:
        return {}
    prompts: dict[str, str] = {}
    if config.validation_prompt:
        prompts[MAIN_NICKNAME] = config.validation_prompt
    if config.user_prompt_library:
        prompts.update(load_prompt_library(config.user_prompt_library))
    return prompts


def validation_prompts(config: CoreOptions) -> dict[str, str]:
    """Every prompt validation needs from the text cache: the rendered ones and, under
    :data:`NEGATIVE_KEY`, the negative prompt. All are encoded before the text encoders go."""
    prompts = rendered_prompts(config)
    if prompts:
        prompts[NEGATIVE_KEY] = config.validation_negative_prompt
    return prompts


def validation_inputs(config: CoreOptions, eval_references: list[Path]) -> dict[str, Path]:
    """Nickname → the input image an edit model applies the prompt to: the library entry's
    ``image``, else ``validation_input`` (an image, or a folder of images named after the
    nicknames), else the eval set's reference images in turn. Prompts without one are left out."""
    prompts = rendered_prompts(config)
    library = load_prompt_images(config.user_prompt_library) if config.user_prompt_library else {}
    given = Path(config.validation_input) if config.validation_input else None
    folder = {p.stem: p for p in sorted(given.iterdir()) if p.is_file()} if given and given.is_dir() else {}
    inputs: dict[str, Path] = {}
    for number, nickname in enumerate(prompts):
        if nickname in library:
            inputs[nickname] = library[nickname]
        elif given is not None and given.is_file():
            inputs[nickname] = given
        elif folder:
            match = folder.get(nickname) or folder.get(file_slug(nickname))
            if match is not None:
                inputs[nickname] = match
        elif eval_references:
            inputs[nickname] = eval_references[number % len(eval_references)]
    return inputs


def eval_references(report: Report) -> list[Path]:
    """The reference images of the eval datasets, in order (default validation inputs of edit models)."""
    return [r.reference for d in report.evaluation for r in d.usable if r.reference is not None]


def validation_seed(config: CoreOptions) -> int:
    return config.validation_seed if config.validation_seed is not None else (config.seed or 0)


def image_name(prefix: str, nickname: str, width: int, height: int, index: int, count: int) -> str:
    suffix = f"-{index}" if count > 1 else ""
    return f"{prefix}-{file_slug(nickname)}-{width}x{height}{suffix}.png"


def step_prefix(step: int) -> str:
    return f"step-{step:06d}"


def image_paths(config: CoreOptions, output_dir: Path, prefix: str) -> list[Path]:
    """The files one validation writes, in rendering order (prompt, resolution, image)."""
    folder = output_dir / FOLDER
    count = config.num_validation_images
    return [
        folder / image_name(prefix, nickname, width, height, i, count)
        for nickname in rendered_prompts(config)
        for width, height in config.validation_sizes
        for i in range(count)
    ]


def benchmark_needed(config: CoreOptions, output_dir: Path) -> bool:
    """Whether base-model images are still to be rendered: asked for, and not all there yet
    (a resumed run keeps the ones its first start rendered)."""
    if config.disable_benchmark:
        return False
    paths = image_paths(config, output_dir, BASE_PREFIX)
    return bool(paths) and not all(p.is_file() for p in paths)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Leave the global random state as it was: validation and evaluation must not change what
    training draws next (a run with validation trains exactly like one without)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def _compiled(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer compiled once per run (validation_torch_compile), reused at every validation."""
    if transformer not in _COMPILED:
        _COMPILED[transformer] = torch.compile(transformer)  # type: ignore[assignment]
    return _COMPILED[transformer]


def _preview_writer(final: Path) -> Callable[[int, Image.Image], None]:
    """Saves the image being denoised as ``previews/<final name>-s<step>.png`` (validation_preview)."""

    def write(step: int, image: Image.Image) -> None:
        folder = final.parent / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{final.stem}-s{step:03d}.png")

    return write


def render(
    family: ModelFamily,
    components: Components,
    transformer: torch.nn.Module,
    config: CoreOptions,
    text_cache: TextEmbedCache,
    step: int,
    output_dir: Path,
    prefix: str | None = None,
    inputs: dict[str, Path] | None = None,
    save: bool = True,
) -> list[Path]:
    """Render every (prompt, resolution, image) and save it; return the written files.

    ``prefix`` replaces ``step-<step>`` at the start of the file names (``base`` for the base model);
    ``inputs``: nickname → input image, for edit models; ``save`` false: render only (the other
    processes of a sharded run, whose forwards the main one needs).
    """
    prompts = rendered_prompts(config)
    if not prompts:
        return []
    prefix = prefix or step_prefix(step)
    seed = validation_seed(config)
    negative = text_cache.load(config.validation_negative_prompt)
    count = config.num_validation_images
    requests = [
        ValidationRequest(
            name=nickname,
            prompt=prompt,
            embeds=text_cache.load(prompt),
            negative_embeds=negative,
            width=width,
            height=height,
            seed=seed + i,
            image=(inputs or {}).get(nickname),
        )
        for nickname, prompt in prompts.items()
        for width, height in config.validation_sizes
        for i in range(count)
    ]
    paths = image_paths(config, output_dir, prefix)
    if config.validation_preview:
        for request, path in zip(requests, paths, strict=True):
            request.preview = _preview_writer(path)
            request.preview_every = config.validation_preview_steps
    if config.validation_torch_compile:
        transformer = _compiled(transformer)
    device = next(transformer.parameters()).device
    was_training = transformer.training
    transformer.eval()  # no dropout: the same seed gives the same image for the same weights
    try:
        with torch.no_grad(), preserved_rng(device):
            images = family.render_validation(components, transformer, requests)
    finally:
        transformer.train(was_training)
    if len(images) != len(requests):
        raise RuntimeError(
            f"{family.name}.render_validation returned {len(images)} images for {len(requests)} requests"
        )
    if not save:
        return []
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images, strict=True):
        image.save(path)
    log.info("validation images (%s): %s", prefix, ", ".join(p.name for p in paths))
    return paths


# -- during a run -------------------------------------------------------------------------------------


def validate(run: Run, prefix: str | None = None) -> list[Path]:
    """Render the validation prompts now (``prefix``: file-name prefix instead of the step's)."""
    config, components, accelerator = run.session.config, run.components, run.accelerator
    # Sharded weights are gathered by every process together: all of them render, the main one saves.
    main = accelerator.is_main_process
    if (not main and run.sharded is None) or not rendered_prompts(config):
        return []
    assert components is not None and run.data is not None and run.trackers is not None
    assert run.placement is not None
    if run.residency is not None:
        run.residency.before_inference()

    family = run.session.family
    inputs = validation_inputs(config, eval_references(run.data.report)) if family.takes_reference_images() else None

    def draw(name: str | None) -> list[Path]:
        model = accelerator.unwrap_model(run.transformer)
        cache, step = run.data.text_cache, run.state.global_step  # type: ignore[union-attr]
        return render(family, components, model, config, cache, step, run.output_dir, name, inputs, main)

    ema = run.ema
    with_ema = ema is not None and config.ema_validation != "none" and prefix != BASE_PREFIX
    unwrapped = accelerator.unwrap_model(run.transformer)
    with run.placement.vae_for_validation(components.vae), validation_attention(config, unwrapped):
        images = [] if with_ema and config.ema_validation == "ema_only" else draw(prefix)
        if with_ema and ema is not None:
            with ema.applied():  # the EMA weights' images, named <step>-ema-…
                images += draw(f"{prefix or step_prefix(run.state.global_step)}-ema")
    if not main:
        return []
    run.trackers.log_images(images, run.state.global_step)
    run.session.host.hooks.on_validation_done(state=run.state, images=images)
    return images


def validate_base_model(run: Run) -> None:
    """Base-model images to compare the trained ones with: the adapter switched off (a full
    fine-tune holds the base weights only before its first step)."""
    config, adapter = run.session.config, run.adapter
    if (not run.accelerator.is_main_process and run.sharded is None) or not benchmark_needed(config, run.output_dir):
        return
    assert adapter is not None
    if adapter.can_disable:
        with adapter.disabled():
            run.result.validation_images += validate(run, BASE_PREFIX)
    elif run.state.global_step == 0:
        run.result.validation_images += validate(run, BASE_PREFIX)
