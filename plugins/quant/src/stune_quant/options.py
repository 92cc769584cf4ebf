"""The options stune-quant owns (SimpleTuner's keys and values). Importing this stays torch-free."""

from __future__ import annotations

from typing import Any, Literal

from stune.options import Field, Options

_PRECISIONS = (
    "no_change, bf16, fp16, fp32, int8-quanto, int4-quanto, int2-quanto, fp8-quanto, fp8uz-quanto, int8-torchao, "
    "int4-torchao, fp8-torchao, fp8wo-torchao, int8dq-torchao, nf4-bnb"
)


def _encoder(n: int) -> Any:
    return Field(
        "no_change",
        description=f"Precision of the family's text encoder {n} while captions are cached (same values as "
        "base_model_precision); the encoders are dropped once every caption is cached.",
    )


class QuantOptions(Options):
    # Plain `str`, not a Literal: the valid values are the precisions the installed quantizers register.
    base_model_precision: str = Field(
        "no_change", description=f"Precision of the frozen base transformer: {_PRECISIONS}."
    )
    text_encoder_1_precision: str = _encoder(1)
    text_encoder_2_precision: str = _encoder(2)
    text_encoder_3_precision: str = _encoder(3)
    text_encoder_4_precision: str = _encoder(4)
    quantize_via: Literal["cpu", "accelerator", "pipeline"] = Field(
        "accelerator",
        description="Where the base is quantized: `accelerator` (block by block on the GPU, kept there), `cpu` "
        "(block by block in host memory; use it on cards of 16 GB or less) or `pipeline` (while loading, through "
        "diffusers' quantization config where the backend has one: torchao, nf4-bnb).",
    )
    quantization_config: dict[str, Any] | str | None = Field(
        None,
        description="A diffusers quantization config for the transformer (a JSON object, or the path of a JSON "
        "file), used while loading instead of base_model_precision; LoRA/LyCORIS only.",
    )
