"""Fitting a big model on a small accelerator: attention kernels, offloading, VAE and text-encoder
placement, the fused backward pass, and the speed options that trade memory (compiled training,
fused projections, chunked feed-forward).

Mechanisms live in :mod:`stune.attention`, :mod:`stune.offload`, :mod:`stune.fused` and
:mod:`stune.speed`; the cross-option rules that need nothing from the machine are here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from stune.options import AliasChoices, Field, Options

#: SimpleTuner's ``attention_mechanism`` names → diffusers' attention-backend names (``None``: leave the
#: model's own processors alone).
ATTENTION_BACKENDS: dict[str, str | None] = {
    "diffusers": None,
    "native": "native",
    "sdpa": "native",
    "native-math": "_native_math",
    "native-flash": "_native_flash",
    "native-efficient": "_native_efficient",
    "native-cudnn": "_native_cudnn",
    "cudnn": "_native_cudnn",
    "flex": "flex",
    "flash-attn": "flash",
    "flash-attn-2": "flash",
    "flash-attn-varlen": "flash_varlen",
    "flash-attn-3": "_flash_3",
    "flash-attn-3-varlen": "_flash_varlen_3",
    "flash-attn-hub": "flash_hub",
    "flash-attn-3-hub": "_flash_3_hub",
    "sageattention": "sage",
    "sageattention-varlen": "sage_varlen",
    "sageattention-int8-fp16-triton": "_sage_qk_int8_pv_fp16_triton",
    "sageattention-int8-fp16-cuda": "_sage_qk_int8_pv_fp16_cuda",
    "sageattention-int8-fp8-cuda": "_sage_qk_int8_pv_fp8_cuda",
    "sageattention-hub": "sage_hub",
    "xformers": "xformers",
}
DYNAMO_BACKENDS = ("no", "inductor", "eager", "aot_eager", "cudagraphs")


class MemoryOptions(Options):
    # -- attention --------------------------------------------------------------------------------
    attention_mechanism: Literal[tuple(ATTENTION_BACKENDS)] = Field(  # type: ignore[valid-type]
        "diffusers",
        description="Attention kernel through diffusers' attention backends: diffusers (the model's own), "
        "native/sdpa, native-math/-flash/-efficient/-cudnn, flex, flash-attn(-2/-3/-varlen/-hub), "
        "sageattention(-varlen/-int8-…/-hub), xformers.",
    )
    sageattention_usage: Literal["inference", "training", "training+inference"] = Field(
        "inference",
        description="Where a sageattention mechanism runs: validation images only (its kernels have no backward "
        "pass), or the training forward too.",
    )
    # -- offloading ---------------------------------------------------------------------------------
    enable_group_offload: bool = Field(
        False,
        description="diffusers group offloading of the transformer: groups of blocks live on the CPU "
        "(or disk) and are moved in for their forward and backward.",
    )
    group_offload_type: Literal["block_level", "leaf_level"] = Field(
        "block_level", description="block_level: groups of transformer blocks; leaf_level: every layer on its own."
    )
    group_offload_blocks_per_group: int = Field(1, ge=1, description="Blocks per offload group (block_level).")
    group_offload_use_stream: bool = Field(
        False, description="Overlap transfers with compute on a CUDA stream (CUDA only; needs leaf_level here)."
    )
    group_offload_to_disk_path: str | None = Field(
        None, description="Spill the offloaded frozen weights to files in this folder instead of CPU memory."
    )
    enable_model_cpu_offload: bool = Field(
        False,
        description="Keep the text encoders and the VAE on the CPU and move each onto the accelerator only while "
        "it encodes or decodes.",
    )
    musubi_blocks_to_swap: int = Field(
        0,
        ge=0,
        description="Block swap: the last N transformer blocks live on musubi_block_swap_device and are "
        "moved in for their forward and backward.",
    )
    musubi_block_swap_device: str = Field("cpu", description="Where swapped blocks live between uses.")
    offload_during_save: bool = Field(
        False, description="Move the transformer off the accelerator while a checkpoint is written."
    )
    # -- VAE and text encoders ------------------------------------------------------------------------
    vae_enable_tiling: bool = Field(False, description="Encode and decode large images tile by tile (less memory).")
    vae_enable_slicing: bool = Field(False, description="Encode and decode a batch one image at a time.")
    vae_dtype: Literal["default", "fp32", "bf16", "fp16"] = Field(
        "default", description="Precision of the VAE; default: the base weights' precision (changes cached latents)."
    )
    keep_vae_loaded: bool = Field(
        False, description="Keep the VAE on the accelerator after caching (faster validation, more memory)."
    )
    fully_unload_text_encoder: bool = Field(
        True,
        description="Delete the text encoders once every caption is cached; false keeps them in CPU memory "
        "(for plugins that encode later).",
    )
    # -- optimizer memory ---------------------------------------------------------------------------
    fuse_optimizer: bool = Field(
        False,
        validation_alias=AliasChoices("fuse_optimizer", "optimizer_release_gradients"),
        description="Fused backward pass (alias optimizer_release_gradients): each parameter is stepped inside "
        "its gradient hook and its gradient freed at once; needs gradient_accumulation_steps 1.",
    )
    optimizer_cpu_offload_method: Literal["none", "torchao"] = Field(
        "none", description="torchao: keep the optimizer state (and its step) on the CPU (CUDA only)."
    )
    optimizer_offload_gradients: bool = Field(
        False, description="With optimizer_cpu_offload_method torchao, move the gradients to the CPU as they come."
    )
    set_grads_to_none: bool = Field(
        True, description="Free gradients after each step (false: keep their buffers and zero them)."
    )
    # -- speed ----------------------------------------------------------------------------------------
    fuse_qkv_projections: bool = Field(
        False, description="One matmul for query, key and value (PEFT LoRA only; the LoRA is saved unfused)."
    )
    enable_chunked_feed_forward: bool = Field(
        False, description="Run the feed-forward layers on chunks of tokens (smaller activation peaks)."
    )
    feed_forward_chunk_size: int = Field(1024, ge=1, description="Tokens per feed-forward chunk.")
    disable_tf32: bool = Field(
        False, description="Full fp32 matmuls on CUDA (TF32 is on by default, as in SimpleTuner)."
    )
    torch_num_threads: int | None = Field(None, ge=1, description="CPU threads torch uses; default: torch's own.")
    dynamo_backend: Literal[DYNAMO_BACKENDS] = Field(  # type: ignore[valid-type]
        "no", description="torch.compile the transformer for training with this backend (inductor); no: eager."
    )
    dynamo_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode."
    )
    dynamo_fullgraph: bool = Field(False, description="Compile without graph breaks (fails where there are some).")
    dynamo_dynamic: bool = Field(
        False, description="Compile for dynamic shapes (fewer recompiles across aspect buckets)."
    )
    dynamo_use_regional_compilation: bool = Field(
        True, description="Compile each transformer block once instead of the whole model (much faster to compile)."
    )

    @model_validator(mode="after")
    def _memory_combinations(self) -> MemoryOptions:
        offloads = [
            name
            for name, on in (
                ("enable_group_offload", self.enable_group_offload),
                ("musubi_blocks_to_swap", self.musubi_blocks_to_swap > 0),
            )
            if on
        ]
        if self.enable_group_offload and self.enable_model_cpu_offload:
            raise ValueError("`enable_group_offload` and enable_model_cpu_offload are incompatible; keep one of them")
        if len(offloads) > 1:
            raise ValueError("`enable_group_offload` and musubi_blocks_to_swap both move blocks; keep one of them")
        if not self.enable_group_offload:
            for key in ("group_offload_use_stream", "group_offload_to_disk_path"):
                if key in self.model_fields_set and getattr(self, key):
                    raise ValueError(f"`{key}` needs enable_group_offload=true")
        if self.optimizer_offload_gradients and self.optimizer_cpu_offload_method == "none":
            raise ValueError("`optimizer_offload_gradients` needs optimizer_cpu_offload_method=torchao")
        if self.fuse_optimizer and self.optimizer_cpu_offload_method != "none":
            raise ValueError("`fuse_optimizer` and optimizer_cpu_offload_method both step the optimizer; keep one")
        return self
