"""Every cross-option check, in one place, before anything slow happens.

:func:`check_run` runs right after the configuration is validated and the family chosen: the
family's own rules, the core's (optimizer, LoRA initialisation, trackers, publishing), the
quantizers' (installed, runnable here, compatible with the family and the adapter), each enabled
feature's, and last every plugin's ``check_config`` hook. :func:`check_datasets` adds the rules
that depend on the dataset list, once it is scanned. Each failure is one
:class:`stune.ConfigError` sentence naming the options and the fix.

Only what an option needs from the machine is imported here (torch for CUDA questions).
"""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError
from stune.publish import check_publish
from stune.publishing import build_publishers
from stune.quantize import NO_CHANGE, plan_targets
from stune.tracking import check_trackers

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.data.report import Report
    from stune.family import ModelFamily
    from stune.features import TrainingFeature
    from stune.plugins import PluginHost

_PRECISION_KEY = re.compile(r"base_model_precision|text_encoder_\d+_precision")


def check_run(config: CoreOptions, family: ModelFamily, features: list[TrainingFeature], host: PluginHost) -> None:
    from stune.optim import check_optimizer

    family.check_config()
    _check_folders(config)
    _check_seeds(config)
    check_optimizer(config)
    _check_lora_init(config)
    check_trackers(config)
    check_publish(config)
    build_publishers(config.publishing_config, host)  # providers installed, their keys and SDKs
    _check_precisions(config, family, host)
    _check_memory(config)
    for feature in features:
        missing = feature.missing_requirements(family)
        if missing:
            raise ConfigError(
                f"The {feature.name} feature needs the {family.name} family to declare {', '.join(missing)}, "
                f"which it does not; turn {feature.name} off for this family."
            )
        feature.check()
    host.hooks.check_config(config=config, family=family)


def check_datasets(config: CoreOptions, family: ModelFamily, report: Report) -> None:
    """Rules that need the scanned dataset list."""
    from stune.adapters import ADAPTERS, adapter_kind

    if not ADAPTERS[adapter_kind(config)].can_disable and any(d.dataset.is_regularisation for d in report.training):
        raise ConfigError(
            "Regularisation datasets train towards the base model's prediction, which needs an adapter to switch "
            "off; use model_type=lora, or remove is_regularisation_data."
        )
    paired = [d.dataset for d in report.datasets if d.dataset.references is not None]
    if paired and not family.takes_reference_images():
        raise ConfigError(
            f"Dataset `{paired[0].id}` pairs its images with reference images, which {family.name} "
            f"({family.flavour or 'this flavour'}) does not train on; remove the reference conditioning_data, "
            "or train an edit model (e.g. model_flavour kontext)."
        )
    if family.takes_reference_images():
        if not any(d.dataset.references for d in report.training):
            raise ConfigError(
                f"{family.name} {family.flavour or ''} learns edits from (reference, edited) image pairs, and no "
                "training dataset has reference images; add a conditioning dataset with conditioning_type "
                "reference_strict or reference_loose and link it with conditioning_data."
            )
        from stune.validation import eval_references, rendered_prompts, validation_inputs

        inputs = validation_inputs(config, eval_references(report))
        missing = [n for n in rendered_prompts(config) if n not in inputs]
        if missing:
            raise ConfigError(
                f"Validation prompt `{missing[0]}` has no input image to edit; set validation_input to an image, "
                'give the prompt library entry an "image", or add an eval dataset with reference images.'
            )


def _check_folders(config: CoreOptions) -> None:
    """The folders a run writes into are folders (``output_dir`` may not be an existing file), and
    the names it turns into file names are plain names."""
    from pathlib import Path

    from stune.names import FOLDER_OPTIONS, check_folder, check_name

    for option in FOLDER_OPTIONS:
        value = getattr(config, option, None)
        if value:
            check_folder(Path(value), option)
    if config.tracker_run_name:
        check_name(config.tracker_run_name, "Option `tracker_run_name`")
    check_name(config.tracker_project_name, "Option `tracker_project_name`")


def _check_seeds(config: CoreOptions) -> None:
    for option in ("seed", "validation_seed"):
        value = getattr(config, option, None)
        if value is not None and not 0 <= value < 2**32:  # numpy's generator takes no other seeds
            raise ConfigError(f"Option `{option}` = {value} is out of range; use a number from 0 to {2**32 - 1}.")


#: the LyCORIS settings that are numbers (``create_lycoris`` converts them with int()/float())
_LYCORIS_NUMBERS = {
    "multiplier": float,
    "linear_dim": int,
    "linear_alpha": float,
    "conv_dim": int,
    "conv_alpha": float,
    "dropout": float,
    "rank_dropout": float,
    "module_dropout": float,
    "factor": int,
    "block_size": int,
    "constraint": float,
}
_LYCORIS_PRESET_LISTS = ("target_module", "target_name", "exclude_name")
_LYCORIS_PRESET_MAPS = ("module_algo_map", "name_algo_map")
#: the keys of ``apply_preset`` (lycoris's preset class attributes; stune.adapters applies them)
_LYCORIS_PRESET_KEYS = {*_LYCORIS_PRESET_LISTS, *_LYCORIS_PRESET_MAPS, "enable_conv", "use_fnmatch", "lora_prefix"}


def lycoris_settings(path_text: str) -> dict[str, Any]:
    """The LyCORIS config file (``lycoris_config``), checked so that the network builds: its
    ``algo`` (and every ``algo`` in its preset maps) is one lycoris has, its numbers are numbers,
    its preset has the shapes lycoris reads. Each mistake is one sentence naming the file."""
    from pathlib import Path

    from lycoris.wrapper import network_module_dict

    from stune.jsonfile import read_json

    path = Path(path_text)
    where = f"The LyCORIS config {path} (lycoris_config)"
    settings = read_json(path, "LyCORIS config (lycoris_config)")
    if not isinstance(settings, dict) or "algo" not in settings:
        raise ConfigError(f"{where} must be a JSON object with at least an `algo`.")
    algos = ", ".join(sorted(network_module_dict))

    def check_algo(value: Any, key: str) -> None:
        if not isinstance(value, str) or value.lower() not in network_module_dict:
            raise ConfigError(
                f"{where} has {key} = {str(value)[:60]!r}, which LyCORIS does not have; use one of {algos}."
            )

    def check_numbers(values: dict[str, Any], prefix: str) -> None:
        for key, kind in _LYCORIS_NUMBERS.items():
            value = values.get(key)
            if value is None:
                continue
            whole = kind is not int or not (isinstance(value, float) and not value.is_integer())
            try:
                number = kind(value)  # what lycoris does: int("4.5") fails there too
                if isinstance(value, bool) or not whole or number != number or abs(number) == float("inf"):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                kind_name = "a whole number" if kind is int else "a number"
                raise ConfigError(
                    f"{where} has `{prefix}{key}` = {str(value)[:60]!r}; it must be {kind_name}."
                ) from None
            if key in ("linear_dim", "conv_dim", "block_size") and number < 1:
                raise ConfigError(f"{where} has `{prefix}{key}` = {value!r}; it must be 1 or more.")

    check_algo(settings["algo"], "`algo`")
    check_numbers(settings, "")
    preset = settings.get("apply_preset")
    if preset is not None:
        if not isinstance(preset, dict):
            raise ConfigError(f"{where} has an `apply_preset` that is not a JSON object.")
        unknown = sorted(set(preset) - _LYCORIS_PRESET_KEYS)
        if unknown:
            raise ConfigError(f"{where} has an unknown `apply_preset` key `{unknown[0][:60]}`.")
        for key in _LYCORIS_PRESET_LISTS:
            if key in preset and not (isinstance(preset[key], list) and all(isinstance(v, str) for v in preset[key])):
                raise ConfigError(f"{where} has `apply_preset.{key}` that is not a list of names.")
        for key in _LYCORIS_PRESET_MAPS:
            if key not in preset:
                continue
            if not isinstance(preset[key], dict) or not all(isinstance(v, dict) for v in preset[key].values()):
                raise ConfigError(f"{where} has `apply_preset.{key}` that is not an object of name: {{settings}}.")
            for name, module in preset[key].items():
                if "algo" in module:
                    check_algo(module["algo"], f"`apply_preset.{key}.{name[:60]}.algo`")
                check_numbers(module, f"apply_preset.{key}.{name[:60]}.")
    named = settings.get("preset")
    if named is not None:
        from lycoris.config import PRESET

        if not isinstance(named, str) or (named not in PRESET and not _is_file(named)):
            raise ConfigError(
                f"{where} has `preset` = {str(named)[:60]!r}, neither a LyCORIS preset ({', '.join(PRESET)}) "
                "nor a preset file."
            )
    return settings


def _is_file(text: str) -> bool:
    from pathlib import Path

    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a NUL byte, a name longer than the file system takes
        return False


def _check_memory(config: CoreOptions) -> None:
    """Memory, speed and distribution options: each area's module is imported only when one of its
    options is set (they need torch to ask about the machine)."""
    defaults = type(config).model_fields
    changed = {k for k in config.model_fields_set if k in defaults and getattr(config, k) != defaults[k].default}
    if changed & {"attention_mechanism", "sageattention_usage"}:
        from stune.attention import check_attention

        check_attention(config)
    if config.enable_group_offload or config.musubi_blocks_to_swap:
        from stune.offload import check_offload

        check_offload(config)
    if config.fuse_optimizer:
        from stune.fused import check_fused

        check_fused(config)
    if config.optimizer_cpu_offload_method != "none":
        from stune.optim import check_cpu_offload

        check_cpu_offload(config)
    if config.fuse_qkv_projections or config.dynamo_backend != "no":
        from stune.speed import check_speed

        check_speed(config)
    if config.fsdp_enable or config.deepspeed_config:
        from stune.sharding import check_sharding

        check_sharding(config)


def _check_lora_init(config: CoreOptions) -> None:
    if config.model_type == "lora" and config.lora_type == "standard" and config.lora_init_type == "loftq":
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "`lora_init_type` loftq quantizes with bitsandbytes on a CUDA GPU, which this machine lacks; "
                "use default, gaussian, pissa or olora."
            )


def _check_precisions(config: CoreOptions, family: ModelFamily, host: PluginHost) -> None:
    for key in type(config).model_fields:
        if not _PRECISION_KEY.fullmatch(key):
            continue
        value = getattr(config, key)
        if value in NO_CHANGE or value in host.quantizers:
            continue
        choices = ", ".join(["no_change", *sorted(host.quantizers)])
        raise ConfigError(f"Option `{key}` = {value!r} is not an installed precision; choose one of: {choices}.")
    declared = {slot.precision_option for slot in family.text_encoder_slots}
    for key in type(config).model_fields:
        unused = key.startswith("text_encoder_") and _PRECISION_KEY.fullmatch(key) and key not in declared
        if unused and getattr(config, key) not in NO_CHANGE:
            raise ConfigError(
                f"Option `{key}` names a text encoder {family.name} does not have (its encoders set "
                f"{', '.join(sorted(declared)) or 'no precision options'}); remove it."
            )
    for target in plan_targets(config, family, None):
        quantizer = host.quantizers[target.precision](config)
        quantizer.check(target, family)
        if (
            target.component == "transformer"
            and config.model_type == "full"
            and quantizer.is_quantized(target.precision)
        ):
            raise ConfigError(
                f"model_type=full cannot train a quantized base (base_model_precision={target.precision}): "
                "its weights are frozen integers; use model_type=lora, or base_model_precision no_change."
            )
