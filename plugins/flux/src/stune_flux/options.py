"""FLUX-specific options (SimpleTuner names)."""

from __future__ import annotations

from typing import Literal

from stune.options import Field, Options

LORA_TARGETS = ("all", "context", "context+ffs", "all+ffs", "all+ffs+embedder", "ai-toolkit", "tiny", "nano")


class FluxOptions(Options):
    flux_lora_target: Literal[LORA_TARGETS] = Field(  # type: ignore[valid-type]
        "all", description="Which transformer layers get a LoRA (presets listed in docs/quickstart-flux.md)."
    )
    flux_guidance_value: float = Field(
        1.0, ge=0, description="Guidance embedding value while training (1.0 keeps dev's distillation)."
    )
    flux_attention_masked_training: bool = Field(
        False, description="Mask T5 padding tokens in attention while training (LibreFlux needs it)."
    )
    t5_padding: Literal["unmodified", "zero"] = Field(
        "unmodified", description="zero: set the T5 embeddings of padding tokens to 0."
    )
