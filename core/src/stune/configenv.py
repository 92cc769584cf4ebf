"""SimpleTuner's deprecated ``config/config.env``: read it (never run it) and convert it to JSON.

Older SimpleTuner quickstarts configure a run with a shell file of ``export NAME=value`` lines:
variables such as ``MODEL_NAME`` or ``MAX_NUM_STEPS`` stand for options, and
``TRAINER_EXTRA_ARGS`` carries any other ``--key=value`` flags, often grown line by line with
``TRAINER_EXTRA_ARGS="${TRAINER_EXTRA_ARGS} --more=flags"``. stune tokenises the file with
:mod:`shlex`, expands only references to variables the file itself assigned, and refuses command
substitution: nothing in it is executed. It is read when no config.json/config.toml exists (with a
notice to convert); ``st-train convert`` writes the equivalent config/config.json.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

from stune.errors import ConfigError, UserError

log = logging.getLogger("stune.config")

CONFIG_ENV = Path("config/config.env")
EXTRA_ARGS = "TRAINER_EXTRA_ARGS"

#: config.env variable → the option it sets: SimpleTuner 4.10.1's own map (its env_file.py), less the
#: variables of families and methods stune does not cover, plus VAE_BATCH_SIZE, which the SD3
#: quickstart names.
ENV_OPTIONS: dict[str, str] = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint",
    "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding",
    "TRAINING_SEED": "seed",
    "ACCELERATE_CONFIG_PATH": "accelerate_config",
    "ACCELERATE_EXTRA_ARGS": "accelerate_extra_args",
    "USE_EMA": "use_ema",
    "MINIMUM_RESOLUTION": "minimum_image_size",
    "OUTPUT_DIR": "output_dir",
    "USE_DORA": "use_dora",
    "LORA_TYPE": "lora_type",
    "LYCORIS_CONFIG": "lycoris_config",
    "PUSH_TO_HUB": "push_to_hub",
    "PUSH_TO_HUB_BACKGROUND": "push_to_hub_background",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub",
    "PUBLISHING_CONFIG": "publishing_config",
    "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs",
    "CHECKPOINTING_STEPS": "checkpoint_step_interval",
    "CHECKPOINT_STEP_INTERVAL": "checkpoint_step_interval",
    "CHECKPOINT_EPOCH_INTERVAL": "checkpoint_epoch_interval",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit",
    "HUB_MODEL_NAME": "hub_model_id",
    "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work",
    "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name",
    "MODEL_TYPE": "model_type",
    "MODEL_NAME": "pretrained_model_name_or_path",
    "MODEL_FAMILY": "model_family",
    "TRAIN_BATCH_SIZE": "train_batch_size",
    "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "ENABLE_CHUNKED_FEED_FORWARD": "enable_chunked_feed_forward",
    "FEED_FORWARD_CHUNK_SIZE": "feed_forward_chunk_size",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability",
    "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution",
    "VALIDATION_SEED": "validation_seed",
    "VALIDATION_STEPS": "validation_step_interval",
    "VALIDATION_STEP_INTERVAL": "validation_step_interval",
    "VALIDATION_EPOCH_INTERVAL": "validation_epoch_interval",
    "VALIDATION_RESOLUTION": "validation_resolution",
    "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps",
    "VALIDATION_PROMPT": "validation_prompt",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt",
    "VALIDATION_INPUT": "validation_input",
    "VALIDATION_METHOD": "validation_method",
    "VALIDATION_EXTERNAL_SCRIPT": "validation_external_script",
    "VALIDATION_EXTERNAL_BACKGROUND": "validation_external_background",
    "POST_CHECKPOINT_SCRIPT": "post_checkpoint_script",
    "POST_UPLOAD_SCRIPT": "post_upload_script",
    "MIXED_PRECISION": "mixed_precision",
    "OPTIMIZER": "optimizer",
    "LEARNING_RATE": "learning_rate",
    "LR_SCHEDULE": "lr_scheduler",
    "LR_WARMUP_STEPS": "lr_warmup_steps",
    "LR_END": "lr_end",
    "BASE_MODEL_PRECISION": "base_model_precision",
    "QUANTIZE_VIA": "quantize_via",
    "QUANTIZATION_CONFIG": "quantization_config",
    "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_NUM_MACHINES": "num_machines",
    "TRAINING_DYNAMO_BACKEND": "dynamo_backend",
    "TRAINER_DYNAMO_BACKEND": "dynamo_backend",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "FLUX_GUIDANCE_VALUE": "flux_guidance_value",
    "FLUX_LORA_TARGET": "flux_lora_target",
    "METADATA_UPDATE_INTERVAL": "metadata_update_interval",
    "READ_BATCH_SIZE": "read_batch_size",
    "WRITE_BATCH_SIZE": "write_batch_size",
    "VAE_BATCH_SIZE": "vae_batch_size",  # named by the SD3 quickstart's dataset advice
    "TEXT_ENCODER_BATCH_SIZE": "text_encoder_batch_size",
    "TEXT_CACHE_ONDEMAND": "text_cache_ondemand",
    "TEXT_CACHE_DISABLE": "text_cache_disable",
    "TORCH_NUM_THREADS": "torch_num_threads",
    "IMAGE_PROCESSING_BATCH_SIZE": "image_processing_batch_size",
    "DISABLE_BENCHMARK": "disable_benchmark",
}
#: Older SimpleTuner picked the family with a boolean variable.
FAMILY_FLAGS = {"FLUX": "flux", "STABLE_DIFFUSION_3": "sd3", "HIDREAM": "hidream"}
#: Variables that configure the environment, not the trainer (set them in the shell instead).
_ENVIRONMENT = re.compile(r"^(CUDA_|PYTORCH_|HF_|HUGGINGFACE_|TORCH_|NCCL_|OMP_|TOKENIZERS_|WANDB_|SIMPLETUNER_|ENV$)")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def parse_env_file(path: Path) -> dict[str, str]:
    """The variables a config.env assigns, in order, with ``${NAME}`` references to earlier ones
    expanded. Only ``[export] NAME=value`` and ``NAME+=value`` statements are accepted."""
    text = path.read_text(encoding="utf-8")
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    variables: dict[str, str] = {}
    while True:
        line = lexer.lineno
        try:
            token = lexer.get_token()
        except ValueError as exc:  # an unclosed quote
            raise ConfigError(f"{path} line {line}: {exc}; close the quote.") from None
        if token is None:
            return variables
        if token == "export":
            continue
        name, sep, value = token.partition("=")
        append = name.endswith("+")
        name = name.rstrip("+")
        if not sep or not _NAME.match(name):
            raise ConfigError(
                f"{path} line {line}: `{token}` is not a NAME=value assignment; stune reads config.env without "
                "running it, so only (export) NAME=value lines are allowed."
            )
        if "$(" in value or "`" in value:
            raise ConfigError(
                f"{path} line {line}: `{name}` uses command substitution, which stune never runs; write the value "
                "itself."
            )
        value = _REFERENCE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), value)
        variables[name] = (variables.get(name, "") + " " + value).strip() if append else value


def read_config_env(path: Path) -> dict[str, Any]:
    """Options (SimpleTuner names, string values) of a config.env."""
    from stune.config import normalise_key, parse_overrides

    raw: dict[str, Any] = {}
    extra: list[str] = []
    for name, value in parse_env_file(path).items():
        if name == EXTRA_ARGS:
            extra = shlex.split(value)
        elif name in ENV_OPTIONS:
            raw[ENV_OPTIONS[name]] = value
        elif name in FAMILY_FLAGS:
            if value.strip().lower() == "true":
                raw["model_family"] = FAMILY_FLAGS[name]
        elif name == "ALLOW_TF32":
            raw["disable_tf32"] = "false" if value.strip().lower() == "true" else "true"
        elif _ENVIRONMENT.match(name):
            log.warning(
                "%s sets %s, an environment variable, not an option: export it in the shell instead.", path, name
            )
        else:
            log.warning(
                "%s sets %s, which SimpleTuner's config.env does not read either; ignored (put --option=value in "
                "TRAINER_EXTRA_ARGS instead).",
                path,
                name,
            )
    # SimpleTuner appends TRAINER_EXTRA_ARGS after the mapped variables, so its flags win.
    raw.update(parse_overrides(extra))
    return {normalise_key(k): v for k, v in raw.items()}


def notice(path: Path) -> None:
    log.warning(
        "Reading %s, SimpleTuner's deprecated shell-style config; run `st-train convert` to write the equivalent "
        "config/config.json.",
        path,
    )


def typed(raw: dict[str, Any], model: Any) -> dict[str, Any]:
    """String values turned into JSON numbers and booleans where the option takes one (for config.json)."""
    from stune.options import option_names

    names = option_names(model)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        field = model.model_fields.get(names.get(key, ""))
        out[key] = value
        # SimpleTuner-only keys (no stune field) are typed too: their rows compare values as SimpleTuner reads them
        if not isinstance(value, str) or (field is not None and "str" in str(field.annotation)):
            continue
        try:
            parsed = json.loads(value.strip().lower() if value.strip().lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, bool | int | float):
            out[key] = parsed
    return out


def convert(source: Path, target: Path, model: Any) -> Path:
    """Write the config.json equivalent to ``source``; an existing ``target`` is never overwritten."""
    if target.exists():
        raise UserError(f"{target} already exists; move it away or pass --output to write elsewhere.")
    if not source.is_file():
        raise UserError(f"{source} does not exist; pass the config.env to convert with --config.")
    data = typed(read_config_env(source), model)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    return target
