"""Build optimum-quanto's extensions once per environment: ``python -m stune_quant.warmup``.

int4-quanto and int2-quanto unpack their weights with a C++ extension (CUDA on a GPU machine) that
optimum-quanto compiles the first time it is used, which takes a minute or two and needs a C++
compiler and ninja (and nvcc for CUDA). Run this after installing, so no training run (or CI job)
pays for it; it is a no-op once built for the installed torch.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from stune_quant import quiet

    quiet.install()
    import torch

    from stune_quant.quantizers import quanto_extension_built, quanto_toolchain_missing

    try:
        from optimum.quanto.library.extensions import get_extension
    except ImportError:
        print("optimum-quanto is not installed; nothing to build (pip install 'stune-quant[quanto]').")
        return 0
    names = ["quanto_cpp"] + (["quanto_cuda"] if torch.cuda.is_available() and torch.version.cuda else [])
    for name in names:
        if quanto_extension_built(name):
            print(f"{name}: already built for torch {torch.__version__}")
            continue
        missing = quanto_toolchain_missing(name)
        if missing:  # not an installation failure: only int4/int2-quanto need it, and they say so
            print(f"{name}: cannot be built here ({missing} not found); int4/int2-quanto will be refused.")
            continue
        started = time.perf_counter()
        get_extension(name).lib  # noqa: B018  (loading the library compiles it)
        print(f"{name}: built in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
