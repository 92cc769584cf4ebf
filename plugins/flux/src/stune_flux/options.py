"""FLUX-specific options (SimpleTuner names)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from stune.options import Field, Options

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
MODULE_TYPES = ("all", "attention", "feedforward")
LORA_TARGETS = ("all", "context", "context+ffs", "all+ffs", "all+ffs+embedder", "ai-toolkit", "tiny", "nano")


class FluxOptions(Options):
    flux_lora_target: Literal[LORA_TARGETS] = Field(  # type: ignore[valid-type]
        "all", description="Which transformer layers get a LoRA (presets listed in docs/quickstart-flux.md)."
    )
    flux_guidance_value: float = Field(
        1.0, ge=0, description="Guidance embedding value while training (1.0 keeps dev's distillation)."
    )
    flux_guidance_mode: Literal["constant", "random-range"] = Field(
        "constant",
        description="constant: flux_guidance_value; random-range: U(flux_guidance_min, flux_guidance_max) per sample.",
    )
    flux_guidance_min: float = Field(0.0, ge=0, description="Lower bound of random-range guidance.")
    flux_guidance_max: float = Field(4.0, ge=0, description="Upper bound of random-range guidance.")
    flux_fast_schedule: bool = Field(
        False, description="schnell's schedule: σ drawn from [1.0 ×7, 0.75, 0.5, 0.25], no shift (on for schnell)."
    )
    flux_attention_masked_training: bool = Field(
        False, description="Mask T5 padding tokens in attention while training (LibreFlux needs it)."
    )
    t5_padding: Literal["unmodified", "zero"] = Field(
        "unmodified", description="zero: set the T5 embeddings of padding tokens to 0."
    )
    validation_guidance_real: float = Field(
        1.0,
        ge=0,
        description="Above 1: true classifier-free guidance with validation_negative_prompt in validation images "
        "(two forwards per step; validation_guidance stays the distilled guidance value).",
    )
    validation_no_cfg_until_timestep: int = Field(
        2, ge=0, description="With true CFG, the first N validation sampling steps run without it."
    )

    flux_lora_init: Literal[LORA_INITS] | None = Field(  # type: ignore[valid-type]
        None,
        description="FLUX name of lora_init_type (PEFT init_lora_weights): default, gaussian, pissa, olora, loftq.",
    )
    flux_lora_module_type: Literal[MODULE_TYPES] = Field(  # type: ignore[valid-type]
        "all",
        description="Which kind of module of the flux_lora_target preset gets a LoRA: all, attention (q/k/v/out "
        "projections of both streams) or feedforward (MLPs, proj_mlp/proj_out of single blocks).",
    )
    assistant_lora_path: str | None = Field(
        None,
        description="A frozen helper LoRA (diffusers/kohya file or Hub id) loaded into the base while training, "
        "e.g. ostris/FLUX.1-schnell-training-adapter for schnell; never saved with the trained LoRA.",
    )
    assistant_lora_strength: float = Field(1.0, description="Weight of the assistant LoRA while training.")
    assistant_lora_inference_strength: float = Field(
        0.0, description="Weight of the assistant LoRA in validation images (0: removed, as at inference)."
    )
    disable_assistant_lora: bool = Field(False, description="Do not load assistant_lora_path.")

    @model_validator(mode="after")
    def _guidance_range(self) -> FluxOptions:
        if self.flux_guidance_mode == "random-range" and self.flux_guidance_min > self.flux_guidance_max:
            raise ValueError("`flux_guidance_min` is above flux_guidance_max; swap them")
        return self
