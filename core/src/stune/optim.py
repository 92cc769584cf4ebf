"""Building the optimizer and its learning-rate schedule from the options in ``stune.opts.optim``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stune.config import CoreOptions


def trainable_dtype(config: CoreOptions) -> torch.dtype:
    """dtype the trained weights are kept in (fp32: small updates are not rounded away)."""
    return torch.float32


def clips_gradients(config: CoreOptions) -> bool:
    """Whether gradients are clipped before the step."""
    return config.max_grad_norm > 0


def build_optimizer(params: list[torch.nn.Parameter], config: CoreOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: CoreOptions, max_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
