"""What is trained: a PEFT LoRA on the transformer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from stune.options import Field, Options, json_list


class AdapterOptions(Options):
    model_type: Literal["lora"] = Field("lora", description="What is trained: a LoRA adapter on the transformer.")
    lora_type: Literal["standard"] = Field("standard", description="`standard` = PEFT LoRA.")
    lora_rank: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to the rank (scale 1).")
    peft_lora_target_modules: list[str] | None = Field(
        None, description="Module names for LoRA (JSON list); overrides the family's target preset."
    )

    @field_validator("peft_lora_target_modules", mode="before")
    @classmethod
    def _target_list(cls, value: Any) -> Any:
        return json_list(value)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)
