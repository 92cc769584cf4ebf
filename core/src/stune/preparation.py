"""Getting the loaded transformer ready for training, in the order the memory and speed options
need: kernels and layer shapes first, then where the weights live, the adapter, activation
checkpointing; after the features have installed themselves, sharding and compilation.

:func:`prepare_transformer` runs before features bind and routers install their hooks;
:func:`finish_transformer` after, and before the optimizer is built (FSDP replaces the parameters
it shards).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from stune import optim
from stune.adapters import Adapter, create_adapter
from stune.attention import apply_attention
from stune.errors import UserError
from stune.memory import enable_gradient_checkpointing
from stune.offload import block_swap, group_offload, move_trainable, place_for_swap, swapped_blocks
from stune.sharding import fsdp2, layout_block_classes, shard, wrap_classes
from stune.speed import chunk_feed_forward, compile_transformer, fuse_projections

if TYPE_CHECKING:
    from stune.run import Run

log = logging.getLogger("stune.train")


def prepare_transformer(run: Run) -> tuple[torch.nn.Module, Adapter]:
    config, family, device = run.session.config, run.session.family, run.accelerator.device
    assert run.components is not None
    moving = config.enable_group_offload or config.musubi_blocks_to_swap or config.fuse_optimizer
    if run.processes.world > 1 and moving:
        # num_processes is checked with the options; a torchrun/accelerate launch shows only here.
        raise UserError(
            "enable_group_offload, musubi_blocks_to_swap and fuse_optimizer work in one process only; "
            "launch a single process or turn them off."
        )
    transformer: torch.nn.Module = run.components.transformer
    layout = family.token_layout()
    apply_attention(transformer, config)
    if config.fuse_qkv_projections:
        fuse_projections(transformer)
    if config.enable_chunked_feed_forward:
        chunk_feed_forward(transformer, config.feed_forward_chunk_size)

    swapped: list[torch.nn.Module] = []
    swap_device = torch.device(config.musubi_block_swap_device)
    if config.enable_group_offload:
        # Before the adapter: diffusers' disk and stream copies must hold the frozen weights only.
        run.residency = group_offload(transformer, layout, device, config)
    elif config.musubi_blocks_to_swap:
        swapped = swapped_blocks(transformer, layout, config.musubi_blocks_to_swap)
        place_for_swap(transformer, swapped, device, swap_device)
    elif not (fsdp2(config) and run.processes.world > 1):  # fully_shard moves each process's shards itself
        transformer.to(device)

    adapter = create_adapter(transformer, family, config, optim.trainable_dtype(config))
    if config.enable_group_offload:
        move_trainable(adapter.parameters(), device)
    if swapped:
        run.residency = block_swap(transformer, swapped, device, swap_device, full=config.model_type == "full")
        log.info("block swap: the last %d blocks live on %s", len(swapped), swap_device)
    fsdp_checkpointing = config.fsdp_enable and config.fsdp_activation_checkpointing
    if fsdp_checkpointing and config.fsdp_version == 2:
        # FSDP's activation checkpointing is the recompute of each sharded block: the blocks' own.
        enable_gradient_checkpointing(transformer, None)
    elif config.gradient_checkpointing and not fsdp_checkpointing:
        recompute = run.residency.recomputing if run.residency is not None else None
        enable_gradient_checkpointing(transformer, config.gradient_checkpointing_interval, recompute)
    if config.gradient_checkpointing_offload_attention:
        from stune.memory import offload_attention

        covered = offload_attention(transformer, pin_memory=device.type == "cuda")
        log.info("gradient_checkpointing_offload_attention: %d attention modules save to CPU memory", covered)
    return transformer, adapter


def finish_transformer(run: Run, transformer: torch.nn.Module, adapter: Adapter) -> None:
    config, family = run.session.config, run.session.family
    layout = family.token_layout()
    if fsdp2(config) and run.processes.world > 1:
        if run.resume_from is not None:
            adapter.load(run.resume_from)  # whole weights into whole modules, before they are sharded
        shard(transformer, layout, config)
        run.sharded = "fsdp2"
    elif run.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        run.sharded = "engine"
        plugin = getattr(run.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and not plugin.transformer_cls_names_to_wrap:  # accelerate reads it in prepare()
            plugin.transformer_cls_names_to_wrap = wrap_classes(config, layout_block_classes(transformer, layout))
    if config.dynamo_backend != "no":
        moving = run.residency.by_module() if run.residency is not None else {}
        compile_transformer(transformer, layout, config, skip=moving)
