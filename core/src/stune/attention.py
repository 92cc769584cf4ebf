"""``attention_mechanism``: which attention kernel the transformer runs, through diffusers'
attention-backend API (``ModelMixin.set_attention_backend`` for the training forward, the
``diffusers.attention_backend`` context for validation images).

What each backend needs is checked before anything loads (:func:`check_attention`): the package
(flash-attn, sageattention, xformers, kernels) and a CUDA GPU where the kernel exists only there.
SageAttention has no backward pass, so by default (``sageattention_usage=inference``) it renders
validation images only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError
from stune.opts.memory import ATTENTION_BACKENDS

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions

log = logging.getLogger("stune.attention")

#: backend prefix → (package to import, what to install)
_PACKAGES = {
    "flash_hub": ("kernels", "kernels"),
    "_flash_3_hub": ("kernels", "kernels"),
    "sage_hub": ("kernels", "kernels"),
    "flash": ("flash_attn", "flash-attn"),
    "flash_varlen": ("flash_attn", "flash-attn"),
    "_flash_3": ("flash_attn_interface", "flash-attn 3 (built from its hopper/ folder)"),
    "_flash_varlen_3": ("flash_attn_interface", "flash-attn 3 (built from its hopper/ folder)"),
    "sage": ("sageattention", "sageattention"),
    "sage_varlen": ("sageattention", "sageattention"),
    "_sage_qk_int8_pv_fp16_triton": ("sageattention", "sageattention"),
    "_sage_qk_int8_pv_fp16_cuda": ("sageattention", "sageattention"),
    "_sage_qk_int8_pv_fp8_cuda": ("sageattention", "sageattention"),
    "xformers": ("xformers", "xformers"),
}
#: backends whose kernels exist on CUDA only (the CPU has math and flash SDPA kernels; flex has no CPU backward)
_CUDA_ONLY = {*_PACKAGES, "_native_efficient", "_native_cudnn"}


def backend_name(config: CoreOptions) -> str | None:
    return ATTENTION_BACKENDS[config.attention_mechanism]


def is_sage(config: CoreOptions) -> bool:
    return str(config.attention_mechanism).startswith("sageattention")


def for_training(config: CoreOptions) -> str | None:
    """The backend of the training forward (None: the model's own)."""
    if is_sage(config) and "training" not in config.sageattention_usage:
        return None
    return backend_name(config)


def for_validation(config: CoreOptions) -> str | None:
    if is_sage(config) and "inference" not in config.sageattention_usage:
        return None
    return backend_name(config)


def check_attention(config: CoreOptions) -> None:
    """Refuse a backend this machine cannot run, naming what it needs."""
    backend = backend_name(config)
    if backend is None:
        return
    import torch

    option = f"attention_mechanism={config.attention_mechanism}"
    if backend in _PACKAGES:
        module, install = _PACKAGES[backend]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{option} needs the {install} package; install it (`pip install {install}`).")
    if backend in _CUDA_ONLY and not torch.cuda.is_available():
        raise ConfigError(f"{option} runs only on a CUDA GPU, which this machine lacks; use native or native-math.")
    if backend == "flex" and not torch.cuda.is_available() and "training" in _usage(config):
        raise ConfigError(f"{option} has no backward pass on the CPU; train with native, or use a CUDA GPU.")


def _usage(config: CoreOptions) -> str:
    return config.sageattention_usage if is_sage(config) else "training+inference"


def _supports_backends(model: Any) -> bool:
    """Whether the model's attention processors dispatch through diffusers' backends (FLUX's do;
    models whose processors call scaled_dot_product_attention themselves ignore the setting)."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in model.modules())


def apply_attention(transformer: torch.nn.Module, config: CoreOptions) -> None:
    """Set the training forward's backend on the transformer's attention processors."""
    backend = backend_name(config)
    if backend is None:
        return
    if not _supports_backends(transformer):
        if backend == "native":
            return  # such processors already call torch's scaled_dot_product_attention
        raise ConfigError(
            f"attention_mechanism={config.attention_mechanism}: the {type(transformer).__name__} attention "
            "processors do not take diffusers' attention backends; use diffusers or native."
        )
    if is_sage(config):
        if "training" in config.sageattention_usage:
            log.warning(
                "SageAttention has no backward pass: no gradient flows through attention in the training forward "
                "(sageattention_usage=%s); adapters before it learn from the residual paths only.",
                config.sageattention_usage,
            )
        else:
            return  # validation only: see validation_attention
    training = for_training(config)
    assert training is not None
    _set_backend(transformer, training)
    log.info("attention backend %s (%s)", training, config.attention_mechanism)


def _active() -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return str(_AttentionBackendRegistry.get_active_backend()[0].value)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def validation_attention(config: CoreOptions, transformer: Any) -> Iterator[None]:
    """While validation images render: the backend for inference (SageAttention's home)."""
    training, validation = for_training(config), for_validation(config)
    if validation == training or not _supports_backends(transformer):
        yield  # the processors already carry it
        return
    from diffusers import attention_backend

    if training is not None:  # the processors carry the training backend: switch them meanwhile
        _set_backend(transformer, validation or "native")
        try:
            yield
        finally:
            _set_backend(transformer, training)
        return
    assert validation is not None
    with attention_backend(validation):  # type: ignore[no-untyped-call]
        yield


def _set_backend(transformer: Any, backend: str) -> None:
    from diffusers import attention_backend

    # set_attention_backend also makes the backend the process-wide default; the context puts the
    # previous default back, so other models in this process are not switched.
    with attention_backend(_active()):  # type: ignore[no-untyped-call]
        transformer.set_attention_backend(backend)
