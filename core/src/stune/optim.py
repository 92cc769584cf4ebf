"""Building the optimizer and its learning-rate schedule from the options in ``stune.opts.optim``.

The optimizers come from their libraries: torch (AdamW), torch-optimi (AdamW, Lion, StableAdamW;
its Kahan summation makes ``adamw_bf16``: bf16 weights whose small updates are not rounded
away), prodigyopt (Prodigy) and bitsandbytes (8-bit and paged optimizers).

Settings, from weakest to strongest: each optimizer's SimpleTuner defaults (:data:`DEFAULTS`),
then ``adam_beta1/adam_beta2/adam_weight_decay/adam_epsilon`` where set, then
``optimizer_beta1/optimizer_beta2`` where set, then ``optimizer_config``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions

#: SimpleTuner never clips for these: they bound their updates themselves.
NO_CLIPPING = ("optimi-stableadamw", "prodigy")
BNB = {"bnb-adamw8bit": "AdamW8bit", "bnb-lion8bit": "Lion8bit", "bnb-lion8bit-paged": "PagedLion8bit"}
OPTIMI = {"optimi-adamw": "AdamW", "optimi-lion": "Lion", "optimi-stableadamw": "StableAdamW", "adamw_bf16": "AdamW"}
#: bitsandbytes runs its optimizers on the CPU from this release on (before it, CUDA only).
BNB_CPU_SINCE = (0, 50)
#: Share of the run over which Prodigy adapts its step size when prodigy_steps is not set (SimpleTuner's rule).
PRODIGY_ADAPT_SHARE = 0.25

# SimpleTuner's per-optimizer settings (optimizer_param.py `default_settings`), so that a SimpleTuner
# config trains with the same betas, weight decay and epsilon. kahan_sum only acts on bf16/fp16 weights.
_ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
_OPTIMI = {"betas": (0.9, 0.99), "eps": 1e-6, "kahan_sum": True}
_LION = {"betas": (0.9, 0.99), "weight_decay": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch-adamw": _ADAM,
    "adamw": _ADAM,
    "adamw_bf16": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6, "kahan_sum": True},
    "optimi-adamw": {**_OPTIMI, "weight_decay": 0.0},
    "optimi-lion": {**_LION, "kahan_sum": True},
    "optimi-stableadamw": {**_OPTIMI, "weight_decay": 1e-2},
    "prodigy": {"betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-8, "d0": 1e-6, "d_coef": 1.0},
    "bnb-adamw8bit": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6},
    "bnb-lion8bit": {**_LION, "min_8bit_size": 4096},
    "bnb-lion8bit-paged": {**_LION, "min_8bit_size": 4096},
}


def _bnb_version() -> tuple[int, ...] | None:
    """Installed bitsandbytes release as numbers, None when it is not installed (no import)."""
    try:
        text = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def check_optimizer(config: CoreOptions) -> None:
    """What the chosen optimizer needs from this machine and the options, before anything loads.

    Called from the core's ``check_config`` hook, so a mistake ends the run (exit status 2) before
    any model is loaded or any cache is written.
    """
    name = config.optimizer
    if name in BNB:
        import torch

        version = _bnb_version()
        if version is None:
            raise ConfigError(f"optimizer {name} needs bitsandbytes; install it with `pip install 'stune[bnb]'`.")
        if not torch.cuda.is_available() and version < BNB_CPU_SINCE:
            raise ConfigError(
                f"optimizer {name} runs only on a CUDA GPU with bitsandbytes "
                f"{'.'.join(map(str, version))}, and this machine has none; upgrade to bitsandbytes>=0.50 "
                "(which also runs on the CPU) or use torch-adamw or optimi-lion."
            )
    if name == "adamw_bf16" and config.mixed_precision != "bf16":
        raise ConfigError(
            "optimizer adamw_bf16 keeps bf16 weights and needs mixed_precision=bf16; set it or pick torch-adamw."
        )
    if config.optimizer_config:
        try:
            cls = _optimizer_class(name)
        except ImportError:
            return  # a missing library is reported when the optimizer is built
        _check_overrides(cls, config.optimizer_overrides, name)


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


def _accepted(cls: Any) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "params"}


def _check_overrides(cls: Any, overrides: dict[str, Any], name: str) -> None:
    accepted = _accepted(cls)
    for key in overrides:
        if key not in accepted:
            raise ConfigError(
                f"`optimizer_config` key `{key}` is not a setting of {name}; it takes: {', '.join(sorted(accepted))}."
            )


def scaled_learning_rate(config: CoreOptions, processes: int = 1) -> float:
    """learning_rate, times batch size × accumulation × processes with lr_scale (its square root with
    lr_scale_sqrt too), as SimpleTuner scales it; lr_scale_sqrt alone changes nothing there either."""
    if not config.lr_scale:
        return config.learning_rate
    factor = config.train_batch_size * config.gradient_accumulation_steps * processes
    return config.learning_rate * (math.sqrt(factor) if config.lr_scale_sqrt else factor)


def optimizer_settings(config: CoreOptions, accepted: set[str] | None = None, processes: int = 1) -> dict[str, Any]:
    """Keyword arguments for the optimizer (without ``params``): defaults, then options, then overrides.

    ``accepted``: the optimizer's keyword names; options it has no use for (eps for Lion) are left out.
    ``processes``: how many processes train together (for lr_scale).
    """
    settings: dict[str, Any] = {"lr": scaled_learning_rate(config, processes), **DEFAULTS[config.optimizer]}
    beta1 = config.optimizer_beta1 if config.optimizer_beta1 is not None else config.adam_beta1
    beta2 = config.optimizer_beta2 if config.optimizer_beta2 is not None else config.adam_beta2
    if beta1 is not None or beta2 is not None:
        default1, default2 = settings["betas"][:2]
        settings["betas"] = (default1 if beta1 is None else beta1, default2 if beta2 is None else beta2)
    if config.adam_weight_decay is not None:
        settings["weight_decay"] = config.adam_weight_decay
    if config.adam_epsilon is not None:
        settings["eps"] = config.adam_epsilon
    if accepted is not None:
        settings = {k: v for k, v in settings.items() if k in accepted}
    settings.update(config.optimizer_overrides)
    return settings


def build_optimizer(params: list[torch.nn.Parameter], config: CoreOptions, processes: int = 1) -> torch.optim.Optimizer:
    """The optimizer; with fuse_optimizer one per parameter stepped during backward (stune.fused), with
    optimizer_cpu_offload_method=torchao wrapped in torchao's CPUOffloadOptimizer."""
    name = config.optimizer
    cls = _optimizer_class(name)
    _check_overrides(cls, config.optimizer_overrides, name)
    settings = optimizer_settings(config, _accepted(cls), processes)
    if config.fuse_optimizer:
        from stune.fused import FusedOptimizer

        clip = config.max_grad_norm if clips_gradients(config) else None
        return FusedOptimizer(params, lambda group: cls(group, **settings), clip)
    if config.optimizer_cpu_offload_method == "torchao":
        from torchao.optim import CPUOffloadOptimizer

        offloaded: torch.optim.Optimizer = CPUOffloadOptimizer(
            params, cls, offload_gradients=config.optimizer_offload_gradients, **settings
        )
        return offloaded
    optimizer: torch.optim.Optimizer = cls(params, **settings)
    return optimizer


def check_cpu_offload(config: CoreOptions) -> None:
    """torchao's CPUOffloadOptimizer streams state between a CUDA (or XPU) device and the CPU."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("optimizer_cpu_offload_method=torchao needs torchao; install it (`pip install torchao`).")
    if not torch.cuda.is_available():
        raise ConfigError(
            "optimizer_cpu_offload_method=torchao moves optimizer state between a CUDA GPU and the CPU, and this "
            "machine has no CUDA GPU; set it to none."
        )
    if config.optimizer in BNB or config.optimizer == "adamw_bf16":
        raise ConfigError(
            f"optimizer_cpu_offload_method=torchao runs the optimizer on the CPU, where {config.optimizer}'s "
            "low-precision state brings nothing; use torch-adamw."
        )
    if config.gradient_accumulation_steps > 1 and config.optimizer_offload_gradients:
        raise ConfigError(
            "optimizer_offload_gradients moves each gradient to the CPU as it is made, so gradients cannot "
            "accumulate; set gradient_accumulation_steps 1 or turn it off."
        )


def prodigy_adapt_steps(config: CoreOptions, max_steps: int) -> int:
    """Steps over which Prodigy adapts its step size d; 0: for the whole run."""
    if config.prodigy_steps is not None:
        return config.prodigy_steps
    return max(1, round(PRODIGY_ADAPT_SHARE * max_steps))


def _freeze_prodigy_after(optimizer: torch.optim.Optimizer, steps: int) -> None:
    """From optimizer step ``steps`` on, Prodigy keeps the step size d it had reached.

    prodigyopt re-estimates d on every step; after each step past the limit this puts back the d
    of the moment it was reached. The frozen value is kept in the param group, so it is saved
    with the optimizer state and a resumed run keeps it.
    """

    def keep_d(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            if group.get("k", 0) >= steps:
                group.setdefault("frozen_d", group["d"])
                group["d"] = group["frozen_d"]

    optimizer.register_step_post_hook(keep_d)


def sine_schedule(warmup: int, total: int, cycles: int, floor: float) -> Callable[[int], float]:
    """Factor of the peak learning rate for ``sine``.

    Linear warm-up over ``warmup`` steps from 0 to 1, then ``cycles`` smooth waves down to
    ``floor`` (= lr_end / learning_rate) and back up over the remaining steps:
    factor = floor + (1 - floor) · ½(1 + cos(2π · cycles · t)), t = progress after the warm-up in [0, 1].
    Unlike cosine_with_restarts the rate climbs back to the peak gradually instead of jumping.
    (SimpleTuner's ``sine`` reuses lr_warmup_steps as the half-period of an endless wave that
    starts halfway and has no warm-up; here warm-up and cycles keep their usual meaning.)
    """

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(2.0 * math.pi * cycles * progress))

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: CoreOptions, max_steps: int) -> Any:
    """The learning-rate schedule over ``max_steps`` optimizer steps.

    For prodigy this also sets when it stops adapting its step size (prodigy_steps), which depends
    on the run's length and so is known only here.
    """
    import torch
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if config.optimizer == "prodigy":
        steps = prodigy_adapt_steps(config, max_steps)
        if steps > 0:
            _freeze_prodigy_after(optimizer, steps)
    if config.lr_scheduler == "sine":
        floor = config.lr_end / config.learning_rate
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, sine_schedule(config.lr_warmup_steps, max_steps, config.lr_num_cycles, floor)
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
