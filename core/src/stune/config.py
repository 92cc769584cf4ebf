"""Configuration: the core's options, and reading SimpleTuner-style config files.

A run's configuration is one flat pydantic model assembled from the core's :class:`CoreOptions`
and every loaded plugin's options. Sources, later ones winning: the config file
(``config/config.json`` by default, or TOML), then ``--key=value`` on the command line. Keys may
carry SimpleTuner's leading ``--``. Every problem is reported as one :class:`ConfigError`
sentence before any model or dataset is touched.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError, create_model, field_validator, model_validator

from stune.errors import ConfigError, PluginNotInstalled
from stune.jsonfile import read_json
from stune.options import AliasChoices, Field, Options, json_list, option_names

if TYPE_CHECKING:
    from stune.plugins import PluginHost

DEFAULT_CONFIG_PATHS = (Path("config/config.json"), Path("config/config.toml"))
DEFAULT_DATA_BACKEND_CONFIG = Path("config/multidatabackend.json")

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


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


class CoreOptions(Options):
    """Options every run has, whatever the model family."""

    # -- model ------------------------------------------------------------------------------
    model_family: str | None = Field(None, description="Model family to train (e.g. flux); needs its plugin.")
    model_flavour: str | None = Field(None, description="Named variant of the family, mapped to a Hub repository.")
    model_type: Literal["lora"] = Field("lora", description="What is trained: a LoRA adapter on the transformer.")
    lora_type: Literal["standard"] = Field("standard", description="`standard` = PEFT LoRA.")
    pretrained_model_name_or_path: str | None = Field(
        None, description="Local diffusers folder or Hub id of the base pipeline (overrides model_flavour)."
    )
    pretrained_transformer_model_name_or_path: str | None = Field(
        None, description="Load only the transformer from this folder or Hub id."
    )
    pretrained_transformer_subfolder: str | None = Field(
        "transformer", description="Subfolder of the transformer repository; `none` for its root."
    )
    pretrained_vae_model_name_or_path: str | None = Field(None, description="Load the VAE from this folder or Hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")

    # -- adapter ----------------------------------------------------------------------------
    lora_rank: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to the rank (scale 1).")
    peft_lora_target_modules: list[str] | None = Field(
        None, description="Module names for LoRA (JSON list); overrides the family's target preset."
    )

    # -- data ----------------------------------------------------------------------------------
    data_backend_config: str | None = Field(
        None, description="Dataset list (multidatabackend.json); default config/multidatabackend.json."
    )
    resolution: float = Field(1024, gt=0, description="Training resolution (unit set by resolution_type).")
    resolution_type: Literal["pixel", "area", "pixel_area"] = Field(
        "pixel_area", description="pixel: shorter edge; area: megapixels; pixel_area: side of a square of equal area."
    )
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet"] = Field(
        "filename", description="Where captions come from (datasets may override)."
    )
    instance_prompt: str | None = Field(None, description="Caption for caption_strategy=instanceprompt.")
    cache_dir: str = Field("cache", description="Root folder of the latent and text-embedding caches.")
    cache_dir_vae: str | None = Field(
        None, description="VAE latent cache folder; default <cache_dir>/vae/<dataset id>."
    )
    cache_dir_text: str | None = Field(None, description="Text-embedding cache folder; default <cache_dir>/text.")
    vae_batch_size: int = Field(4, gt=0, description="Images per VAE forward while caching.")
    text_encoder_batch_size: int = Field(8, gt=0, description="Captions per text-encoder forward while caching.")
    write_batch_size: int = Field(128, gt=0, description="Cache entries handed to the background writer at once.")
    aspect_bucket_rounding: int = Field(
        2, ge=0, le=6, description="Decimals an image's aspect ratio is rounded to when choosing its bucket."
    )
    offload_during_startup: bool = Field(
        False, description="Keep only the encoder in use on the accelerator while caching (saves memory)."
    )
    caption_dropout_probability: float = Field(
        0.1, ge=0, le=1, description="Probability of training a sample on the empty caption."
    )
    tokenizer_max_length: int | None = Field(
        None, gt=0, description="Token length of the long text encoder (T5); family default when unset."
    )

    # -- optimisation ---------------------------------------------------------------------------
    output_dir: str = Field("output", description="Where the adapter, checkpoints and images go.")
    seed: int | None = Field(None, description="Random seed; a fixed seed makes runs repeatable.")
    train_batch_size: int = Field(1, gt=0, description="Samples per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_train_steps: int | None = Field(
        None, ge=0, description="Optimizer steps to train; when set (>0) it overrides num_train_epochs."
    )
    num_train_epochs: int = Field(1, ge=0, description="Epochs to train when max_train_steps is unset.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["torch-adamw", "adamw"] = Field("torch-adamw", description="Optimizer (torch AdamW).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        "constant_with_warmup", description="Learning-rate schedule."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_num_cycles: int = Field(1, ge=1, description="Cycles of cosine_with_restarts.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    max_grad_norm: float = Field(2.0, ge=0, description="Gradient clipping threshold; 0 disables.")
    grad_clip_method: Literal["value", "norm"] = Field(
        "value", description="value: clamp each gradient element; norm: scale by the global norm."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16", description="Precision of the frozen base weights and autocast; adapters stay fp32."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute block activations in backward to save memory.")

    # -- flow matching ------------------------------------------------------------------------
    flow_schedule_shift: float = Field(3.0, ge=0, description="Static sigma shift s: s·σ/(1+(s−1)·σ); 0 disables.")
    flow_schedule_auto_shift: bool = Field(
        False, description="Resolution-dependent shift from the scheduler's base/max shift (replaces the static one)."
    )
    flow_sigmoid_scale: float = Field(1.0, gt=0, description="σ = sigmoid(scale·N(0,1)) before the shift.")

    # -- checkpoints ----------------------------------------------------------------------------
    checkpoint_step_interval: int | None = Field(
        500,
        ge=0,
        validation_alias=AliasChoices("checkpoint_step_interval", "checkpointing_steps"),
        description="Write checkpoint-<step>/ every N optimizer steps (0 or none: never).",
    )
    checkpoints_total_limit: int | None = Field(5, ge=1, description="Keep at most N checkpoints (none: all).")
    resume_from_checkpoint: str | None = Field(
        "latest", description="`latest`, a checkpoint folder, or none to start fresh."
    )

    # -- validation -----------------------------------------------------------------------------
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

    @field_validator("peft_lora_target_modules", mode="before")
    @classmethod
    def _target_list(cls, value: Any) -> Any:
        return json_list(value)

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _check_resolutions(cls, value: Any) -> Any:
        parse_resolutions(str(value))
        return str(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> CoreOptions:
        explicit = self.model_fields_set
        if self.flow_schedule_auto_shift and "flow_schedule_shift" in explicit and self.flow_schedule_shift > 0:
            raise ValueError(
                "`flow_schedule_auto_shift` replaces `flow_schedule_shift`; remove flow_schedule_shift "
                "or set it to 0, or turn auto shift off"
            )
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("`lr_scheduler` constant ignores lr_warmup_steps; use constant_with_warmup")
        if self.pretrained_transformer_subfolder is not None and self.pretrained_transformer_subfolder.lower() in (
            "none",
            "",
        ):
            self.pretrained_transformer_subfolder = None
        return self

    # -- derived values (not options) ------------------------------------------------------------
    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        return parse_resolutions(self.validation_resolution)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


# The assembled model is a subclass of CoreOptions and of every plugin's options.
Config = CoreOptions


def build_config_model(option_models: list[tuple[str, type[Options]]]) -> type[CoreOptions]:
    """Merge the core's and the plugins' option models into one; a key declared twice is an error."""
    owners: dict[str, str] = {name: "core" for name in option_names(CoreOptions)}
    fields: dict[str, Any] = dict(CoreOptions.model_fields)
    bases: list[type[Options]] = []
    for plugin, model in option_models:
        for key in option_names(model):
            shared = key in fields and key in model.model_fields and _same_field(fields[key], model.model_fields[key])
            if key in owners and owners[key] != plugin and not shared:
                raise ConfigError(
                    f"Plugins `{owners[key]}` and `{plugin}` both declare the option `{key}`; uninstall one of them."
                )
            owners[key] = plugin
        fields.update(model.model_fields)
        if model not in bases:
            bases.append(model)
    if not bases:
        return CoreOptions
    return create_model("Config", __base__=(CoreOptions, *bases))  # type: ignore[call-overload,no-any-return,arg-type]


def _same_field(a: Any, b: Any) -> bool:
    return bool(a.annotation == b.annotation and a.default == b.default)


# -- reading ---------------------------------------------------------------------------------------


def find_config_file(path: str | Path | None) -> Path | None:
    """The config file to read: ``path`` if given, else config/config.json or config/config.toml."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"The config file {path} does not exist; check --config.")
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.is_file():
            return candidate
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        try:
            data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"The config file {path} is not valid TOML: {exc}.") from None
    else:
        data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"The config file {path} must hold one JSON object of option: value pairs.")
    return {normalise_key(k): v for k, v in data.items()}


def normalise_key(key: str) -> str:
    return str(key).strip().lstrip("-")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--key=value``, ``--key value`` and bare ``--flag`` (meaning true) into a dict."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Unexpected argument {arg!r}; options are written --key=value.")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            key, value = body, "true"
        out[normalise_key(key)] = value
        i += 1
    return out


def _one_sentence(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not loc:
        return msg + "."
    value = first.get("input")
    shown = f" = {value!r}" if not isinstance(value, dict) else ""
    return f"Option `{loc}`{shown} is invalid: {msg[0].lower() + msg[1:]}."


def validate_config(raw: dict[str, Any], model: type[CoreOptions], host: PluginHost | None = None) -> CoreOptions:
    """Validate raw key/values against ``model``; unknown keys name the nearest key or the plugin."""
    known = option_names(model)
    neutral = host.neutral_options() if host is not None else {}
    for key in list(raw):
        if key not in known and key in neutral and str(raw[key]).lower() == str(neutral[key]).lower():
            del raw[key]  # e.g. base_model_precision=no_change asks nothing of the missing quant plugin
    for key in raw:
        if key in known:
            continue
        owner = host.catalog_owner_of_option(key) if host is not None else None
        if owner is not None:
            raise PluginNotInstalled(
                f"Option `{key}` belongs to the `{owner.name}` plugin, which is not loaded; "
                f"install it with `pip install {owner.distribution}` (or add --plugin {owner.name})."
            )
        from stune.data.config import DatasetConfig

        if key in option_names(DatasetConfig):
            raise ConfigError(
                f"`{key}` is a dataset option; set it on the dataset in your multidatabackend.json, not in the config."
            )
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else "run `st-train options` to list the valid keys."
        raise ConfigError(f"Unknown option `{key}`; {hint}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_sentence(exc)) from None
