"""Validation images rendered during training, and the prompt library they come from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.errors import ConfigError
from stune.jsonfile import read_json
from stune.options import AliasChoices, Field, Options

#: nickname of ``validation_prompt`` among the library's nicknames (and in image file names)
MAIN_NICKNAME = "validation"
#: keys a library entry written as an object may hold its prompt under (SimpleTuner's names)
_PROMPT_KEYS = ("prompt", "caption", "lyrics")

#: ``validation_prompt_library``: neutral prompts that show what an adapter does to subjects it was
#: not trained on (drift in people, text, scenery, materials); nicknames are file-safe names.
BUILTIN_PROMPT_LIBRARY = {
    "library_portrait": "a close-up portrait of an elderly woman with freckles, soft window light, 85mm photo",
    "library_street": "a rainy city street at dusk, neon shop signs reflected in puddles, people with umbrellas",
    "library_landscape": "a wide mountain valley with a river and pine forest under morning fog",
    "library_still_life": "a still life of lemons, a glass carafe of water and a blue ceramic bowl on a wooden table",
    "library_animal": "a red fox sitting in fresh snow, looking at the camera, wildlife photograph",
    "library_interior": "a sunlit scandinavian living room with a grey sofa, plants and a bookshelf",
    "library_typography": 'a hand-painted wooden sign that reads "OPEN DAILY" hanging on a brick wall',
    "library_illustration": "a flat vector illustration of a lighthouse on a cliff at sunset, limited palette",
}
#: keys a library entry may hold an input image under (edit models such as FLUX Kontext)
_IMAGE_KEYS = ("image", "input_image", "validation_input")
#: validation_image_format → (file suffix, PIL format name)
IMAGE_FORMATS = {"png": (".png", "PNG"), "jpg": (".jpg", "JPEG"), "jpeg": (".jpg", "JPEG"), "webp": (".webp", "WEBP")}
#: SimpleTuner's validation_noise_scheduler names a flow-matching model cannot sample with, and why
REFUSED_SCHEDULERS = {
    "ddim": "DDIM samples ε/v-prediction models; FLUX, SD3 and HiDream predict a flow velocity",
    "ddpm": "DDPM samples ε/v-prediction models; FLUX, SD3 and HiDream predict a flow velocity",
    "perflow": "PeRFlow is the sampler of PeRFlow-distilled models, which stune does not train",
}


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


@dataclass(frozen=True)
class ValidationAdapter:
    """An extra LoRA loaded beside the trained adapter while validation images are rendered."""

    path: Path
    name: str
    strength: float = 1.0


def validation_adapters(
    path: str | None, name: str | None, strength: float, config_file: str | None
) -> list[ValidationAdapter]:
    """The extra validation adapters: validation_adapter_path (with _name and _strength), then the
    entries of validation_adapter_config (a JSON list of {"path", "name", "strength"}, or one such object)."""
    adapters = []
    if path:
        adapters.append(ValidationAdapter(Path(path), file_slug(name or Path(path).stem), strength))
    if config_file:
        data: Any = read_json(config_file, "validation_adapter_config file")
        entries = data if isinstance(data, list) else [data]
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ConfigError(
                    f"validation_adapter_config {config_file}: entry {number} needs a `path` (an adapter file); "
                    'write [{"path": "…", "name": "…", "strength": 1.0}, …].'
                )
            given = Path(entry["path"])
            strength_value = entry.get("strength", 1.0)
            if isinstance(strength_value, bool) or not isinstance(strength_value, int | float):
                raise ConfigError(
                    f"validation_adapter_config {config_file}: entry {number} has strength {strength_value!r}; "
                    "give a number."
                )
            adapters.append(ValidationAdapter(given, file_slug(str(entry.get("name") or given.stem)), strength_value))
    for adapter in adapters:
        if not adapter.path.exists():
            raise ConfigError(f"The validation adapter {adapter.path} does not exist; fix the path.")
        if adapter.path.is_dir() and not (adapter.path / "pytorch_lora_weights.safetensors").is_file():
            raise ConfigError(
                f"The validation adapter folder {adapter.path} holds no pytorch_lora_weights.safetensors; "
                "point at the LoRA file itself."
            )
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two validation adapters are named {names}; give each a different name.")
    return adapters


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
    validation_method: Literal["simpletuner-local", "external-script"] = Field(
        "simpletuner-local",
        description="simpletuner-local: stune renders the validation prompts; external-script: at each validation "
        "stune runs validation_external_script instead.",
    )
    validation_external_script: str | None = Field(
        None,
        description="Command run (no shell) at each validation with validation_method=external-script; "
        "{local_checkpoint_path} (the newest checkpoint), {global_step}, {validation_seed}, {output_dir} … are "
        "filled in.",
    )
    validation_external_background: bool = Field(
        False, description="Do not wait for validation_external_script before training on."
    )
    validation_prompt: str | None = Field(
        None, description=f"Prompt rendered at every validation (files named `{MAIN_NICKNAME}`)."
    )
    user_prompt_library: str | None = Field(
        None,
        description='JSON file of more validation prompts, {"nickname": "prompt", ...}; nicknames name the files.',
    )
    validation_adapter_path: str | None = Field(
        None,
        description="An extra LoRA file loaded beside the trained adapter while validation images are rendered "
        "(see validation_adapter_mode); files are named <step>-<adapter name>-….",
    )
    validation_adapter_name: str | None = Field(
        None, description="Name of the validation_adapter_path adapter in file names (default: its file name)."
    )
    validation_adapter_strength: float = Field(
        1.0, description="Weight of the extra validation adapter(s) (the trained adapter keeps 1.0)."
    )
    validation_adapter_mode: Literal["adapter_only", "comparison", "none"] = Field(
        "adapter_only",
        description="adapter_only: validation renders with each extra adapter added instead of the plain images; "
        "comparison: the plain images and one set per extra adapter; none: extra adapters are not loaded.",
    )
    validation_adapter_config: str | None = Field(
        None,
        description='JSON file of more extra validation adapters: [{"path": "…", "name": "…", "strength": 1.0}, '
        "…]; each gets its own set of images.",
    )
    validation_prompt_library: bool = Field(
        False,
        description="Also render stune's built-in library of neutral prompts (nicknames library_*) at every "
        "validation, to see what the adapter does to subjects it was not trained on.",
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
    validation_torch_compile: bool = Field(
        False, description="torch.compile the transformer for validation (compiled once, reused every time)."
    )
    validation_preview: bool = Field(
        False, description="Also save the image being denoised every validation_preview_steps steps."
    )
    validation_preview_steps: int = Field(1, ge=1, description="Sampling steps between preview images.")
    validation_preview_autoencoder: str | None = Field(
        None,
        description="Tiny autoencoder (diffusers AutoencoderTiny folder or Hub id) that decodes validation_preview "
        "images; default: the family's (madebyollin/taef1 for FLUX and HiDream, taesd3 for SD3); none: the full VAE.",
    )
    validation_epoch_interval: int | None = Field(
        None, ge=0, description="Also render validation images each time N more epochs are complete (0 or none: no)."
    )
    validate_after_step: int | None = Field(
        None, ge=0, description="Scheduled validations start only once this many optimizer steps are done."
    )
    validate_after_epoch: int | None = Field(
        None, ge=0, description="Scheduled validations start only once this many epochs are complete."
    )
    validation_on_startup: bool = Field(
        False,
        description="Render the validation prompts with the model as it starts (step-<step> files), before the "
        "first training step; also after a resume.",
    )
    validation_image_format: Literal["png", "jpg", "jpeg", "webp"] = Field(
        "png", description="File format of validation images: png (lossless), jpg/jpeg or webp."
    )
    validation_image_quality: int = Field(
        90, ge=1, le=100, description="Quality of jpg and webp validation images (1–100); png ignores it."
    )
    validation_noise_scheduler: Literal["euler", "euler-a", "unipc", "dpm++", "ddim", "ddpm", "perflow"] | None = Field(
        None,
        description="Sampler of validation images; default: the model's own. euler: FlowMatchEulerDiscreteScheduler; "
        "euler-a: the same with stochastic sampling; unipc: UniPCMultistepScheduler on flow sigmas; dpm++: "
        "DPMSolverMultistepScheduler on flow sigmas (ddim, ddpm, perflow are refused).",
    )
    disable_benchmark: bool = Field(
        False,
        description="Skip the base-model images (`base-…` files) rendered once before training to compare against.",
    )

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _check_resolutions(cls, value: Any) -> Any:
        parse_resolutions(str(value))
        return str(value)

    @field_validator("validation_noise_scheduler")
    @classmethod
    def _flow_scheduler_only(cls, value: str | None) -> str | None:
        if value in REFUSED_SCHEDULERS:
            raise ValueError(
                f"validation_noise_scheduler {value} is refused: {REFUSED_SCHEDULERS[value]}; use euler, euler-a, "
                "unipc or dpm++, or remove the key"
            )
        return value

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

    @model_validator(mode="after")
    def _validation_adapters(self) -> ValidationOptions:
        adapters = validation_adapters(
            self.validation_adapter_path,
            self.validation_adapter_name,
            self.validation_adapter_strength,
            self.validation_adapter_config,
        )
        if adapters and getattr(self, "lora_type", "standard") == "lycoris":
            raise ValueError(
                "validation adapters are PEFT LoRAs loaded beside a PEFT adapter; with lora_type=lycoris remove "
                "validation_adapter_path / validation_adapter_config"
            )
        return self

    @model_validator(mode="after")
    def _external_validation(self) -> ValidationOptions:
        if self.validation_method == "external-script" and not (self.validation_external_script or "").strip():
            raise ValueError(
                "`validation_method` external-script needs `validation_external_script`, the command to run; set it"
            )
        return self

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        return parse_resolutions(self.validation_resolution)
