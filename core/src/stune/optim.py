"""Building the optimizer and its learning-rate schedule from the options in ``stune.opts.optim``.

The optimizers come from their libraries: torch (AdamW), torch-optimi (AdamW, Lion, StableAdamW;
its Kahan summation makes ``adamw_bf16``: bf16 weights whose small updates are not rounded
away), prodigyopt (Prodigy) and bitsandbytes (8-bit and paged optimizers, CUDA only).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions

#: SimpleTuner never clips for these: they bound their updates themselves.
NO_CLIPPING = ("optimi-stableadamw", "prodigy")
BNB = {"bnb-adamw8bit": "AdamW8bit", "bnb-lion8bit": "Lion8bit", "bnb-lion8bit-paged": "PagedLion8bit"}
OPTIMI = {"optimi-adamw": "AdamW", "optimi-lion": "Lion", "optimi-stableadamw": "StableAdamW", "adamw_bf16": "AdamW"}


def check_optimizer(config: CoreOptions) -> None:
    """What the chosen optimizer needs from this machine and the options, before anything loads."""
    name = config.optimizer
    if name in BNB:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"optimizer {name} needs bitsandbytes; install it with `pip install 'stune[bnb]'`.")
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"optimizer {name} runs only on a CUDA GPU, which this machine lacks; use torch-adamw or optimi-lion."
            )
    if name == "adamw_bf16" and config.mixed_precision != "bf16":
        raise ConfigError(
            "optimizer adamw_bf16 keeps bf16 weights and needs mixed_precision=bf16; set it or pick torch-adamw."
        )
    if config.optimizer_config:
        try:
            _check_overrides(_optimizer_class(name), config.optimizer_overrides, name)
        except ImportError:
            return  # a missing library is reported when the optimizer is built


def trainable_dtype(config: CoreOptions) -> torch.dtype:
    """dtype the trained weights are kept in: fp32, except bf16 for adamw_bf16 (made for bf16 weights)."""
    import torch

    return torch.bfloat16 if config.optimizer == "adamw_bf16" else torch.float32


def clips_gradients(config: CoreOptions) -> bool:
    """Whether gradients are clipped before the step."""
    return config.max_grad_norm > 0 and config.optimizer not in NO_CLIPPING


def _optimizer_class(name: str) -> Any:
    import torch

    if name in ("torch-adamw", "adamw"):
        return torch.optim.AdamW
    if name in OPTIMI:
        import optimi

        return getattr(optimi, OPTIMI[name])
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    import bitsandbytes

    return getattr(bitsandbytes.optim, BNB[name])


def _check_overrides(cls: Any, overrides: dict[str, Any], name: str) -> None:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    for key in overrides:
        if key not in accepted:
            raise ConfigError(
                f"`optimizer_config` key `{key}` is not a setting of {name}; it takes: {', '.join(sorted(accepted))}."
            )


def build_optimizer(params: list[torch.nn.Parameter], config: CoreOptions) -> torch.optim.Optimizer:
    name = config.optimizer
    cls = _optimizer_class(name)
    kwargs: dict[str, Any] = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
    }
    if "eps" in inspect.signature(cls.__init__).parameters:
        kwargs["eps"] = config.adam_epsilon
    if name in OPTIMI:
        # bf16 weights would lose updates smaller than their precision; Kahan summation keeps them.
        kwargs["kahan_sum"] = name == "adamw_bf16" or None
    overrides = config.optimizer_overrides
    _check_overrides(cls, overrides, name)
    kwargs.update(overrides)
    optimizer: torch.optim.Optimizer = cls(params, **kwargs)
    return optimizer


def sine_schedule(warmup: int, total: int, cycles: int) -> Any:
    """Linear warm-up, then a smooth oscillation between the peak and 0: factor = ½(1 + cos(2π·cycles·t)).

    Unlike cosine_with_restarts, the rate climbs back to the peak gradually instead of jumping.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(2.0 * math.pi * cycles * progress))

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: CoreOptions, max_steps: int) -> Any:
    import torch
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if config.lr_scheduler == "sine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, sine_schedule(config.lr_warmup_steps, max_steps, config.lr_num_cycles)
        )
    if config.lr_scheduler == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, config.lr_warmup_steps, max_steps, lr_end=config.lr_end, power=config.lr_power
        )
    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
