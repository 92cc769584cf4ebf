"""The core's own hook implementations, registered like any plugin with ``trylast=True``.

They delegate to the model family, so a family plugin only writes methods; another plugin can
still replace one phase by implementing the hook (its result comes first).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stune.hookspecs import hookimpl
from stune.quantize import TRANSFORMER

if TYPE_CHECKING:
    import torch

    from stune.adapters import Adapter
    from stune.config import CoreOptions
    from stune.family import Components, LoadRequest, ModelFamily
    from stune.quantize import Quantizer, QuantizeTarget
    from stune.state import TrainState
    from stune.step import Prediction, StepInputs


def weight_dtype(config: CoreOptions) -> torch.dtype:
    """dtype of frozen base weights: bf16/fp16 under mixed precision, else fp32."""
    import torch

    if config.base_model_default_dtype is not None:
        return torch.bfloat16 if config.base_model_default_dtype == "bf16" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


@hookimpl(trylast=True)
def load_model(family: ModelFamily, request: LoadRequest) -> Components:
    return family.load(request)


@hookimpl(trylast=True)
def encode_text(family: ModelFamily, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
    return family.encode_prompts(components, prompts)


@hookimpl(trylast=True)
def compute_loss(prediction: Prediction, inputs: StepInputs, config: CoreOptions) -> torch.Tensor:
    from stune.flow import elementwise_loss

    # fp32 for the reduction: bf16 squared errors lose the small differences late in training.
    loss = elementwise_loss(
        prediction.velocity, inputs.target, inputs.sigmas, config.loss_type, config.huber_c, config.huber_schedule
    )
    if inputs.loss_weight is not None:
        loss = loss * inputs.loss_weight
    return loss.mean()


@hookimpl(trylast=True)
def save_adapter(adapter: Adapter, output_dir: Path) -> list[Path]:
    return adapter.save(output_dir)


class QuantizeDispatch:
    """Default ``quantize``: hand each target to the quantizer registered for its precision."""

    def __init__(self, quantizers: dict[str, type[Quantizer]]) -> None:
        self.quantizers = quantizers

    @hookimpl(trylast=True)
    def quantize(self, components: Components, config: CoreOptions, targets: list[QuantizeTarget]) -> None:
        for target in targets:
            quantizer = self.quantizers[target.precision](config)
            if target.component == TRANSFORMER:
                components.transformer = quantizer.quantize(components.transformer, target)
            elif target.component in components.text_encoders:  # not loaded when every caption is cached
                components.text_encoders[target.component] = quantizer.quantize(
                    components.text_encoders[target.component], target
                )


@hookimpl(trylast=True)
def on_validation_done(state: TrainState) -> None:
    """The report page shows every validation as soon as it is written."""
    from stune.report import write_report

    write_report(state.output_dir)


@hookimpl(trylast=True)
def on_train_end(output_dir: Path) -> None:
    from stune.report import write_report

    write_report(output_dir)
