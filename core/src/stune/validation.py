"""Validation images: render the configured prompts with the adapter active and save them.

Prompts come from ``validation_prompt`` (nickname ``validation``) and the ``user_prompt_library``
file (nickname → prompt). Every prompt is encoded into the text cache at start-up, before the
text encoders are dropped, so rendering needs only the transformer and the VAE. Each prompt is
rendered at every ``validation_resolution``, ``num_validation_images`` times (image *i* with
seed ``validation_seed + i``, so the same seed gives the same starting noise at every step), into
``output_dir/validation_images/step-<step>-<nickname>-<W>x<H>[-<i>].png`` (``.jpg``/``.webp`` with
validation_image_format). Base-model images (adapter off, before training) are named
``base-<nickname>-<W>x<H>[-<i>].png``. validation_noise_scheduler swaps the pipeline's sampler.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from stune import diskguard, webhooks
from stune.attention import validation_attention
from stune.family import ValidationRequest
from stune.opts.validation import (
    IMAGE_FORMATS,
    MAIN_NICKNAME,
    ValidationAdapter,
    file_slug,
    load_prompt_images,
    load_prompt_library,
    validation_adapters,
)

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
    if config.validation_prompt_library:
        from stune.opts.validation import BUILTIN_PROMPT_LIBRARY

        prompts.update(BUILTIN_PROMPT_LIBRARY)
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


def image_name(
    prefix: str, nickname: str, width: int, height: int, index: int, count: int, extension: str = ".png"
) -> str:
    suffix = f"-{index}" if count > 1 else ""
    return f"{prefix}-{file_slug(nickname)}-{width}x{height}{suffix}{extension}"


def step_prefix(step: int) -> str:
    return f"step-{step:06d}"


def image_paths(config: CoreOptions, output_dir: Path, prefix: str) -> list[Path]:
    """The files one validation writes, in rendering order (prompt, resolution, image)."""
    folder = output_dir / FOLDER
    count = config.num_validation_images
    extension = IMAGE_FORMATS[config.validation_image_format][0]
    return [
        folder / image_name(prefix, nickname, width, height, i, count, extension)
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


def noise_scheduler(name: str, current: Any) -> Any:
    """The diffusers scheduler a validation_noise_scheduler name stands for, built from the model's
    own scheduler config (its shift and dynamic-shifting settings carry over)."""
    import diffusers

    config = dict(getattr(current, "config", {}) or {})
    # FlowMatch schedulers call the static shift `shift`, UniPC/DPM++ on flow sigmas `flow_shift` (HiDream's)
    shift = config.get("shift", config.get("flow_shift", 1.0))
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    choices: dict[str, tuple[str, dict[str, Any]]] = {
        "euler": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False, "shift": shift}),
        "euler-a": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True, "shift": shift}),
        "unipc": ("UniPCMultistepScheduler", flow),
        "dpm++": ("DPMSolverMultistepScheduler", flow),
    }
    if name == "dpm++" and type(current).__name__ == "UniPCMultistepScheduler":
        # A UniPC model (HiDream): its pipeline hands every other sampler a resolution-dependent mu,
        # which DPM++ accepts only with dynamic shifting; its shift is then exp(mu), as the pipeline intends.
        choices["dpm++"] = (
            "DPMSolverMultistepScheduler",
            {**flow, "use_dynamic_shifting": True, "time_shift_type": "exponential"},
        )
    if name not in choices:
        raise ValueError(f"validation_noise_scheduler {name!r} has no flow-matching scheduler")
    class_name, settings = choices[name]
    cls: Any = getattr(diffusers, class_name)
    return cls.from_config(config, **settings)


@contextlib.contextmanager
def validation_scheduler(components: Components, config: CoreOptions) -> Iterator[None]:
    """The pipeline samples with validation_noise_scheduler inside the block (the family builds its
    pipeline from ``components.scheduler``); the model's own scheduler is put back after."""
    name = config.validation_noise_scheduler
    if name is None:
        yield
        return
    original = components.scheduler
    components.scheduler = noise_scheduler(name, original)
    try:
        yield
    finally:
        components.scheduler = original


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def _compiled(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer compiled once per run (validation_torch_compile), reused at every validation."""
    if transformer not in _COMPILED:
        _COMPILED[transformer] = torch.compile(transformer)  # type: ignore[assignment]
    return _COMPILED[transformer]


def _preview_writer(
    final: Path, sink: Callable[[str, int, Image.Image], None] | None = None
) -> Callable[[int, Image.Image], None]:
    """Saves the image being denoised as ``previews/<final name>-s<step>.png`` (validation_preview)
    and hands it to ``sink`` (the webhooks)."""

    def write(step: int, image: Image.Image) -> None:
        folder = final.parent / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{final.stem}-s{step:03d}.png")
        if sink is not None:
            sink(final.stem, step, image)

    return write


_PREVIEW_DECODERS: dict[tuple[str, str], Any] = {}


def preview_autoencoder(config: CoreOptions, device: torch.device) -> Any:
    """The tiny autoencoder (diffusers ``AutoencoderTiny``) previews are decoded with, loaded once
    per process; None when validation_preview_autoencoder is unset (the full VAE decodes them)."""
    path = getattr(config, "validation_preview_autoencoder", None)
    if not config.validation_preview or not path or str(path).lower() == "none":
        return None
    key = (str(path), str(device))
    if key not in _PREVIEW_DECODERS:
        from diffusers import AutoencoderTiny

        try:
            decoder = AutoencoderTiny.from_pretrained(path, torch_dtype=torch.float32)  # type: ignore[no-untyped-call]
            _PREVIEW_DECODERS[key] = decoder.requires_grad_(False).eval().to(device)
        except (OSError, ValueError) as exc:
            # Previews are a convenience: an unreachable decoder (offline Hub) must not stop training.
            log.warning(
                "validation_preview_autoencoder %r could not be loaded (%s); the full VAE decodes previews",
                path,
                str(exc).splitlines()[0],
            )
            _PREVIEW_DECODERS[key] = None
    return _PREVIEW_DECODERS[key]


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
    preview_sink: Callable[[str, int, Image.Image], None] | None = None,
) -> list[Path]:
    """Render every (prompt, resolution, image) and save it; return the written files.

    ``prefix`` replaces ``step-<step>`` at the start of the file names (``base`` for the base model);
    ``inputs``: nickname → input image, for edit models; ``save`` false: render only (the other
    processes of a sharded run, whose forwards the main one needs).
    """
    prompts = rendered_prompts(config)
    if not prompts:
        return []
    extra = extra_validation_adapters(config) if prefix is None else []
    if extra:  # validation_adapter_*: the plain images (comparison), then one set per extra adapter

        def again(named: str) -> list[Path]:
            return render(
                family, components, transformer, config, text_cache, step, output_dir, named, inputs, save, preview_sink
            )

        written = [] if config.validation_adapter_mode == "adapter_only" else again(step_prefix(step))
        for adapter in extra:
            with extra_adapter(family, transformer, adapter):
                written += again(f"{step_prefix(step)}-{adapter.name}")
        return written
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
            request.preview = _preview_writer(path, preview_sink)
            request.preview_every = config.validation_preview_steps
        decoder = preview_autoencoder(config, next(transformer.parameters()).device)
        if decoder is not None:  # families decode previews with it (components.extras["preview_autoencoder"])
            if decoder.config.latent_channels != family.latent_channels:
                from stune.errors import ConfigError

                raise ConfigError(
                    f"validation_preview_autoencoder {config.validation_preview_autoencoder} decodes "
                    f"{decoder.config.latent_channels}-channel latents, but {family.name} has {family.latent_channels}; "
                    "use this family's tiny autoencoder or set it to none."
                )
            components.extras["preview_autoencoder"] = decoder
    if config.validation_torch_compile:
        transformer = _compiled(transformer)
    device = next(transformer.parameters()).device
    was_training = transformer.training
    transformer.eval()  # no dropout: the same seed gives the same image for the same weights
    try:
        with torch.no_grad(), preserved_rng(device), validation_scheduler(components, config):
            images = family.render_validation(components, transformer, requests)
    finally:
        transformer.train(was_training)
    if len(images) != len(requests):
        raise RuntimeError(
            f"{family.name}.render_validation returned {len(images)} images for {len(requests)} requests"
        )
    if not save:
        return []
    diskguard.ensure_space(config, output_dir, f"the {prefix} validation images")
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    image_format = IMAGE_FORMATS[config.validation_image_format][1]
    for path, image in zip(paths, images, strict=True):
        if image_format == "PNG":
            image.save(path, format=image_format)
        else:  # JPEG has no alpha channel
            image.convert("RGB").save(path, format=image_format, quality=config.validation_image_quality)
    log.info("validation images (%s): %s", prefix, ", ".join(p.name for p in paths))
    return paths


def extra_validation_adapters(config: CoreOptions) -> list[ValidationAdapter]:
    if config.validation_adapter_mode == "none":
        return []
    return validation_adapters(
        config.validation_adapter_path,
        config.validation_adapter_name,
        config.validation_adapter_strength,
        config.validation_adapter_config,
    )


@contextlib.contextmanager
def extra_adapter(family: ModelFamily, transformer: torch.nn.Module, adapter: ValidationAdapter) -> Iterator[None]:
    """Inside the block ``adapter`` is loaded into the transformer as a second PEFT adapter (diffusers'
    ``load_lora_adapter`` / ``set_adapters``) at its strength, beside the trained one at 1.0; it is
    deleted after, and the trained weights and their trainability are as before."""
    from stune.adapters import LORA_FILE, _file_lora_alpha

    model: Any = transformer
    path = adapter.path / LORA_FILE if adapter.path.is_dir() else adapter.path
    state = family.load_lora(path)
    alpha = _file_lora_alpha(path) if path.suffix == ".safetensors" else None
    rank = next((int(v.shape[0]) for k, v in state.items() if ".lora_A." in k), None)
    if alpha and rank and alpha != rank:  # diffusers infers alpha = rank from the shapes: fold the scale in
        state = {k: v * (alpha / rank) if ".lora_B." in k else v for k, v in state.items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    active = list(model.active_adapters()) if getattr(model, "peft_config", None) else []
    name = f"validation_{adapter.name}"
    model.load_lora_adapter(state, prefix=None, adapter_name=name)
    model.set_adapters([*active, name], weights=[1.0] * len(active) + [adapter.strength])
    try:
        yield
    finally:
        model.delete_adapters(name)
        if active:
            model.set_adapters(active, weights=[1.0] * len(active))
        for param_name, param in model.named_parameters():  # PEFT marks only adapters trainable on injection
            param.requires_grad_(trainable.get(param_name, False))


# -- during a run -------------------------------------------------------------------------------------


def _external_validation(run: Run) -> None:
    """validation_method=external-script: the user's command validates, given the newest checkpoint."""
    from stune import checkpoint, scripts

    config = run.session.config
    assert config.validation_external_script is not None  # checked with the options
    latest = checkpoint.complete_checkpoints(run.output_dir, rolling=None)
    placeholders = scripts.values(
        config,
        global_step=run.state.global_step,
        local_checkpoint_path=latest[-1][1].resolve() if latest else "",
        validation_seed=validation_seed(config),
    )
    watcher = scripts.start("validation_external_script", config.validation_external_script, placeholders)
    if not config.validation_external_background:
        watcher.join()


def validate(run: Run, prefix: str | None = None) -> list[Path]:
    """Render the validation prompts now (``prefix``: file-name prefix instead of the step's)."""
    config, components, accelerator = run.session.config, run.components, run.accelerator
    # Sharded weights are gathered by every process together: all of them render, the main one saves.
    main = accelerator.is_main_process
    if config.validation_method == "external-script":
        if main and prefix != BASE_PREFIX:
            _external_validation(run)
        return []
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
        sink = webhooks.sender(run.session)
        return render(
            family,
            components,
            model,
            config,
            cache,
            step,
            run.output_dir,
            name,
            inputs,
            main,
            sink.preview if sink else None,
        )

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
    if config.evaluation_type == "clip" and images:
        from stune.clipscore import validation_record
        from stune.metrics import append_record

        record = validation_record(config, images, run.state.global_step, accelerator.device)
        if record:
            append_record(run.output_dir, record)
            run.trackers.log(record, run.state.global_step)
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
