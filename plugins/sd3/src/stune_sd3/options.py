"""SD3-specific options (SimpleTuner names, plus ``sd3_lora_target``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.options import Field, Options, json_list

LORA_TARGETS = ("attention", "attention+context", "attention+ffs", "attention+context+ffs")
UNCOND = Literal["empty_string", "zero"]


class SD3Options(Options):
    sd3_lora_target: Literal[LORA_TARGETS] = Field(  # type: ignore[valid-type]
        "attention",
        description="Which transformer layers get a LoRA: attention (to_q/to_k/to_v/to_out.0, SimpleTuner's "
        "default), attention+context (adds the text-stream projections), attention+ffs (adds the feed-forwards), "
        "attention+context+ffs.",
    )
    t5_padding: Literal["unmodified", "zero"] = Field(
        "unmodified", description="zero: set the T5 embeddings of padding tokens to 0."
    )
    sd3_clip_uncond_behaviour: UNCOND = Field(
        "empty_string",
        description="What a dropped caption trains on for the CLIP part (and the pooled embedding): "
        'empty_string (the encoding of "") or zero (zeros).',
    )
    sd3_t5_uncond_behaviour: UNCOND | None = Field(
        None,
        description="Same for the T5 part: empty_string or zero; default: the value of sd3_clip_uncond_behaviour.",
    )
    validation_guidance_skip_layers: list[int] | None = Field(
        None,
        description="Skip-layer guidance in validation images: transformer blocks skipped in the extra forward "
        "(JSON list, e.g. [7, 8, 9] for SD3.5 Medium); needs validation_guidance above 1.",
    )
    validation_guidance_skip_layers_start: float = Field(
        0.01, ge=0, le=1, description="Skip-layer guidance starts after this fraction of the sampling steps."
    )
    validation_guidance_skip_layers_stop: float = Field(
        0.2, ge=0, le=1, description="Skip-layer guidance stops before this fraction of the sampling steps."
    )
    validation_guidance_skip_scale: float = Field(
        2.8, ge=0, description="Scale of skip-layer guidance (double it for every layer skipped beyond three)."
    )

    @field_validator("validation_guidance_skip_layers", mode="before")
    @classmethod
    def _layer_list(cls, value: Any) -> Any:
        return json_list(value)

    @model_validator(mode="after")
    def _skip_layer_window(self) -> SD3Options:
        if self.validation_guidance_skip_layers is not None:
            if any(layer < 0 for layer in self.validation_guidance_skip_layers):
                raise ValueError("`validation_guidance_skip_layers` holds block indices, which start at 0")
            if self.validation_guidance_skip_layers_start >= self.validation_guidance_skip_layers_stop:
                raise ValueError(
                    "`validation_guidance_skip_layers_start` is not below validation_guidance_skip_layers_stop; "
                    "skip-layer guidance would never run"
                )
        return self

    @property
    def t5_uncond_behaviour(self) -> str:
        return self.sd3_t5_uncond_behaviour or self.sd3_clip_uncond_behaviour
