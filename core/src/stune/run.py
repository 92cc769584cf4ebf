"""A training run's shared state (:class:`Run`) and its first phase, :func:`setup`.

The phases in :mod:`stune.train` hand each other one :class:`Run`: what was loaded, the model and
its optimizer, the counters. Nothing here is heavy to import beyond torch.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stune import checkpoint
from stune.adapters import Adapter
from stune.data.loader import BatchPlan
from stune.data.prepare import PreparedData
from stune.distributed import Processes
from stune.ema import EMA
from stune.family import Components
from stune.offload import Placement, Residency
from stune.session import Session
from stune.state import TrainState
from stune.step import FlowStep, Predictor
from stune.tracking import Trackers


@dataclass
class TrainResult:
    output_dir: Path
    adapter_files: list[Path]
    final_step: int
    checkpoints: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    encoded_latents: int = 0
    encoded_captions: int = 0
    interrupted: int | None = None  # the signal that stopped the run early (a checkpoint was saved)


@dataclass
class Run:
    """What the phases hand each other."""

    session: Session
    accelerator: Any
    processes: Processes
    seed: int
    resume_from: Path | None
    resumed: dict[str, Any] | None
    output_dir: Path
    started: float
    result: TrainResult
    # data
    components: Components | None = None
    data: PreparedData | None = None
    # model
    transformer: Any = None
    adapter: Adapter | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    ema: EMA | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    plan: BatchPlan | None = None
    max_steps: int = 0
    state: TrainState = field(default_factory=TrainState)
    noise_generator: torch.Generator | None = None
    flow: FlowStep | None = None
    predictor: Predictor | None = None
    trackers: Trackers | None = None
    # memory: where modules are (text encoders, VAE), blocks moved in and out, sharding
    placement: Placement | None = None
    residency: Residency | None = None
    #: "fsdp2" (torch fully_shard, stune.sharding), "engine" (FSDP 1 / DeepSpeed through accelerate) or None
    sharded: str | None = None


def _accelerator(mixed_precision: str, **plugins: Any) -> Any:
    """An Accelerator for this run. accelerate keeps its precision in a process-wide singleton;
    a second run in the same process (tests, notebooks) may ask for another precision, so that
    part is cleared first. The process-group part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # accelerate only builds a multi-process CPU (gloo) group when told the run is on the CPU.
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision, cpu=no_gpu and multi, **plugins)


def setup(session: Session) -> Run:
    from accelerate.utils import set_seed

    from stune.sharding import accelerate_plugins
    from stune.speed import set_process_options

    config = session.config
    set_process_options(config)
    accelerator = _accelerator(config.mixed_precision, **accelerate_plugins(config, []))
    output_dir = Path(config.output_dir)
    resume_from = checkpoint.resolve_resume(output_dir, config.resume_from_checkpoint)
    resumed = checkpoint.read_state(resume_from) if resume_from else None
    # A run without a seed picks one and records it, so a resumed run replays the same batches.
    seed = int(resumed["seed"]) if resumed else (config.seed if config.seed is not None else random.randrange(2**31))
    set_seed(seed)
    run = Run(
        session=session,
        accelerator=accelerator,
        processes=Processes(accelerator.process_index, accelerator.num_processes, accelerator),
        seed=seed,
        resume_from=resume_from,
        resumed=resumed,
        output_dir=output_dir,
        started=time.perf_counter(),
        result=TrainResult(output_dir, [], 0),
    )
    run.placement = Placement(accelerator.device, config)
    return run


def peak_memory_mb(device: torch.device) -> float:
    """The most memory the run has held so far: allocated on the accelerator, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_summary(run: Run) -> dict[str, Any]:
    """What the report page says about the run itself (``run.json``)."""
    config, family, host = run.session.config, run.session.family, run.session.host
    if config.model_type == "full":
        adapter = "full fine-tune"
    elif config.lora_type == "lycoris":
        adapter = f"LyCORIS ({config.lycoris_config})"
    else:
        adapter = f"LoRA rank {config.lora_rank}, alpha {config.effective_lora_alpha:g}"
    keys = (
        "learning_rate",
        "optimizer",
        "lr_scheduler",
        "train_batch_size",
        "gradient_accumulation_steps",
        "mixed_precision",
        "resolution",
        "seed",
        "base_model_precision",
        "caption_dropout_probability",
    )
    return {
        "family": family.name,
        "flavour": family.flavour,
        "model": family.model_path(),
        "adapter": adapter,
        "features": [f.name for f in run.session.features],
        "plugins": [p["name"] for p in host.listing()],
        "options": {k: getattr(config, k) for k in keys if hasattr(config, k)},
        "max_steps": run.max_steps,
        "memory_kind": "CUDA allocated" if run.accelerator.device.type == "cuda" else "host RSS",
        "loading_example": family.loading_example(run.output_dir),
    }
