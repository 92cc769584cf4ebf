"""Keeping modules off the accelerator until they are used.

* :class:`Placement` moves the text encoders, the VAE and (``offload_during_save``) the transformer
  between the accelerator and the CPU at the run's phase boundaries — caching, validation, saving —
  and records every move in :attr:`Placement.events` (``enable_model_cpu_offload``,
  ``offload_during_startup``, ``keep_vae_loaded``, ``fully_unload_text_encoder``).
* Training with transformer blocks that live elsewhere between uses: diffusers' group offloading
  (``enable_group_offload``) or block swap (``musubi_blocks_to_swap``: the last N blocks of the
  family's token layout live on ``musubi_block_swap_device``). Both move a block in for its forward;
  :class:`Residency` adds what training needs on top: the block is moved in again when its
  backward starts (a backward pre-hook) and after gradient checkpointing recomputed it, and out
  once the backward has moved on to the block before it, so autograd never meets a weight that
  left the device.

diffusers' group offloading restores offloaded weights from copies taken once (disk files, pinned
CUDA-stream copies); it is therefore applied *before* the adapter is added, so those copies hold
only the frozen base weights, and never to a full fine-tune in those modes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import Components
    from stune.layout import TokenLayout

log = logging.getLogger("stune.offload")
ON, OFF = "on", "off"


# -- whole modules at phase boundaries ----------------------------------------------------------------


class Placement:
    """Moves whole modules between the accelerator (``device``) and the CPU; ``events`` records
    (module name, ``on``/``off``, why) for every decision, also when both are the CPU."""

    def __init__(self, device: torch.device, config: CoreOptions) -> None:
        self.device = device
        self.config = config
        self.events: list[tuple[str, str, str]] = []

    def on(self, name: str, module: Any, why: str) -> None:
        self._move(name, module, self.device, ON, why)

    def off(self, name: str, module: Any, why: str) -> None:
        self._move(name, module, torch.device("cpu"), OFF, why)

    def _move(self, name: str, module: Any, device: torch.device, state: str, why: str) -> None:
        if module is None:
            return
        module.to(device)
        self.events.append((name, state, why))

    @contextlib.contextmanager
    def using(self, modules: dict[str, Any], why: str) -> Iterator[None]:
        """With ``enable_model_cpu_offload``: the modules on the accelerator for the block, off after it."""
        if not self.config.enable_model_cpu_offload:
            yield
            return
        for name, module in modules.items():
            self.on(name, module, why)
        try:
            yield
        finally:
            for name, module in modules.items():
                self.off(name, module, why)

    def vae_dtype(self) -> torch.dtype | None:
        names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return names.get(self.config.vae_dtype)

    def after_load(self, components: Components) -> None:
        """The VAE's precision and tiling/slicing, as configured."""
        vae = components.vae
        if vae is None:
            return
        dtype = self.vae_dtype()
        if dtype is not None and _dtype(vae) != dtype:
            vae.to(dtype=dtype)
        for option, method in (("vae_enable_tiling", "enable_tiling"), ("vae_enable_slicing", "enable_slicing")):
            if getattr(self.config, option):
                if not hasattr(vae, method):
                    raise ConfigError(f"{option}: this VAE ({type(vae).__name__}) has no {method}(); turn it off.")
                getattr(vae, method)()

    def after_caching(self, components: Components) -> None:
        """Text encoders deleted (or kept on the CPU without fully_unload_text_encoder); the VAE off the
        accelerator unless keep_vae_loaded."""
        if self.config.fully_unload_text_encoder:
            components.text_encoders.clear()
        else:
            for name, encoder in components.text_encoders.items():
                self.off(name, encoder, "caching done")
        self.vae_between_uses(components.vae)

    @property
    def load_device(self) -> torch.device:
        """Where the family puts the text encoders and the VAE when it loads them."""
        return torch.device("cpu") if self.config.enable_model_cpu_offload else self.device

    def vae_between_uses(self, vae: Any) -> None:
        """After caching: the VAE leaves the accelerator unless keep_vae_loaded (validation brings it back)."""
        if self.config.keep_vae_loaded and not self.config.enable_model_cpu_offload:
            self.on("vae", vae, "keep_vae_loaded")
        elif self.device.type != "cpu" or self.config.enable_model_cpu_offload:
            self.off("vae", vae, "caching done")

    @contextlib.contextmanager
    def vae_for_validation(self, vae: Any) -> Iterator[None]:
        """The VAE on the accelerator while validation renders; with vae_dtype, in the base weights'
        precision meanwhile (diffusers' pipelines decode the transformer's latents as they are, so a
        vae_dtype apart from it serves caching)."""
        from stune._defaults import weight_dtype

        if vae is None:
            yield
            return
        cached_dtype = _dtype(vae)
        dtype = weight_dtype(self.config) if self.config.vae_dtype != "default" else cached_dtype
        if cached_dtype != dtype:
            vae.to(dtype=dtype)
        keep = self.config.keep_vae_loaded and not self.config.enable_model_cpu_offload
        if not keep:
            self.on("vae", vae, "validation")
        try:
            yield
        finally:
            if cached_dtype != dtype:
                vae.to(dtype=cached_dtype)
            if not keep and (self.device.type != "cpu" or self.config.enable_model_cpu_offload):
                self.off("vae", vae, "validation done")

    @contextlib.contextmanager
    def transformer_saving(self, transformer: Any, resident: bool) -> Iterator[None]:
        """offload_during_save: the transformer off the accelerator while a checkpoint is written
        (``resident``: whether the whole model sits on one device, i.e. nothing is offloaded or sharded)."""
        if not (self.config.offload_during_save and resident):
            yield
            return
        self.off("transformer", transformer, "saving")
        try:
            yield
        finally:
            self.on("transformer", transformer, "saving done")


def _dtype(module: Any) -> torch.dtype:
    dtype = getattr(module, "dtype", None)  # diffusers and transformers models say it
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


# -- blocks that live elsewhere between uses ----------------------------------------------------------


@dataclass
class Unit:
    """A module whose weights leave the accelerator between uses, and how to move them."""

    name: str
    module: torch.nn.Module
    bring_in: Callable[[], None]
    send_out: Callable[[], None]
    #: whether this module's own forward hooks send it out after a forward (block swap: ours)
    owns_forward: bool = False
    #: stays in from the start of the backward pass to the optimizer step (layers outside the blocks)
    until_step: bool = False
    is_in: bool = False
    in_backward: bool = False


@dataclass
class Residency:
    """Moves units in for their backward and out after it; ``events`` records (unit, in/out, phase)."""

    units: list[Unit]
    events: list[tuple[str, str, str]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def install(self) -> None:
        # The whole model's inputs need no gradient; its backward pre-hook still fires, which torch warns about.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        for unit in self.units:
            self.handles.append(unit.module.register_full_backward_pre_hook(self._backward_hook(unit)))
            if unit.owns_forward:
                self.handles.append(unit.module.register_forward_pre_hook(self._forward_in(unit)))
                self.handles.append(unit.module.register_forward_hook(self._forward_out(unit)))

    def by_module(self) -> dict[torch.nn.Module, Unit]:
        return {unit.module: unit for unit in self.units}

    def move_in(self, unit: Unit, phase: str) -> None:
        if unit.owns_forward and unit.is_in:
            return
        unit.bring_in()
        unit.is_in = True
        self.events.append((unit.name, "in", phase))

    def move_out(self, unit: Unit, phase: str) -> None:
        if unit.owns_forward and not unit.is_in:
            return
        unit.send_out()
        unit.is_in = False
        unit.in_backward = False
        self.events.append((unit.name, "out", phase))

    def _forward_in(self, unit: Unit) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self.move_in(unit, "forward")

        return hook

    def _forward_out(self, unit: Unit) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not unit.in_backward:  # a recompute inside backward: the backward still needs it
                self.move_out(unit, "forward")

        return hook

    def _backward_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(module: torch.nn.Module, grad_output: Any) -> None:
            # Backward runs the blocks in reverse: the one whose backward starts now takes over from
            # the ones before it in this backward, whose gradients are complete.
            for other in self.units:
                if other is not unit and other.in_backward and not other.until_step:
                    self.move_out(other, "backward done")
            unit.in_backward = True
            self.move_in(unit, "backward")

        return hook

    @contextlib.contextmanager
    def recomputing(self, module: torch.nn.Module) -> Iterator[None]:
        """Wraps a gradient-checkpointing recompute of ``module`` (inside backward)."""
        unit = self.by_module().get(module)
        if unit is not None:
            unit.in_backward = True
        try:
            yield
        finally:
            if unit is not None:
                # diffusers' hooks sent the group out at the end of the recomputed forward; the
                # block's backward runs next and needs it.
                if not unit.owns_forward:
                    unit.is_in = False
                self.move_in(unit, "recompute")

    def before_inference(self) -> None:
        """Validation: the layers outside the blocks in, so the model's first weight is on the
        accelerator (families read the device from it); forwards move the rest themselves."""
        for unit in self.units:
            if unit.until_step:
                self.move_in(unit, "inference")

    def settle(self) -> None:
        """After the backward pass, before the optimizer step: every unit back out."""
        for unit in self.units:
            if unit.in_backward or (unit.owns_forward and unit.is_in):
                self.move_out(unit, "step")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _leaf_moves(block: torch.nn.Module, device: torch.device, trainable: bool) -> None:
    """Move a block's frozen weights and buffers (and with ``trainable`` its trained ones, with
    their gradients) to ``device``. Leaf layers move as modules, so quantized weights keep their type."""
    with torch.no_grad():
        for module in block.modules():
            params = list(module.parameters(recurse=False))
            buffers = list(module.buffers(recurse=False))
            if not params and not buffers:
                continue
            is_leaf = next(module.children(), None) is None
            if is_leaf and (trainable or not any(p.requires_grad for p in params)):
                module.to(device)
                continue
            for param in params:
                if trainable or not param.requires_grad:
                    param.data = param.data.to(device)
                    if param.grad is not None:
                        param.grad = param.grad.to(device)
            for buffer in buffers:
                buffer.data = buffer.data.to(device)


def swapped_blocks(transformer: torch.nn.Module, layout: TokenLayout | None, count: int) -> list[torch.nn.Module]:
    """The last ``count`` blocks in execution order, from the family's token layout."""
    if layout is None:
        raise ConfigError(
            "musubi_blocks_to_swap needs the family to declare its blocks (a token layout), which it does not; "
            "use enable_group_offload instead."
        )
    blocks = [block for _, _, block in layout.blocks(transformer)]
    if count >= len(blocks):
        raise ConfigError(
            f"musubi_blocks_to_swap={count} leaves no block on the accelerator ({len(blocks)} blocks); "
            f"use at most {len(blocks) - 1}."
        )
    return blocks[len(blocks) - count :]


def place_for_swap(
    transformer: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device, swap: torch.device
) -> None:
    """Everything on the accelerator except the swapped blocks, which go to the swap device (the
    whole model never sits on the accelerator at once)."""
    for block in blocks:
        block.to(swap)
    _move_except(transformer, {id(block) for block in blocks}, device)


def _move_except(module: torch.nn.Module, skip: set[int], device: torch.device) -> None:
    for child in module.children():
        if id(child) in skip:
            continue
        _move_except(child, skip, device)
    with torch.no_grad():
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for buffer in module.buffers(recurse=False):
            buffer.data = buffer.data.to(device)


def block_swap(
    transformer: torch.nn.Module,
    blocks: list[torch.nn.Module],
    device: torch.device,
    swap: torch.device,
    full: bool,
) -> Residency:
    """Hooks that bring each swapped block in for its forward and backward (``full``: its trained
    weights and gradients move too; otherwise they stay on the accelerator)."""
    units = []
    for i, block in enumerate(blocks):
        if not full:
            for param in block.parameters():
                if param.requires_grad:
                    param.data = param.data.to(device)
        units.append(
            Unit(
                name=f"swap{i}",
                module=block,
                bring_in=functools.partial(_leaf_moves, block, device, full),
                send_out=functools.partial(_leaf_moves, block, swap, full),
                owns_forward=True,
            )
        )
    residency = Residency(units)
    residency.install()
    return residency


# -- diffusers group offloading -------------------------------------------------------------------------

_GROUP_HOOK = "group_offloading"  # the name diffusers registers its group-offloading hooks under


def _groups(module: torch.nn.Module, recurse: bool = True) -> list[Any]:
    found: dict[int, Any] = {}
    for sub in module.modules() if recurse else [module]:
        registry = getattr(sub, "_diffusers_hook", None)  # diffusers' per-module HookRegistry
        hook = registry.get_hook(_GROUP_HOOK) if registry is not None else None
        if hook is not None:
            found[id(hook.group)] = hook.group
    return list(found.values())


def group_offload(
    transformer: torch.nn.Module, layout: TokenLayout | None, device: torch.device, config: CoreOptions
) -> Residency:
    """diffusers' group offloading of the transformer (before the adapter exists), plus the backward
    residency of every group: the layout's blocks one by one, the rest as the whole model."""
    from diffusers.hooks import apply_group_offloading  # type: ignore[attr-defined]

    stream = config.group_offload_use_stream and device.type == "cuda"
    apply_group_offloading(
        transformer,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=config.group_offload_type,
        num_blocks_per_group=config.group_offload_blocks_per_group
        if config.group_offload_type == "block_level"
        else None,
        non_blocking=stream,
        use_stream=stream,
        offload_to_disk_path=config.group_offload_to_disk_path,
    )
    blocks = [block for _, _, block in layout.blocks(transformer)] if layout is not None else []
    inside: set[int] = set()
    units = []
    for i, block in enumerate(blocks):
        groups = _groups(block)
        inside.update(id(g) for g in groups)
        if groups:
            units.append(_group_unit(f"block{i}", block, groups))
    rest = [g for g in _groups(transformer) if id(g) not in inside]
    if rest:
        # The layers outside the blocks (embedders, final norm and projection): in when the backward
        # starts (the projection's backward runs first), out after it.
        units.append(_group_unit("outer", transformer, rest, until_step=True))
    residency = Residency(units)
    residency.install()
    log.info("group offloading: %s, %d groups", config.group_offload_type, len(_groups(transformer)))
    return residency


def _group_unit(name: str, module: torch.nn.Module, groups: list[Any], until_step: bool = False) -> Unit:
    def bring_in() -> None:
        for group in groups:
            group.onload_()
        for group in groups:
            if group.stream is not None:
                group.stream.synchronize()

    def send_out() -> None:
        for group in groups:
            group.offload_()

    return Unit(name, module, bring_in, send_out, until_step=until_step)


def move_trainable(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """The adapter's weights on the accelerator (created next to offloaded frozen weights)."""
    with torch.no_grad():
        for param in params:
            param.data = param.data.to(device)


# -- checks -----------------------------------------------------------------------------------------------


def check_offload(config: CoreOptions) -> None:
    """What block swap and group offloading need from the run and the machine."""
    moving = "enable_group_offload" if config.enable_group_offload else None
    if config.musubi_blocks_to_swap:
        moving = "musubi_blocks_to_swap"
    if moving is None:
        return
    if config.num_processes > 1 or config.fsdp_enable or config.deepspeed_config:
        raise ConfigError(
            f"{moving} moves weights between devices, which data-parallel and sharded training do not follow; "
            "train in one process (num_processes 1, no FSDP/DeepSpeed)."
        )
    if config.dynamo_backend != "no" and not config.dynamo_use_regional_compilation:
        raise ConfigError(
            f"{moving} cannot run inside a whole-model torch.compile; set dynamo_use_regional_compilation=true "
            "(moved blocks are then left uncompiled)."
        )
    if config.fuse_optimizer and config.model_type == "full" and moving == "enable_group_offload":
        raise ConfigError(
            "fuse_optimizer steps weights inside backward, while group offloading moves them; "
            "use musubi_blocks_to_swap for a full fine-tune with a fused backward pass."
        )
    if config.enable_group_offload:
        stream, disk = config.group_offload_use_stream, config.group_offload_to_disk_path
        if stream:
            if not torch.cuda.is_available():
                raise ConfigError(
                    "group_offload_use_stream overlaps transfers on a CUDA stream and this machine has no CUDA "
                    "GPU; turn it off."
                )
            if config.group_offload_type == "block_level":
                raise ConfigError(
                    "group_offload_use_stream with block_level groups copies from pinned copies taken before the "
                    "adapter exists (diffusers); use group_offload_type=leaf_level with streams."
                )
        if (stream or disk) and config.model_type == "full":
            raise ConfigError(
                "A full fine-tune changes every weight, and diffusers restores streamed or disk-offloaded weights "
                "from copies taken once; drop group_offload_use_stream/group_offload_to_disk_path."
            )
    if config.musubi_blocks_to_swap:
        device = config.musubi_block_swap_device
        try:
            swap = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"musubi_block_swap_device {device!r} is not a torch device (e.g. cpu).") from None
        if swap.type == "meta":
            raise ConfigError("musubi_block_swap_device cannot be meta (the weights would be lost); use cpu.")
