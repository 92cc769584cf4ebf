"""Exponential moving average of the trained parameters (LoRA, LyCORIS or full).

The shadow copy is kept in fp32, on the CPU or on the accelerator (``ema_device``). Every
``ema_update_interval`` optimizer steps: shadow ← decay·shadow + (1 − decay)·weights. ``applied()``
swaps the shadow into the model for validation or export and puts the trained weights back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    def __init__(
        self, params: list[torch.nn.Parameter], decay: float, interval: int, device: torch.device, warmup: int = 0
    ) -> None:
        self.params = params
        self.decay = decay
        self.interval = interval
        self.warmup = warmup
        self.shadow = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in params]

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step``: ramped linearly from 0 over ``warmup`` steps
        (ema_warmup_steps), so early updates follow the weights instead of the starting point."""
        if self.warmup and step < self.warmup:
            return self.decay * step / self.warmup
        return self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based)."""
        if step % self.interval:
            return
        weight = 1.0 - self.decay_at(step)
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param.detach().to(shadow.device, torch.float32, non_blocking=True), weight)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the EMA weights."""
        saved = [p.detach().clone() for p in self.params]
        for shadow, param in zip(self.shadow, self.params, strict=True):
            param.copy_(shadow.to(param.device, param.dtype))
        try:
            yield
        finally:
            for backup, param in zip(saved, self.params, strict=True):
                param.copy_(backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the model {len(self.shadow)}")
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[f"shadow.{i}"])
