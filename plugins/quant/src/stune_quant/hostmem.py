"""Host memory while a loaded model is quantized in place, measured as the process's RSS.

diffusers and transformers load safetensors checkpoints without copying: every weight is a view
into the file mapped in memory, and costs nothing until it is read. Quantizing reads each weight
(its pages of the mapping become resident and count in the RSS) and writes the quantized copy
(anonymous memory). The mapping lives until the last tensor viewing it dies — the norms and biases
that are never quantized keep it alive to the end — so without help the RSS ends at the whole
checkpoint *plus* the quantized model (2× the bf16 size at int8; SimpleTuner's "50 GB to quantize
FLUX"), and glibc keeps the freed scratch of each quantized layer in its heap on top.

After each layer :func:`release` hands back the pages of the weights it replaced (``madvise
MADV_DONTNEED`` on the whole pages of their ranges, only inside mappings of checkpoint files: clean
file pages, re-read from the file if ever touched again; the caller leaves out storages another
tensor shares) and trims glibc's heap. Peak host memory is then the quantized model plus one layer. Both are Linux/glibc
facilities; elsewhere they do nothing and only the RSS is higher.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
Range = tuple[int, int]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


def ranges(tensors: Iterable[torch.Tensor]) -> list[Range]:
    """(start, end) byte addresses of the plain CPU tensors' storages (quantized tensors are skipped)."""
    import torch

    out = []
    for tensor in tensors:
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        if type(data) is torch.Tensor and data.device.type == "cpu":
            storage = data.untyped_storage()
            out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return out


def live_ranges(module: torch.nn.Module) -> list[Range]:
    """Every CPU storage the module's parameters and buffers use, inside quantized tensors too."""
    import torch

    out: list[Range] = []

    def visit(tensor: torch.Tensor) -> None:
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            out.extend(ranges([tensor]))
        elif hasattr(tensor, "__tensor_flatten__"):  # a quantized tensor: look at what it holds
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                visit(getattr(tensor, name))

    for tensor in (*module.parameters(), *module.buffers()):
        visit(tensor.data if type(tensor) is torch.nn.Parameter else tensor)
    return sorted(out)


def release_unused(module: torch.nn.Module) -> int:
    """After a load-time quantization (diffusers quantizes each weight as it loads it), give back
    the pages of the module's checkpoint mappings that none of its tensors uses any more. Mappings
    holding none of its tensors belong to other components and are left alone."""
    if _LIBC is None:
        return 0
    live = live_ranges(module)
    freed = 0
    for start, end in _checkpoint_mappings():
        inside = [(a, b) for a, b in live if a < end and start < b]
        if not inside:
            continue
        cursor = start
        for a, b in [*inside, (end, end)]:
            first, last = -(-cursor // _PAGE) * _PAGE, a // _PAGE * _PAGE
            if last > first and _LIBC.madvise(first, last - first, _MADV_DONTNEED) == 0:
                freed += last - first
            cursor = max(cursor, b)
    trim_heap()
    return freed


def _checkpoint_mappings() -> list[Range]:
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip().endswith(_CHECKPOINT_SUFFIXES):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append((start, end))
    except OSError:
        pass
    return found


def release(replaced: list[Range]) -> int:
    """Give back the resident pages of ``replaced`` storages (no longer used by anything) that lie in
    checkpoint mappings, then trim the heap. Returns the bytes advised away."""
    if _LIBC is None:
        return 0
    freed = 0
    mappings = _checkpoint_mappings() if replaced else []
    for start, end in replaced:
        first = -(-start // _PAGE) * _PAGE  # whole pages inside the range only
        last = end // _PAGE * _PAGE
        if last <= first or not any(a <= first and last <= b for a, b in mappings):
            continue
        if _LIBC.madvise(first, last - first, _MADV_DONTNEED) == 0:
            freed += last - first
    trim_heap()
    return freed


def trim_heap() -> None:
    """Return glibc's free heap memory to the system (a no-op without glibc)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
