"""stune-quant: quantized base models (optimum-quanto, torchao, bitsandbytes). This module only
registers; the backends are imported when a run quantizes."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import stune


@stune.hookimpl
def register_options(register: Any) -> None:
    from stune_quant.options import QuantOptions

    register(QuantOptions)


@stune.hookimpl
def register_quantizers(register: Any) -> None:
    from stune_quant import quiet
    from stune_quant.quantizers import BnbQuantizer, DtypePrecision, QuantoQuantizer, TorchaoQuantizer

    # Registration runs before any model code is imported: the last moment to quiet what importing
    # the backends logs (see stune_quant.quiet).
    quiet.install()
    for quantizer in (DtypePrecision, QuantoQuantizer, TorchaoQuantizer, BnbQuantizer):
        register(quantizer)


@stune.hookimpl
def check_config(config: Any) -> None:
    from stune_quant.checks import check_quant_options

    check_quant_options(config)


@stune.hookimpl(wrapper=True)
def load_model(config: Any, request: Any) -> Generator[None, Any, Any]:
    if getattr(config, "quantization_config", None) is not None:
        from stune_quant.checks import diffusers_quantization_config

        request.quantization["transformer"] = diffusers_quantization_config(config)
    components = yield
    if request.quantization:
        # Quantized while loading: the bf16 pages diffusers read stay resident as long as one
        # unquantized tensor (a norm, a bias) keeps the checkpoint mapped; hand them back.
        from stune_quant.hostmem import release_unused

        for key in request.quantization:
            module = components.transformer if key == "transformer" else components.text_encoders.get(key)
            if module is not None:
                release_unused(module)
    return components
