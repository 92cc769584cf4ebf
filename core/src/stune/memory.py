"""Trading compute for memory: activation checkpointing every N-th block."""

from __future__ import annotations

from typing import Any

import torch


def enable_gradient_checkpointing(model: torch.nn.Module, interval: int | None) -> None:
    """Checkpoint the model's blocks; with ``interval`` n, only every n-th block (1st, n+1-th, …).

    diffusers models call ``self._gradient_checkpointing_func(block, *args)`` for each block in
    order when checkpointing is on; we replace that function by one that checkpoints every n-th
    call and runs the others directly, and reset its count at the start of every forward pass.
    """
    model.enable_gradient_checkpointing()  # type: ignore[operator]
    if not interval or interval <= 1:
        return
    checkpoint: Any = model._gradient_checkpointing_func
    calls = [0]

    def every_nth(block: Any, *args: Any) -> Any:
        calls[0] += 1
        if (calls[0] - 1) % interval == 0:
            return checkpoint(block, *args)
        return block(*args)

    def reset(_module: torch.nn.Module, _args: Any) -> None:
        calls[0] = 0

    model._gradient_checkpointing_func = every_nth  # type: ignore[assignment]
    model.register_forward_pre_hook(reset)
