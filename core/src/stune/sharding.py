"""Sharded training from the config: FSDP and DeepSpeed.

* ``fsdp_version: 2`` (preferred): torch's ``fully_shard`` applied here to each sharded unit — the
  block classes of the family's token layout by default — then to the whole transformer. It runs
  wherever torch.distributed does, the CPU (gloo) included. accelerate is left out of it: accelerate
  1.15 turns FSDP on only for GPU-type process groups.
* ``fsdp_version: 1`` and ``deepspeed_config`` go through accelerate's plugins (CUDA GPUs).

Checkpoints stay loadable anywhere: the adapter is gathered whole before it is written (every
process takes part, rank 0 writes), and the optimizer state is written either gathered
(``FULL_STATE_DICT``, into training_state.pt) or one shard per process with
torch.distributed.checkpoint (``SHARDED_STATE_DICT``, folder ``optimizer/``). Both are keyed by
parameter name, so a sharded checkpoint resumes under FSDP with any number of processes and in a
single process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.layout import TokenLayout

log = logging.getLogger("stune.sharding")
OPTIMIZER_FOLDER = "optimizer"
#: how a checkpoint's optimizer state was written (``training_state.pt`` key ``optimizer_format``)
PLAIN, BY_NAME, SHARDED, DEEPSPEED = "plain", "by-name", "sharded", "deepspeed"
DEEPSPEED_FOLDER = "deepspeed"


def fsdp2(config: CoreOptions) -> bool:
    return config.fsdp_enable and config.fsdp_version == 2


def accelerate_plugins(config: CoreOptions, layout_classes: list[str]) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator``: the FSDP 1 or DeepSpeed plugin when asked for."""
    if config.fsdp_enable and config.fsdp_version == 1:
        from accelerate.utils import FullyShardedDataParallelPlugin

        policy = {"TRANSFORMER_BASED_WRAP": "transformer_based_wrap", "SIZE_BASED_WRAP": "size_based_wrap"}
        return {
            "fsdp_plugin": FullyShardedDataParallelPlugin(
                fsdp_version=1,
                reshard_after_forward="FULL_SHARD" if config.fsdp_reshard_after_forward else "SHARD_GRAD_OP",
                auto_wrap_policy=policy.get(config.fsdp_auto_wrap_policy, "no_wrap"),  # type: ignore[arg-type]
                transformer_cls_names_to_wrap=wrap_classes(config, layout_classes),
                min_num_params=config.fsdp_min_num_params,
                cpu_offload=config.fsdp_cpu_offload,
                state_dict_type=config.fsdp_state_dict_type,
                cpu_ram_efficient_loading=config.fsdp_cpu_ram_efficient_loading,
                activation_checkpointing=config.fsdp_activation_checkpointing,
                limit_all_gathers=config.fsdp_limit_all_gathers,
                use_orig_params=True,  # frozen and trained weights share flat parameters
                sync_module_states=config.fsdp_cpu_ram_efficient_loading,
            )
        }
    settings = config.deepspeed_settings
    if settings is not None:
        from accelerate.utils import DeepSpeedPlugin

        settings = dict(settings)
        # Batches are built here, not by a prepared DataLoader: DeepSpeed's "auto" sizes come from the config.
        settings.setdefault("train_micro_batch_size_per_gpu", config.train_batch_size)
        if settings["train_micro_batch_size_per_gpu"] == "auto":
            settings["train_micro_batch_size_per_gpu"] = config.train_batch_size
        if settings.get("gradient_accumulation_steps", "auto") == "auto":
            settings["gradient_accumulation_steps"] = config.gradient_accumulation_steps
        if settings.get("gradient_clipping", "auto") == "auto":  # accelerate would fill "auto" with 1.0
            settings["gradient_clipping"] = config.max_grad_norm if config.max_grad_norm > 0 else 0.0
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=settings)}
    return {}


def layout_block_classes(transformer: torch.nn.Module | None, layout: TokenLayout | None) -> list[str]:
    if transformer is None or layout is None:
        return []
    return sorted({type(block).__name__ for _, _, block in layout.blocks(transformer)})


def wrap_classes(config: CoreOptions, layout_classes: list[str]) -> list[str]:
    classes = config.fsdp_transformer_layer_cls_to_wrap or layout_classes
    if config.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP" and not classes:
        raise ConfigError(
            "fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP needs block classes: set fsdp_transformer_layer_cls_to_wrap "
            "(the family declares no token layout to take them from)."
        )
    return classes


def shard(transformer: torch.nn.Module, layout: TokenLayout | None, config: CoreOptions) -> int:
    """FSDP 2: ``fully_shard`` each unit, then the transformer; returns the number of units. Frozen
    weights keep their precision and trained ones fp32 within a unit (FSDP2 gathers mixed dtypes);
    compute precision is the run's autocast, as without FSDP."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": config.fsdp_reshard_after_forward}
    if config.fsdp_cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    units = _units(transformer, layout, config)
    rank = dist.get_rank()
    efficient = config.fsdp_cpu_ram_efficient_loading
    if efficient:
        # Only rank 0 keeps its weights; the others drop theirs before sharding and receive their
        # shards from it. Buffers outside the state dict (computed at load) are kept by every rank.
        full = transformer.state_dict() if rank == 0 else {}
        persistent = set(transformer.state_dict())
        buffers = {n: b.clone() for n, b in transformer.named_buffers() if n not in persistent}
        if rank > 0:
            transformer.to("meta")
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(transformer, **options)
    if efficient:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if rank > 0:
            transformer.to_empty(
                device=torch.device(device, torch.cuda.current_device()) if device == "cuda" else device
            )
            with torch.no_grad():
                for name, value in transformer.named_buffers():
                    if name in buffers:
                        value.copy_(buffers[name])
        options_ = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(transformer, full, options=options_)
    log.info("FSDP2: %d sharded units over %d processes", len(units), dist.get_world_size())
    return len(units)


def _units(transformer: torch.nn.Module, layout: TokenLayout | None, config: CoreOptions) -> list[torch.nn.Module]:
    policy = config.fsdp_auto_wrap_policy
    if policy == "NO_WRAP":
        return []
    if policy == "SIZE_BASED_WRAP":
        # Bottom-up, as torch's size-based policy: a module is a unit when the weights not already in a
        # smaller unit reach the threshold (containers without a forward never are).
        chosen: list[torch.nn.Module] = []
        taken: set[int] = set()
        for module in _post_order(transformer):
            if module is transformer or isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
                continue
            free = [p for p in module.parameters() if id(p) not in taken]
            if sum(p.numel() for p in free) >= config.fsdp_min_num_params:
                chosen.append(module)
                taken.update(id(p) for p in free)
        return chosen
    classes = set(wrap_classes(config, layout_block_classes(transformer, layout)))
    units = [m for m in transformer.modules() if type(m).__name__ in classes]
    if not units:
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap {sorted(classes)} names no module of {type(transformer).__name__}; "
            "use its block class names."
        )
    return units


def _post_order(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight gathered whole on the CPU (all processes call this; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, torch.Tensor] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # type: ignore[assignment]
    return state


def save_optimizer(model: torch.nn.Module, optimizer: Any, folder: Path, config: CoreOptions) -> tuple[str, Any]:
    """(format, what goes into training_state.pt) for the optimizer; all processes call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if config.deepspeed_config:
        # The engine keeps its (ZeRO-partitioned) optimizer; it writes and reads its own files.
        engine: Any = model
        engine.save_checkpoint(str(folder / DEEPSPEED_FOLDER), exclude_frozen_parameters=True)
        return DEEPSPEED, None
    if config.fsdp_state_dict_type == "SHARDED_STATE_DICT":
        import torch.distributed.checkpoint as dcp

        state = get_optimizer_state_dict(model, optimizer)
        save: Any = dcp.save  # type: ignore[attr-defined]
        save({"optimizer": state}, checkpoint_id=str(folder / OPTIMIZER_FOLDER))
        return SHARDED, None
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return BY_NAME, state


def load_optimizer(model: torch.nn.Module, optimizer: Any, folder: Path, fmt: str, saved: Any) -> None:
    """Restore an optimizer state written by :func:`save_optimizer` (FSDP or one process)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if fmt == DEEPSPEED:
        if not hasattr(model, "load_checkpoint"):
            raise ConfigError(
                f"The checkpoint {folder} holds a DeepSpeed optimizer state; resume it with the same deepspeed_config."
            )
        engine: Any = model
        engine.load_checkpoint(str(folder / DEEPSPEED_FOLDER), load_module_strict=False, load_lr_scheduler_states=False)
        return
    if fmt == SHARDED:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        _materialise(optimizer)
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        distributed = dist.is_available() and dist.is_initialized()
        dcp.load(  # type: ignore[attr-defined]
            state, checkpoint_id=str(folder / OPTIMIZER_FOLDER), no_dist=not distributed
        )
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
        return
    if fmt == PLAIN:  # a one-process checkpoint: its parameters are numbered in the order they are trained
        names = [name for name, param in model.named_parameters() if param.requires_grad]
        saved = {
            "state": {names[int(i)]: value for i, value in saved["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
        }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))


def _materialise(optimizer: Any) -> None:
    """A fresh optimizer has no state tensors to load into; one zero-gradient step creates them
    with the right shapes (and is then overwritten by the loaded state)."""
    if any(optimizer.state.values()):
        return
    lrs = []
    for group in optimizer.param_groups:
        lrs.append(group["lr"])
        group["lr"] = 0.0
        for param in group["params"]:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def check_sharding(config: CoreOptions) -> None:
    """What FSDP and DeepSpeed need from the run and this machine."""
    if config.deepspeed_config:
        import importlib.util

        try:
            settings = config.deepspeed_settings
        except ValueError as exc:
            raise ConfigError(f"deepspeed_config: {exc}.") from None
        if settings is not None and "zero_optimization" not in settings:  # accelerate's plugin refuses it later
            raise ConfigError(
                'deepspeed_config has no "zero_optimization" section; add one, e.g. {"zero_optimization": {"stage": 2}}.'
            )
        # CUDA first: installing deepspeed would not make it run on a machine without GPUs.
        if not torch.cuda.is_available():
            raise ConfigError("deepspeed_config needs CUDA GPUs, which this machine lacks; use fsdp_enable instead.")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed_config needs the deepspeed package; install it (`pip install deepspeed`).")
    if not config.fsdp_enable:
        return
    if config.fsdp_version == 1 and not torch.cuda.is_available():
        raise ConfigError(
            "fsdp_version 1 runs through accelerate on CUDA GPUs only, which this machine lacks; use fsdp_version 2."
        )
    if config.fsdp_cpu_offload and not torch.cuda.is_available():
        raise ConfigError("fsdp_cpu_offload moves shards off a GPU, and this machine has none; turn it off.")
    if config.lora_type == "lycoris" and config.model_type == "lora":
        raise ConfigError(
            "LyCORIS networks are not saved from FSDP shards; use a PEFT LoRA (lora_type standard) with FSDP."
        )
    if config.use_ema:
        raise ConfigError("use_ema keeps whole copies of the trained weights, which FSDP shards; turn one of them off.")
    if config.fuse_qkv_projections:
        raise ConfigError("fuse_qkv_projections changes the layers FSDP shards; turn one of them off.")
