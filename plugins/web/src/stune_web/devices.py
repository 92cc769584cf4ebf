"""Which devices a run uses: the FLUX quickstart's Auto / Manual / Disabled multi-GPU modes.

* **auto**: every detected GPU, one process each;
* **manual**: the chosen GPUs (``CUDA_VISIBLE_DEVICES``), one process each or a chosen count;
* **disabled**: one GPU, one process;
* **cpu**: no GPU detected (or none wanted): the CPU, one process unless more are asked for
  (they form a gloo group).

More than one process means ``--num_processes=N`` on ``st-train``, which relaunches itself through
``accelerate launch``. GPUs are listed with ``nvidia-smi``; without it (ROCm, or a server started
with its own ``CUDA_VISIBLE_DEVICES``), with torch in a child process, so the server never imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from stune.errors import UserError

MODES = ("auto", "manual", "disabled", "cpu")

_TORCH_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([{'index': i, 'name': torch.cuda.get_device_name(i), "
    "'memory_mb': torch.cuda.get_device_properties(i).total_memory // 2**20} for i in range(n)]))\n"
)


@dataclass
class Placement:
    """What a run is started with: extra environment and the number of processes."""

    mode: str
    processes: int
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "processes": self.processes, "env": self.env, "description": self.description}


def detect_gpus() -> tuple[list[dict[str, Any]], str]:
    """The GPUs a run can use, and how they were found."""
    smi = shutil.which("nvidia-smi")
    if smi and "CUDA_VISIBLE_DEVICES" not in os.environ:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            gpus = []
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 3 and parts[0].isdigit():
                    gpus.append({"index": int(parts[0]), "name": parts[1], "memory_mb": _int(parts[2])})
            return gpus, "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120, check=True
        )
        return list(json.loads(proc.stdout.strip().splitlines()[-1])), "torch"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return [], "none"


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def placement(
    mode: str, gpus: list[dict[str, Any]], chosen: list[int] | None = None, processes: int | None = None
) -> Placement:
    """The environment and process count for a device mode; a choice that cannot run is a UserError."""
    indices = [int(g["index"]) for g in gpus]
    chosen = list(chosen or [])
    if processes is not None and processes < 1:
        raise UserError("The number of processes must be 1 or more.")
    if mode not in MODES:
        raise UserError(f"Unknown device mode `{mode}`; choose one of {', '.join(MODES)}.")
    if mode != "cpu" and not indices:
        raise UserError("No GPU was detected on this machine; choose the CPU.")
    unknown = [i for i in chosen if i not in indices]
    if unknown:
        raise UserError(f"GPU {unknown[0]} is not among the detected GPUs ({', '.join(map(str, indices))}).")
    if mode == "cpu":
        count = processes or 1
        # An empty CUDA_VISIBLE_DEVICES hides any GPU: "cpu" means the CPU even where GPUs exist.
        env = {"CUDA_VISIBLE_DEVICES": ""} if indices else {}
        return Placement("cpu", count, env, f"the CPU, {count} process{'es' if count > 1 else ''}")
    if mode == "auto":
        return Placement("auto", len(indices), {}, f"all {len(indices)} GPUs, one process each")
    if mode == "disabled":
        gpu = chosen[0] if chosen else indices[0]
        return Placement("disabled", 1, {"CUDA_VISIBLE_DEVICES": str(gpu)}, f"GPU {gpu} only, one process")
    if not chosen:
        raise UserError("Manual mode needs at least one GPU chosen.")
    count = processes or len(chosen)
    if count > len(chosen):
        raise UserError(f"{count} processes need {count} GPUs; {len(chosen)} are chosen.")
    visible = ",".join(str(i) for i in chosen)
    return Placement("manual", count, {"CUDA_VISIBLE_DEVICES": visible}, f"GPUs {visible}, {count} processes")
