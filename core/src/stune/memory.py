"""Trading compute for memory: activation checkpointing every N-th block."""

from __future__ import annotations

import contextlib
import functools
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
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if recompute is not None:
            kwargs["context_fn"] = functools.partial(_contexts, recompute, block)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, **kwargs)

    def reset(_module: torch.nn.Module, _args: Any) -> None:
        calls[0] = 0

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)  # type: ignore[operator]
    model.register_forward_pre_hook(reset)


def _contexts(
    recompute: RecomputeContext, block: Any
) -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
    return contextlib.nullcontext(), recompute(block)
