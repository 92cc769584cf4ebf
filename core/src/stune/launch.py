"""``num_processes`` above 1 in the config: ``st-train`` relaunches itself through ``accelerate
launch``, so nobody has to type the launcher. The child processes get the same arguments; they see
the launcher's environment (``WORLD_SIZE``…) and train instead of relaunching again.

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stune.config import CoreOptions

log = logging.getLogger("stune.launch")
#: set in the children, so that a launcher that does not export WORLD_SIZE cannot make them relaunch
LAUNCHED = "STUNE_LAUNCHED"


def launched() -> bool:
    """Whether this process already runs under a launcher (accelerate, torchrun, mpirun, or us)."""
    keys = (LAUNCHED, "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    return any(key in os.environ for key in keys)


def wants_relaunch(config: CoreOptions) -> bool:
    return config.num_processes > 1 and not launched()


def launch_command(config: CoreOptions, argv: Sequence[str]) -> list[str]:
    """``python -m accelerate.commands.launch <topology> -m stune.cli train <argv>``; ``num_processes`` is
    the total over all machines, as in accelerate's own config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.accelerate_config:  # the file chooses the launcher (multi-GPU, DeepSpeed, FSDP, …)
        cmd += ["--config_file", config.accelerate_config]
    else:
        # --multi_gpu means "torch.distributed processes": on a machine without GPUs they form a gloo
        # group on the CPU (--cpu would make accelerate use mpirun instead).
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(config.num_processes), "--num_machines", str(config.num_machines)]
    if config.num_machines > 1:
        cmd += ["--machine_rank", str(config.machine_rank), "--main_process_ip", str(config.main_process_ip)]
    if config.main_process_port:
        cmd += ["--main_process_port", str(config.main_process_port)]
    if not config.accelerate_config:
        # The run builds its own Accelerator (precision, FSDP, compilation) from the config.
        cmd += ["--mixed_precision", config.mixed_precision, "--dynamo_backend", "no"]
    cmd += shlex.split(config.accelerate_extra_args or "")
    return [*cmd, "-m", "stune.cli", "train", *argv]


def relaunch(config: CoreOptions, argv: Sequence[str]) -> int:
    """Run the training under accelerate; returns its exit status."""
    cmd = launch_command(config, argv)
    log.info("relaunching with accelerate: %s", shlex.join(cmd))
    env = {**os.environ, LAUNCHED: "1"}
    return subprocess.run(cmd, env=env, check=False).returncode
