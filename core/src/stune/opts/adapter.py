"""What is trained: a PEFT LoRA, a LyCORIS network, or the whole transformer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.options import Field, Options, json_list

LORA_INIT_TYPES = ("default", "gaussian", "pissa", "olora", "loftq")


class AdapterOptions(Options):
    model_type: Literal["lora", "full"] = Field(
        "lora", description="lora: train an adapter (PEFT or LyCORIS); full: fine-tune the whole transformer."
    )
    lora_type: Literal["standard", "lycoris"] = Field(
        "standard", description="standard: PEFT LoRA; lycoris: a LyCORIS network from lycoris_config."
    )
    lora_rank: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to the rank (scale 1).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path (PEFT).")
    lora_init_type: Literal[LORA_INIT_TYPES] = Field(  # type: ignore[valid-type]
        "default",
        description="PEFT initialisation: default, gaussian, pissa, olora, loftq (needs CUDA + bitsandbytes).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA) with PEFT.")
    peft_lora_target_modules: list[str] | None = Field(
        None, description="Module names for LoRA (JSON list); overrides the family's target preset."
    )
    init_lora: str | None = Field(
        None, description="Start from an existing adapter file (same kind and shape as the one trained)."
    )
    init_lora_step: int | None = Field(
        None,
        ge=0,
        description="With init_lora: continue from this step (the step count, learning-rate schedule and EMA warmup "
        "go on from it; the optimizer and data order start fresh). A resumed checkpoint's own step wins.",
    )
    init_lora_ema: str | None = Field(
        None,
        description="With init_lora and use_ema: an adapter file (e.g. the previous run's ema/ export) whose weights "
        "start the EMA copy, instead of the init_lora weights.",
    )
    lycoris_config: str = Field(
        "config/lycoris_config.json", description="LyCORIS settings (JSON) for lora_type=lycoris."
    )
    lora_format: Literal["diffusers", "comfyui"] = Field(
        "diffusers",
        description="PEFT LoRA file layout. diffusers: lora_A/lora_B keys, the alpha/rank scale folded into "
        "lora_B (loads at the trained strength in diffusers and ComfyUI); comfyui: kohya lora_down/lora_up keys "
        "with a per-module .alpha (weights as trained).",
    )
    init_lokr_norm: float | None = Field(
        None, gt=0, description="Re-initialise LoKr: w1 = 1, w2 ~ N(0, (this × the layer's weight std)²)."
    )

    @field_validator("peft_lora_target_modules", mode="before")
    @classmethod
    def _target_list(cls, value: Any) -> Any:
        return json_list(value)

    @model_validator(mode="after")
    def _combinations(self) -> AdapterOptions:
        if self.model_type == "full" and self.lora_type == "lycoris" and "lora_type" in self.model_fields_set:
            raise ValueError("`lora_type` lycoris needs model_type=lora; model_type=full trains the whole transformer")
        if self.init_lokr_norm is not None and self.lora_type != "lycoris":
            raise ValueError("`init_lokr_norm` applies to LyCORIS LoKr; set lora_type=lycoris or remove it")
        if self.lora_format == "comfyui" and (self.model_type == "full" or self.use_dora):
            what = "model_type full" if self.model_type == "full" else "use_dora"
            raise ValueError(f"`lora_format` comfyui holds plain LoRA weights, not {what}; use lora_format diffusers")
        if self.use_dora and self.lora_type == "lycoris":
            raise ValueError("`use_dora` is for PEFT LoRA; for LyCORIS put dora_wd in lycoris_config")
        for name in ("init_lora_step", "init_lora_ema"):
            if getattr(self, name) is not None and not self.init_lora:
                raise ValueError(f"`{name}` continues an init_lora run; set init_lora (the adapter file) or remove it")
        if self.init_lora_ema is not None and getattr(self, "use_ema", True) is False:
            raise ValueError("`init_lora_ema` starts the EMA copy; set use_ema=true or remove it")
        return self

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)
