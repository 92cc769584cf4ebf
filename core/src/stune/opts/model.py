"""Which model is trained, and where it comes from."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from stune.options import Field, Options


class ModelOptions(Options):
    model_family: str | None = Field(None, description="Model family to train (e.g. flux); needs its plugin.")
    model_flavour: str | None = Field(None, description="Named variant of the family, mapped to a Hub repository.")
    pretrained_model_name_or_path: str | None = Field(
        None, description="Local diffusers folder or Hub id of the base pipeline (overrides model_flavour)."
    )
    pretrained_transformer_model_name_or_path: str | None = Field(
        None, description="Load only the transformer from this folder or Hub id."
    )
    pretrained_transformer_subfolder: str | None = Field(
        "transformer", description="Subfolder of the transformer repository; `none` for its root."
    )
    pretrained_vae_model_name_or_path: str | None = Field(None, description="Load the VAE from this folder or Hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16", description="Precision of the frozen base weights and autocast; adapters stay fp32."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute block activations in backward to save memory.")
    gradient_checkpointing_interval: int | None = Field(
        None, ge=1, description="Checkpoint only every N-th block (faster, more memory); default every block."
    )
    gradient_checkpointing_offload_attention: bool = Field(
        False,
        description="Move what attention layers save for backward to CPU memory (pinned on CUDA) until backward "
        "needs it; acts on blocks that keep their activations (gradient_checkpointing off, or between the blocks "
        "gradient_checkpointing_interval checkpoints).",
    )
    i_know_what_i_am_doing: bool = Field(
        False,
        description="Unlock limits a family documents (e.g. a longer T5 token length than the model was trained "
        "with); each unlocked limit is logged as a warning.",
    )
    base_model_default_dtype: Literal["bf16", "fp32"] | None = Field(
        None, description="dtype of the frozen base weights; default: bf16 under bf16 mixed precision, else fp32."
    )

    @model_validator(mode="after")
    def _offload_attention(self) -> ModelOptions:
        if self.gradient_checkpointing_offload_attention and getattr(self, "fsdp_activation_checkpointing", False):
            raise ValueError(
                "`gradient_checkpointing_offload_attention` does not combine with fsdp_activation_checkpointing "
                "(FSDP recomputes every block, so nothing is kept to offload); turn one off"
            )
        return self

    @model_validator(mode="after")
    def _subfolder_none(self) -> ModelOptions:
        sub = self.pretrained_transformer_subfolder
        if sub is not None and sub.lower() in ("none", ""):
            self.pretrained_transformer_subfolder = None
        return self
