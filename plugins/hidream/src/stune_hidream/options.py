"""HiDream-specific options (SimpleTuner's names where it has them)."""

from __future__ import annotations

from typing import Literal

from stune.options import Field, Options

LORA_TARGETS = ("attention", "attention+text", "attention+text+shared_experts", "attention+text+ffs")
DEFAULT_LLAMA = "unsloth/Meta-Llama-3.1-8B-Instruct"


class HiDreamOptions(Options):
    hidream_use_load_balancing_loss: bool = Field(
        False,
        description="Add the MoE gates' load-balancing loss (with gradient) to the training loss; it only moves "
        "the gates themselves under model_type=full, otherwise it trains the adapted layers that feed them.",
    )
    hidream_load_balancing_loss_weight: float = Field(
        0.01,
        ge=0,
        description="Weight of the load-balancing loss, applied once to the sum over the MoE layers "
        "(0.01 reproduces the gates' own alpha; 0.1–0.2 balances harder).",
    )
    hidream_lora_target: Literal[LORA_TARGETS] = Field(  # type: ignore[valid-type]
        "attention",
        description="PEFT LoRA targets: attention (image-stream to_q/k/v/out), attention+text (adds the text "
        "stream's *_t projections), attention+text+shared_experts, attention+text+ffs (adds the text "
        "feed-forward and the shared experts, like the quickstart's LoKr name map).",
    )
    pretrained_text_encoder_4_model_name_or_path: str | None = Field(
        None,
        description="Where text_encoder_4 and tokenizer_4 (Llama-3.1-8B-Instruct) come from: a folder or Hub id; "
        f"default: the base model's own text_encoder_4/ and tokenizer_4/ folders, else {DEFAULT_LLAMA}.",
    )
    hidream_text_padding: Literal["trim", "pipeline"] = Field(
        "trim",
        description="trim: cache only the real T5/Llama tokens and mask a batch's padding in attention (≈5× "
        "smaller cache); pipeline: cache the padded sequences HiDreamImagePipeline.encode_prompt gives, "
        "the exact inputs inference sees.",
    )
