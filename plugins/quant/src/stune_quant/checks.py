"""The option checks that are not about one quantization target, and ``quantization_config``."""

from __future__ import annotations

import json
from typing import Any

from stune.errors import ConfigError
from stune.jsonfile import read_json
from stune.quantize import NO_CHANGE

_DTYPE_ONLY = ("bf16", "fp16", "fp32")


def check_quant_options(config: Any) -> None:
    if getattr(config, "quantization_config", None) is None:
        return
    if config.model_type == "full":
        raise ConfigError(
            "quantization_config quantizes the transformer while it loads, which only a LoRA or LyCORIS can train "
            "on; use model_type=lora, or remove quantization_config."
        )
    precision = getattr(config, "base_model_precision", None)
    if precision not in NO_CHANGE and precision not in _DTYPE_ONLY:
        raise ConfigError(
            f"Both base_model_precision={precision} and quantization_config ask to quantize the transformer; "
            "keep one of them (set base_model_precision to no_change to use quantization_config)."
        )
    quantization = diffusers_quantization_config(config)
    if getattr(quantization, "quant_method", None) == "bitsandbytes":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "quantization_config asks for bitsandbytes, which diffusers loads only onto a CUDA GPU; use "
                "base_model_precision=nf4-bnb (it runs on the CPU too) or a torchao quantization_config."
            )


def diffusers_quantization_config(config: Any) -> Any:
    """``quantization_config`` (an object, JSON text or a JSON file) as a diffusers quantization config."""
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    value = config.quantization_config
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"quantization_config is not valid JSON: {exc.msg} (column {exc.colno}).") from None
        else:
            value = read_json(text, "quantization config (quantization_config)")
    if not isinstance(value, dict):
        raise ConfigError("quantization_config must be a JSON object (a diffusers quantization config).")
    try:
        return DiffusersAutoQuantizer.from_dict(dict(value))
    except (ValueError, TypeError, KeyError, AssertionError, ImportError) as exc:
        raise ConfigError(
            f"quantization_config is not a diffusers quantization config diffusers can build ({str(exc).strip()}); "
            "give it a quant_method (torchao, bitsandbytes_4bit, …) and that method's fields."
        ) from None
