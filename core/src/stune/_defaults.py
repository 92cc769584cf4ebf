"""The core's own hook implementations, registered like any plugin with ``trylast=True``.

They delegate to the model family, so a family plugin only writes methods; another plugin can
still replace one phase by implementing the hook (its result comes first).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError
from stune.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from stune.adapters import Adapter
    from stune.config import CoreOptions
    from stune.family import Components, ModelFamily


def weight_dtype(config: CoreOptions) -> torch.dtype:
    """dtype of frozen base weights: bf16/fp16 under mixed precision, else fp32."""
    import torch

    if config.base_model_default_dtype is not None:
        return torch.bfloat16 if config.base_model_default_dtype == "bf16" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


@hookimpl(trylast=True)
def check_config(config: CoreOptions) -> None:
    """Checks of the machine the options need (imports torch only for the options that need it)."""
    from stune.optim import check_optimizer

    check_optimizer(config)
    if config.model_type == "lora" and config.lora_type == "standard" and config.lora_init_type == "loftq":
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "`lora_init_type` loftq quantizes with bitsandbytes on a CUDA GPU, which this machine lacks; "
                "use default, gaussian, pissa or olora."
            )


@hookimpl(trylast=True)
def load_model(family: ModelFamily, config: CoreOptions, device: torch.device, text_encoders: bool) -> Components:
    return family.load(device, weight_dtype(config), text_encoders=text_encoders)


@hookimpl(trylast=True)
def encode_text(family: ModelFamily, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
    return family.encode_prompts(components, prompts)


@hookimpl(trylast=True)
def compute_loss(prediction: torch.Tensor, target: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    # fp32 for the reduction: bf16 squared errors lose the small differences late in training.
    loss = (prediction.float() - target.float()).square()
    weight = batch.get("loss_weight")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


@hookimpl(trylast=True)
def save_adapter(adapter: Adapter, output_dir: Path) -> list[Path]:
    return adapter.save(output_dir)


class QuantizeDispatch:
    """Default ``quantize``: hand each ``*_precision`` option to the quantizer registered for it."""

    def __init__(self, quantizers: dict[str, Any]) -> None:
        self.quantizers = quantizers

    @hookimpl(trylast=True)
    def quantize(self, components: Components, family: ModelFamily, config: CoreOptions) -> None:
        targets: list[tuple[str, Any, str]] = []
        precision = getattr(config, "base_model_precision", None)
        if precision:
            targets.append(("transformer", components, precision))
        for index, key in enumerate(components.text_encoders, start=1):
            te_precision = getattr(config, f"text_encoder_{index}_precision", None)
            if te_precision:
                targets.append((key, components.text_encoders, te_precision))
        for key, holder, precision in targets:
            if precision == "no_change":
                continue
            quantizer = self.quantizers[precision]
            quantizer.validate_environment(precision)
            if key == "transformer":
                exclude = family.quantization_exclusions
                holder.transformer = quantizer.quantize(holder.transformer, precision, exclude, config)
            else:
                holder[key] = quantizer.quantize(holder[key], precision, (), config)
