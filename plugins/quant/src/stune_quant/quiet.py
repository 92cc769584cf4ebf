"""Keep the quantization backends' import-time notices out of a normal run's output.

diffusers imports bitsandbytes and torchao whenever they are installed, the first time any of its
models is imported (``diffusers.quantizers.auto`` imports every backend's quantizer), so every run
would print what those imports log, although nothing is wrong and the run may not even quantize:

* torchao: "Failed to load .../torchao/_C_mxfp8...so" — its CUDA-only kernels on a CPU build of torch;
* torchao.kernel.intmm: "Detected no triton" — triton kernels are for GPUs; on a CPU build of torch
  there is nothing to miss;
* torch.utils._pytree: "<enum 'KernelPreference'> is an Enum subclass ..." — a deprecation torchao
  triggers when it registers its enums;
* bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
  — an optional faster CPU kernel whose package is not installed (the built-in one is used);
* diffusers: "Unable to import `torchao` Tensor objects" — only matters for torch.load of a checkpoint
  that torchao serialized, which stune never does.

Each is stopped by a filter on the exact logger that emits it, matching the exact message, and
logged again at DEBUG on ``stune_quant.imports``; any other record of those loggers (a real error)
passes. Installing the filters imports nothing heavy.
"""

from __future__ import annotations

import logging
import sys

_DEBUG = logging.getLogger("stune_quant.imports")


def _cpu_only_torch() -> bool:
    torch = sys.modules.get("torch")
    return (
        torch is not None and getattr(torch.version, "cuda", None) is None and not getattr(torch.version, "hip", None)
    )


def _torchao_cuda_kernel(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return message.startswith("Failed to load ") and "/torchao/_C" in message and _cpu_only_torch()


def _torchao_no_triton(record: logging.LogRecord) -> bool:
    return "Detected no triton" in str(record.msg) and _cpu_only_torch()


def _torchao_enum_deprecation(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    enum = args[0] if args else None
    return str(record.msg).startswith("%s is an Enum subclass") and getattr(enum, "__module__", "").startswith(
        "torchao"
    )


def _bnb_optional_kernels(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return (
        str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
        and bool(args)
        and isinstance(args[0], ModuleNotFoundError)
        and args[0].name == "kernels"
    )


def _diffusers_torchao_globals(record: logging.LogRecord) -> bool:
    return str(record.msg).startswith("Unable to import `torchao` Tensor objects")


_RULES = {
    "torchao": _torchao_cuda_kernel,
    "torchao.kernel.intmm": _torchao_no_triton,
    "torch.utils._pytree": _torchao_enum_deprecation,
    "bitsandbytes.backends.cpu.ops": _bnb_optional_kernels,
    "diffusers.quantizers.torchao.torchao_quantizer": _diffusers_torchao_globals,
}


class _Demote(logging.Filter):
    def __init__(self, rule: object) -> None:
        super().__init__()
        self.rule = rule

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rule(record):  # type: ignore[operator]
            _DEBUG.debug("%s: %s", record.name, record.getMessage())
            return False
        return True


def install() -> None:
    """Add the filters once (idempotent)."""
    for name, rule in _RULES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in logger.filters):
            logger.addFilter(_Demote(rule))
