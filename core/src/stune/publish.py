"""The model card (``output_dir/README.md``) and the optional Hugging Face Hub upload.

At the end of a run :func:`finish_run` writes the card (always), hands ``output_dir`` to the
``publishing_config`` providers (:mod:`stune.publishing`) and, with ``push_to_hub``, creates
the ``hub_model_id`` repository and uploads ``output_dir`` to it with ``huggingface_hub``:
the adapter, its config, the card, validation images, ``metrics.jsonl`` and TensorBoard logs;
never ``checkpoint-*`` folders (with ``push_checkpoints_to_hub`` each goes up as it is saved:
:class:`CheckpointUploads`), wandb's run folder (it holds machine details) nor temporary files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError, UserError
from stune.hookspecs import hookimpl

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily
    from stune.plugins import PluginHost
    from stune.session import Session

log = logging.getLogger("stune.publish")

UPLOADS_PLUGIN = "stune.checkpoint-uploads"
CARD_FILE = "README.md"
IMAGES_DIR = "validation_images"
TRAINING_CONFIG = "training_config.json"
_IMAGE = re.compile(r"^step-(\d+)-(.+)\.(png|jpe?g|webp)$", re.IGNORECASE)
_SIZE_SUFFIX = re.compile(r"-\d+x\d+(?:-\d+)?$")  # -<W>x<H>[-<image index>]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STAGING = ".upload-"  # + checkpoint-<step>: a checkpoint's hard-linked copy while it uploads
# Never uploaded: our temporary checkpoint and staging folders, and wandb's run folders.
_ALWAYS_IGNORED = [".checkpoint-*", "*.tmp-*", f"{_STAGING}*", "wandb/*", "*/wandb/*"]
_CHECKPOINTS = ["checkpoint-*"]


# -- checks (config time, cheap) ----------------------------------------------------------------


def check_publish(config: CoreOptions) -> None:
    """With ``push_to_hub``, fail before training if the upload cannot happen (offline, no token)."""
    if not getattr(config, "push_to_hub", False):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise ConfigError(
            "push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it or turn push_to_hub off."
        )
    from huggingface_hub import get_token

    if get_token() is None:
        raise ConfigError(
            "push_to_hub needs a Hugging Face token with write access; run `hf auth login` or set HF_TOKEN."
        )


# -- model card ---------------------------------------------------------------------------------


def validation_gallery(output_dir: Path) -> dict[int, list[Path]]:
    """Validation images in ``output_dir/validation_images`` by step, oldest step first."""
    by_step: dict[int, list[Path]] = {}
    folder = Path(output_dir) / IMAGES_DIR
    if not folder.is_dir():
        return by_step
    for path in sorted(folder.iterdir()):
        match = _IMAGE.match(path.name)
        if match and path.is_file():
            by_step.setdefault(int(match.group(1)), []).append(path)
    return dict(sorted(by_step.items()))


def _prompt_names(config: CoreOptions) -> dict[str, str]:
    """File-name nickname → validation prompt (stune.validation names its files by nickname)."""
    from stune.opts.validation import file_slug
    from stune.validation import rendered_prompts

    return {file_slug(name): prompt for name, prompt in rendered_prompts(config).items()}


def _image_prompt(path: Path, prompts: dict[str, str]) -> str:
    match = _IMAGE.match(path.name)
    name = _SIZE_SUFFIX.sub("", match.group(2)) if match else path.stem
    return prompts.get(name, name)


def _base_image(path: Path) -> Path | None:
    """The base model's image (rendered before training, adapter off) for the same prompt and size."""
    match = _IMAGE.match(path.name)
    base = path.with_name(f"base-{match.group(2)}.{match.group(3)}") if match else None
    return base if base is not None and base.is_file() else None


def _trigger_words(config: CoreOptions) -> list[str]:
    """Instance prompts of the training datasets that put them into captions."""
    from stune.data.config import read_dataset_list

    words: list[str] = []
    try:
        _, entries = read_dataset_list(config)
    except UserError:  # the card must not fail because the dataset list moved after training
        entries = []
    for entry in entries:
        if entry.disabled or entry.dataset_type != "image":
            continue
        prompt = entry.instance_prompt or config.instance_prompt
        strategy = entry.caption_strategy or config.caption_strategy
        uses = strategy == "instanceprompt" or entry.prepend_instance_prompt or entry.only_instance_prompt
        if prompt and uses and prompt not in words:
            words.append(prompt)
    return words


def _base_model_card_license(path: str, revision: str | None) -> dict[str, str]:
    """license / license_name / license_link of the base model's own card, when it is on disk."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme: Any = None
    local = Path(path)
    if local.is_dir():
        readme = local / CARD_FILE if (local / CARD_FILE).is_file() else None
    elif _HUB_ID.match(path):
        readme = try_to_load_from_cache(path, CARD_FILE, revision=revision)
    if not isinstance(readme, (str, Path)):
        return {}
    try:
        data = ModelCard.load(readme).data
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k in ("license", "license_name", "license_link") if (v := getattr(data, k, None))}


def _adapter_kind(config: CoreOptions) -> str:
    if getattr(config, "model_type", "lora") == "full":
        return "full"
    return "lycoris" if getattr(config, "lora_type", "standard") == "lycoris" else "lora"


def _adapter_lines(config: CoreOptions, family: ModelFamily, output_dir: Path) -> list[str]:
    kind = _adapter_kind(config)
    if kind == "full":
        return ["Full fine-tune of the transformer (diffusers `transformer/` folder)."]
    if kind == "lycoris":
        lines = ["LyCORIS network (`pytorch_lora_weights.safetensors` in LyCORIS format, with `lycoris_config.json`)."]
        settings = Path(output_dir) / "lycoris_config.json"
        if not settings.is_file():
            settings = Path(getattr(config, "lycoris_config", "") or "lycoris_config.json")
        if settings.is_file():
            lines += ["", "```json", settings.read_text(encoding="utf-8").strip(), "```"]
        return lines
    try:
        targets = ", ".join(f"`{t}`" for t in family.lora_target_modules())
    except UserError:
        targets = "(family default)"
    name = "DoRA" if getattr(config, "use_dora", False) else "LoRA"
    return [f"PEFT {name}: rank {config.lora_rank}, alpha {config.effective_lora_alpha:g}, on {targets}."]


def _resolutions(result: Any, config: CoreOptions) -> str:
    """The training sizes, per dataset as the run's dataset report lists them (buckets W×H)."""
    report = Path(getattr(result, "output_dir", "")) / "dataset_report.json"
    try:
        datasets = json.loads(report.read_text())["datasets"]
        buckets = sorted({b for d in datasets if d.get("type", "image") == "image" for b in d["buckets"]})
    except (OSError, ValueError, KeyError, TypeError):
        buckets = []
    if buckets:
        return ", ".join(buckets)
    return f"{config.resolution:g} ({config.resolution_type})"


def _settings_rows(config: CoreOptions, family: ModelFamily, result: Any) -> list[tuple[str, Any]]:
    shift = "auto (resolution-dependent)" if config.flow_schedule_auto_shift else config.flow_schedule_shift
    steps = getattr(result, "final_step", None)
    rows: list[tuple[str, Any]] = [
        ("Model family", f"{family.name}" + (f" ({family.flavour})" if family.flavour else "")),
        ("Training steps", steps if steps is not None else config.max_train_steps),
        ("Epochs", config.num_train_epochs if not config.max_train_steps else None),
        ("Learning rate", f"{config.learning_rate:g}"),
        ("LR scheduler", f"{config.lr_scheduler} (warm-up {config.lr_warmup_steps} steps)"),
        ("Optimizer", config.optimizer),
        ("Batch size", f"{config.train_batch_size} × {config.gradient_accumulation_steps} accumulation (per process)"),
        ("Resolution", _resolutions(result, config)),
        ("Flow shift", shift),
        ("Sigmoid scale", config.flow_sigmoid_scale),
        ("Caption dropout", config.caption_dropout_probability),
        ("Gradient clipping", f"{config.max_grad_norm:g} ({config.grad_clip_method})"),
        ("Mixed precision", config.mixed_precision),
        ("Base model precision", getattr(config, "base_model_precision", None)),
        ("Seed", config.seed),
    ]
    return [(name, value) for name, value in rows if value is not None]


def model_card_text(config: CoreOptions, family: ModelFamily, output_dir: Path, result: Any) -> str:
    """The text of ``README.md``: Hub metadata (YAML front matter) and a readable body."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    base = family.model_path()
    kind = _adapter_kind(config)
    hub_id = getattr(config, "hub_model_id", None)
    title = hub_id or output_dir.resolve().name
    prompts = _prompt_names(config)
    gallery = validation_gallery(output_dir)
    final_images = gallery[max(gallery)] if gallery else []
    triggers = _trigger_words(config)
    tags = ["text-to-image", "diffusers", *([kind] if kind != "full" else []), "stune", family.name]
    if kind != "full":
        tags.append("template:sd-lora")
    if not getattr(config, "model_card_safe_for_work", False):
        tags.append("not-for-all-audiences")
    metadata: dict[str, Any] = {
        "base_model": base if _HUB_ID.match(base) and not Path(base).exists() else None,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": tags,
        **_base_model_card_license(base, config.revision),
    }
    if final_images:
        metadata["widget"] = [
            {"text": _image_prompt(p, prompts), "output": {"url": f"{IMAGES_DIR}/{p.name}"}} for p in final_images
        ]
    if triggers:
        metadata["instance_prompt"] = triggers[0]

    what = {"lora": "a LoRA", "lycoris": "a LyCORIS adapter", "full": "a full fine-tune"}[kind]
    base_link = f"[{base}](https://huggingface.co/{base})" if metadata["base_model"] else f"`{base}`"
    body = [f"# {title}", ""]
    note = getattr(config, "model_card_note", None)
    if note:
        body += [note, ""]
    body += [f"This is {what} of {base_link} trained with [stune](https://pypi.org/project/stune/).", ""]
    if triggers:
        body += ["## Trigger words", "", "Put these in your prompt:", ""]
        body += [f"- `{word}`" for word in triggers] + [""]
    body += ["## Validation images", ""]
    if final_images:
        step = max(gallery)
        body += [
            f"At step {step} ({config.validation_num_inference_steps} sampling steps, "
            f"guidance {config.validation_guidance:g}):",
            "",
        ]
        with_base = any(_base_image(p) for p in final_images)
        body += ["| Prompt | Base model | Trained |" if with_base else "| Prompt | Image |"]
        body += ["|---|---|---|" if with_base else "|---|---|"]
        for path in final_images:
            prompt = _image_prompt(path, prompts).replace("|", "\\|").replace("\n", " ")
            cells = [prompt]
            if with_base:
                base_image = _base_image(path)
                cells.append(f"![base]({IMAGES_DIR}/{base_image.name})" if base_image else "")
            cells.append(f"![{path.stem}]({IMAGES_DIR}/{path.name})")
            body.append("| " + " | ".join(cells) + " |")
        earlier = sum(len(images) for s, images in gallery.items() if s != step)
        if earlier:
            body += ["", f"{earlier} more from earlier steps {'is' if earlier == 1 else 'are'} in `{IMAGES_DIR}/`."]
        body.append("")
    else:
        body += ["No validation images were rendered (set validation_prompt).", ""]
    body += ["## Adapter", "", *_adapter_lines(config, family, output_dir), ""]
    if (output_dir / "ema").is_dir():
        body += ["An EMA copy of the weights, in the same format, is in `ema/`; load it from that folder.", ""]
    body += ["## Training settings", "", "| Option | Value |", "|---|---|"]
    body += [f"| {name} | {value} |" for name, value in _settings_rows(config, family, result)]
    body += [
        "",
        "Every option of the run is in `training_config.json`; per-step loss, learning rate and gradient norm in",
    ]
    body += ["`metrics.jsonl`.", ""]
    snippet = textwrap.dedent(family.loading_example(Path(hub_id) if hub_id else output_dir)).strip()
    body += ["## Inference", ""]
    if snippet:
        body += ["```python", snippet, "```", ""]
    else:
        body += [f"The {family.name} family gives no loading example.", ""]
    card_data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)


def write_model_card(config: CoreOptions, family: ModelFamily, output_dir: Path, result: Any) -> Path:
    """Write ``output_dir/README.md`` (and the run's options as ``training_config.json``, which the card cites)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    from stune.publishing import shareable_values

    (output_dir / TRAINING_CONFIG).write_text(json.dumps(shareable_values(config), indent=2) + "\n")
    path = output_dir / CARD_FILE
    path.write_text(model_card_text(config, family, output_dir, result), encoding="utf-8")
    log.info("model card: %s", path)
    return path


# -- Hub upload ------------------------------------------------------------------------------------


def ignore_patterns(include_checkpoints: bool) -> list[str]:
    """``upload_folder`` ignore patterns (fnmatch on paths relative to output_dir; ``*`` crosses ``/``)."""
    return [*_ALWAYS_IGNORED, *([] if include_checkpoints else _CHECKPOINTS)]


def files_to_upload(output_dir: Path, include_checkpoints: bool) -> list[str]:
    """The files ``push`` uploads (paths relative to ``output_dir``), filtered exactly as ``upload_folder`` does."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects  # type: ignore[attr-defined]

    root = Path(output_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    patterns = ignore_patterns(include_checkpoints) + list(DEFAULT_IGNORE_PATTERNS)
    return list(filter_repo_objects(files, ignore_patterns=patterns))


def push(config: CoreOptions, output_dir: Path) -> str | None:
    """Upload ``output_dir`` to ``hub_model_id`` (created if missing); return the repository URL."""
    if not getattr(config, "push_to_hub", False):
        return None
    from huggingface_hub import HfApi

    repo_id = str(getattr(config, "hub_model_id", None))
    api = HfApi()
    try:
        url = api.create_repo(
            repo_id, private=bool(getattr(config, "model_card_private", True)), exist_ok=True, repo_type="model"
        )
        api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            repo_type="model",
            # checkpoints never: with push_checkpoints_to_hub they went up as they were saved
            ignore_patterns=ignore_patterns(include_checkpoints=False),
            commit_message=f"stune: {config.model_family} {_adapter_kind(config)}",
        )
    # Whatever went wrong (network, offline mode, token, permissions), the trained files are safe
    # on disk; say so in one sentence instead of a traceback at the end of a long run.
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise UserError(
            f"Uploading to the Hub repository {repo_id} failed ({reason}); the files remain in {output_dir}, "
            f"upload them later with `hf upload {repo_id} {output_dir} --exclude 'checkpoint-*'`."
        ) from exc
    log.info("uploaded %s to %s", output_dir, url)
    return str(url)


class CheckpointUploads:
    """``push_checkpoints_to_hub``: each checkpoint goes to the Hub repository (as ``checkpoint-<step>/``)
    as soon as it is saved, so a run that dies leaves its progress on the Hub, as SimpleTuner does.

    Uploads run one at a time in a worker thread; training waits for each one unless
    ``push_to_hub_background``. The folder is first hard-linked into ``.upload-checkpoint-<step>`` so
    that checkpoint rotation cannot pull files from under an upload. A failed upload never stops
    training: it is logged, retried once at the end of training, and the folder stays on disk."""

    def __init__(self, config: CoreOptions, output_dir: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.repo_id = str(config.hub_model_id)
        self.private = bool(config.model_card_private)
        self.background = bool(config.push_to_hub_background)
        self.output_dir = Path(output_dir)
        self.uploaded: list[str] = []
        self.failed: list[str] = []
        self._repo_ready = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stune-hub-checkpoints")
        import shutil

        for stale in self.output_dir.glob(f"{_STAGING}*"):  # left by a run killed mid-upload
            shutil.rmtree(stale, ignore_errors=True)

    @hookimpl
    def on_checkpoint_saved(self, path: Path) -> None:
        staged = _hard_linked_copy(path, path.with_name(f"{_STAGING}{path.name}"))
        upload = self._worker.submit(self._upload, staged, path.name)
        if not self.background:
            upload.result()

    @hookimpl
    def on_train_end(self) -> None:
        self.close()
        for name in list(self.failed):  # once more, now that training no longer waits on it
            folder = self.output_dir / name
            if folder.is_dir():
                self.failed.remove(name)
                self._upload(_hard_linked_copy(folder, folder.with_name(f"{_STAGING}{name}")), name)
        if self.failed:
            log.warning(
                "checkpoints not on the Hub: %s; upload them with `hf upload %s %s/<name> <name>`",
                ", ".join(self.failed),
                self.repo_id,
                self.output_dir,
            )

    def close(self) -> None:
        """Wait for the uploads under way."""
        self._worker.shutdown(wait=True)

    def _upload(self, staged: Path, name: str) -> None:
        import shutil

        from huggingface_hub import HfApi

        try:
            api = HfApi()
            if not self._repo_ready:
                api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
                self._repo_ready = True
            api.upload_folder(
                repo_id=self.repo_id,
                folder_path=staged,
                path_in_repo=name,
                repo_type="model",
                commit_message=f"stune: {name}",
            )
            self.uploaded.append(name)
            log.info("uploaded %s to the Hub repository %s", name, self.repo_id)
        # The network, a token or the Hub failing must not end a training run.
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            self.failed.append(name)
            log.warning(
                "could not upload %s to the Hub repository %s (%s); it stays on disk", name, self.repo_id, reason
            )
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def _hard_linked_copy(folder: Path, target: Path) -> Path:
    """``folder`` mirrored at ``target`` with hard links (a copy where links are not possible)."""
    import os
    import shutil

    def link(source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, copy_function=link)
    return target


@contextlib.contextmanager
def checkpoint_uploads(session: Session) -> Iterator[CheckpointUploads | None]:
    """While a run trains with ``push_to_hub`` and ``push_checkpoints_to_hub``: the uploader, registered
    as an observer on the main process; its uploads are waited for when the run ends, however it ends."""
    config = session.config
    if not (config.push_to_hub and config.push_checkpoints_to_hub) or os.environ.get("RANK", "0") != "0":
        yield None
        return
    uploads = CheckpointUploads(config, Path(str(config.output_dir)))
    session.host.pm.register(uploads, name=UPLOADS_PLUGIN)
    try:
        yield uploads
    finally:
        session.host.pm.unregister(name=UPLOADS_PLUGIN)
        uploads.close()


def finish_run(
    config: CoreOptions,
    family: ModelFamily,
    output_dir: Path,
    result: Any,
    is_main: bool,
    host: PluginHost | None = None,
) -> None:
    """End of training: write the model card, then upload with ``push_to_hub`` and to every
    ``publishing_config`` provider (main process only)."""
    if not is_main:
        return
    write_model_card(config, family, output_dir, result)
    # A failed upload to one destination must not keep the run from the others.
    failures: list[UserError] = []
    try:
        url = push(config, Path(output_dir))
    except UserError as exc:
        failures.append(exc)
        url = None
    if url:
        log.info("published: %s", url)
        _after_upload(config, url)
    if host is not None and config.publishing_config:
        from stune.publishing import build_publishers, publish_outputs

        publishers = build_publishers(config.publishing_config, host)
        try:
            publish_outputs(publishers, Path(output_dir), lambda _publisher, uri: _after_upload(config, uri))
        except UserError as exc:
            failures.append(exc)
    if failures:
        raise UserError(" ".join(str(exc) for exc in failures)) from failures[0]


def _after_upload(config: CoreOptions, uri: str) -> None:
    if config.post_upload_script:
        from stune import scripts

        placeholders = scripts.values(config, huggingface_path=config.hub_model_id, remote_checkpoint_path=uri)
        scripts.start("post_upload_script", config.post_upload_script, placeholders)
