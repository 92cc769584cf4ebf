"""The fused backward pass (``fuse_optimizer``, alias ``optimizer_release_gradients``).

Each trained parameter gets its own optimizer; the moment its gradient is complete (a
post-accumulate-grad hook) the gradient is clipped, the parameter is stepped and the gradient is
freed. Gradients of the whole model therefore never coexist, which is most of a full fine-tune's
memory beyond weights and optimizer state.

:class:`FusedOptimizer` presents the per-parameter optimizers as one ``torch.optim.Optimizer``: its
``param_groups`` are theirs (so learning-rate schedules reach them), ``step`` and ``zero_grad``
have nothing left to do, and its state dict holds each one's. Equivalent to the plain step only
for optimizers whose update of a parameter reads that parameter alone (AdamW, Lion, the 8-bit
ones), with element-wise clipping, one micro-step per optimizer step and one process; the rest is
refused by :func:`check_fused`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.config import CoreOptions

#: optimizers whose step couples parameters (a global step-size estimate)
_COUPLED = ("prodigy",)


class FusedOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        clip_value: float | None,
    ) -> None:
        self.optimizers = [build([param]) for param in params]
        super().__init__(params, dict(self.optimizers[0].defaults) if self.optimizers else {})
        self._share_groups()
        self.clip_value = clip_value
        self._norm_sq: torch.Tensor | None = None  # on the gradients' device: no sync per parameter
        self.hooks = [
            param.register_post_accumulate_grad_hook(self._stepper(optimizer))  # type: ignore[no-untyped-call]
            for param, optimizer in zip(params, self.optimizers, strict=True)
        ]

    def _share_groups(self) -> None:
        # A learning-rate schedule writes into these dicts; they must be the ones the optimizers read.
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def _stepper(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            squares = grad.detach().float().square().sum()
            self._norm_sq = squares if self._norm_sq is None else self._norm_sq + squares.to(self._norm_sq.device)
            if self.clip_value is not None:
                grad.clamp_(-self.clip_value, self.clip_value)
            optimizer.step()
            param.grad = None  # freed now, not at the end of the backward pass

        return step

    def take_grad_norm(self) -> float:
        """The norm of the gradients of the step just taken (before clipping); resets the count."""
        norm = 0.0 if self._norm_sq is None else float(self._norm_sq.sqrt())
        self._norm_sq = None
        return norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        return None  # every parameter was stepped during backward

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None  # gradients were freed as soon as they were used

    def state_dict(self) -> dict[str, Any]:
        return {"fused": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("fused")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ConfigError(
                "The checkpoint's optimizer state was not written with fuse_optimizer (or for other weights); "
                "resume with the options it was trained with."
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        self._share_groups()


def check_fused(config: CoreOptions) -> None:
    if not config.fuse_optimizer:
        return
    from stune.optim import clips_gradients

    if config.gradient_accumulation_steps > 1:
        raise ConfigError(
            "fuse_optimizer steps each weight as soon as its gradient is ready, so gradients cannot accumulate; "
            "set gradient_accumulation_steps to 1 (or turn fuse_optimizer off)."
        )
    if config.optimizer in _COUPLED:
        raise ConfigError(
            f"optimizer {config.optimizer} estimates its step size from all weights together, which a fused "
            "backward pass cannot do; use torch-adamw, optimi-adamw, optimi-lion or a bnb optimizer."
        )
    if clips_gradients(config) and config.grad_clip_method == "norm":
        raise ConfigError(
            "grad_clip_method=norm needs every gradient before the first step, which fuse_optimizer never has; "
            "use grad_clip_method=value."
        )
    if config.mixed_precision == "fp16":
        raise ConfigError(
            "fuse_optimizer cannot unscale fp16 gradients before each weight's step; use mixed_precision bf16."
        )
    if config.num_processes > 1 or config.fsdp_enable or config.deepspeed_config:
        raise ConfigError(
            "fuse_optimizer would step each weight before its gradient is averaged across processes; "
            "train in one process."
        )
