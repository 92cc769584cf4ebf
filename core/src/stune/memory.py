"""Trading compute for memory: activation checkpointing every N-th block."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

#: (module being recomputed) → context wrapping its recompute inside backward
RecomputeContext = Callable[[torch.nn.Module], contextlib.AbstractContextManager[Any]]


def enable_gradient_checkpointing(
    model: torch.nn.Module, interval: int | None, recompute: RecomputeContext | None = None
) -> None:
    """Checkpoint the model's blocks; with ``interval`` n, only every n-th block (1st, n+1-th, …).

    diffusers models call ``self._gradient_checkpointing_func(block, *args)`` for each block in
    order when checkpointing is on; we hand them a function that checkpoints every n-th call and
    runs the others directly, and reset its count at the start of every forward pass.
    ``recompute(block)`` wraps the recomputation of a checkpointed block in backward (offloaded
    blocks are moved back in there).
    """
    every = interval if interval and interval > 1 else 1
    calls = [0]

    def checkpointed(block: Any, *args: Any) -> Any:
        calls[0] += 1
        if (calls[0] - 1) % every != 0:
            return block(*args)
        kwargs: dict[str, Any] = {"use_reentrant": False, "context_fn": functools.partial(_contexts, recompute, block)}
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, **kwargs)

    def reset(_module: torch.nn.Module, _args: Any) -> None:
        calls[0] = 0

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)  # type: ignore[operator]
    model.register_forward_pre_hook(reset)


def _contexts(
    recompute: RecomputeContext | None, block: Any
) -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
    return _checkpointing(), _recomputing(recompute, block)


@contextlib.contextmanager
def _recomputing(recompute: RecomputeContext | None, block: Any) -> Any:
    with _checkpointing(), recompute(block) if recompute is not None else contextlib.nullcontext():
        yield


_STATE = threading.local()


@contextlib.contextmanager
def _checkpointing() -> Any:
    """Marks a checkpointed block's forward and its recompute: the checkpoint's own saved-tensor hooks
    are in charge there, and the attention offload below must not stack its hooks on top of them."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost attention modules (diffusers' ``Attention``, ``FluxAttention``…: class names ending
    in Attention)."""
    found: list[torch.nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if type(module).__name__.endswith("Attention"):
            found.append(module)
            inside.add(name)
    return found


def offload_attention(model: torch.nn.Module, pin_memory: bool) -> int:
    """gradient_checkpointing_offload_attention: what attention modules save for backward (q, k, v,
    softmax inputs…) goes to CPU memory during the forward (torch's ``save_on_cpu`` saved-tensor hooks,
    pinned on CUDA) and comes back when backward needs it. Blocks being checkpointed save nothing to
    offload, so it acts where activations are kept: without gradient_checkpointing, or between the
    checkpointed blocks of gradient_checkpointing_interval. Returns how many modules it covers."""
    modules = attention_modules(model)
    for module in modules:
        entered: list[contextlib.AbstractContextManager[Any] | None] = []

        def enter(_module: torch.nn.Module, _args: Any, entered: list[Any] = entered) -> None:
            if torch.is_grad_enabled() and not getattr(_STATE, "depth", 0):
                context = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
                context.__enter__()
                entered.append(context)
            else:
                entered.append(None)

        def leave(_module: torch.nn.Module, _args: Any, _output: Any, entered: list[Any] = entered) -> None:
            context = entered.pop() if entered else None
            if context is not None:
                context.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)  # leave even when the forward raises
    return len(modules)
