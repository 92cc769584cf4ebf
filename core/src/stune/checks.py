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
from typing import TYPE_CHECKING

from stune.errors import ConfigError
from stune.publish import check_publish
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
    check_optimizer(config)
    _check_lora_init(config)
    check_trackers(config)
    check_publish(config)
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
