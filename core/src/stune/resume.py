"""Checkpoints of a run: what goes into them, and resuming from one exactly.

The main process writes the adapter (in its loadable format, through the ``save_adapter`` hook),
the EMA weights, the optimizer and schedule, the counters and every feature's state; every
process writes its own random streams (the global generators, the noise generator and each
feature's generator), so a resumed run draws exactly what the uninterrupted one would have.
:mod:`stune.checkpoint` makes the folder appear whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stune import checkpoint, diskguard, sharding
from stune.run import Run

log = logging.getLogger("stune.train")
EMA_STATE = "ema_state.safetensors"
#: the adapter's tensors that its loadable format does not hold as they are (Adapter.resume_state)
ADAPTER_STATE = "adapter_state.safetensors"


def save_adapter(run: Run, folder: Path) -> list[Path]:
    assert run.adapter is not None
    folder.mkdir(parents=True, exist_ok=True)
    paths = run.session.host.hooks.save_adapter(
        family=run.session.family,
        transformer=run.accelerator.unwrap_model(run.transformer),
        adapter=run.adapter,
        output_dir=folder,
        config=run.session.config,
    )
    comment = run.session.config.modelspec_comment
    if comment is not None:
        text = modelspec_text(comment, step=run.state.global_step, model_family=run.session.config.model_family)
        for path in paths:  # a full fine-tune returns its diffusers folder: every weight file in it
            for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
                if file.suffix == ".safetensors":
                    add_metadata(file, {MODELSPEC_COMMENT: text})
    return paths


#: the safetensors metadata key of SimpleTuner's (and the Stability modelspec's) free-text comment
MODELSPEC_COMMENT = "modelspec.comment"


def modelspec_text(template: str, *, step: int, model_family: str | None) -> str:
    """``template`` with {current_step}, {model_family} and {env:NAME} filled in (an unset variable is empty)."""
    import os
    import re

    text = re.sub(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: os.environ.get(m.group(1), ""), template)
    return text.replace("{current_step}", str(step)).replace("{model_family}", model_family or "")


def add_metadata(path: Path, entries: dict[str, str]) -> None:
    """Rewrite the safetensors file ``path`` with ``entries`` added to its header metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**metadata, **entries})


def gather_weights(run: Run) -> dict[str, torch.Tensor] | None:
    """Sharded runs: every weight gathered whole for saving (all processes call this); else None."""
    if run.sharded == "fsdp2":
        return sharding.full_state_dict(run.transformer)
    if run.sharded == "engine":
        gathered: dict[str, torch.Tensor] = run.accelerator.get_state_dict(run.transformer)
        return gathered
    return None


@contextlib.contextmanager
def saving_from(run: Run, gathered: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The adapter writes ``gathered`` (sharded runs) instead of reading its sharded modules."""
    assert run.adapter is not None
    run.adapter.gathered = gathered
    try:
        yield
    finally:
        run.adapter.gathered = None


def save_checkpoint(run: Run, rolling: bool = False) -> Path:
    """Write ``checkpoint-<step>`` (``rolling``: ``checkpoint-<step>-rolling``, kept to
    checkpoints_rolling_total_limit), once the disk guard has found space for it."""
    state, features = run.state, run.session.features
    assert run.noise_generator is not None and run.placement is not None
    sharded: dict[str, Any] = {}  # what the sharded weights and optimizer gave, for the main process

    def write(folder: Path) -> None:  # main process
        with saving_from(run, sharded.get("weights")):
            save_adapter(run, folder)
        exact = run.adapter.resume_state() if run.adapter is not None else {}
        if exact:
            save_file(exact, str(folder / ADAPTER_STATE))
        if run.ema is not None:
            save_file(run.ema.state_dict(), str(folder / EMA_STATE))
        checkpoint.write_state(
            folder,
            {
                "seed": run.seed,
                "state": state.to_json(),
                "optimizer": sharded["optimizer"] if sharded else run.optimizer.state_dict(),
                "optimizer_format": sharded.get("format", sharding.PLAIN),
                "lr_scheduler": run.lr_scheduler.state_dict(),
                "features": {f.name: f.state_dict() for f in features},
            },
        )
        (folder / "training_state.json").write_text(json.dumps({"seed": run.seed, **state.to_json()}, indent=2))

    def write_each(folder: Path) -> None:  # every process: its own random streams (and its shards)
        if run.sharded is not None:
            sharded["weights"] = gather_weights(run)
            fmt, optimizer = sharding.save_optimizer(run.transformer, run.optimizer, folder, run.session.config)
            sharded.update(format=fmt, optimizer=optimizer)
        own = {
            "rng": checkpoint.capture_rng(),
            "noise_generator": run.noise_generator.get_state(),  # type: ignore[union-attr]
            "features": {f.name: f.generator.get_state() for f in features},
        }
        checkpoint.write_state(folder, own, checkpoint.rng_file(run.processes.rank))

    config = run.session.config
    name = f"{checkpoint.PREFIX}{state.global_step}{checkpoint.ROLLING if rolling else ''}"
    diskguard.ensure_space(config, run.output_dir, name, run.processes)
    keep = config.checkpoints_rolling_total_limit if rolling else config.checkpoints_total_limit
    resident = run.residency is None and run.sharded is None  # offload_during_save moves whole models only
    with run.placement.transformer_saving(run.accelerator.unwrap_model(run.transformer), resident):
        path = checkpoint.save(run.output_dir, state.global_step, write, keep, run.processes, write_each, rolling)
    run.session.host.hooks.on_checkpoint_saved(state=state, path=path)
    if config.post_checkpoint_script and run.accelerator.is_main_process:
        from stune import scripts

        placeholders = scripts.values(config, local_checkpoint_path=path.resolve(), global_step=state.global_step)
        scripts.start("post_checkpoint_script", config.post_checkpoint_script, placeholders)
    return path


def resume(run: Run) -> None:
    if run.resume_from is None or run.resumed is None:
        return
    assert run.adapter is not None and run.noise_generator is not None
    if run.sharded != "fsdp2":  # an FSDP2 run loaded its adapter before sharding (stune.preparation)
        run.adapter.load(run.resume_from)
    if (run.resume_from / ADAPTER_STATE).is_file():
        run.adapter.load_resume_state(load_file(str(run.resume_from / ADAPTER_STATE)))
    if run.ema is not None and (run.resume_from / EMA_STATE).is_file():
        run.ema.load_state_dict(load_file(str(run.resume_from / EMA_STATE)))
    fmt = run.resumed.get("optimizer_format", sharding.PLAIN)
    if fmt == sharding.PLAIN and run.sharded is None:
        run.optimizer.load_state_dict(run.resumed["optimizer"])
    else:  # written sharded, or read into a sharded run: by parameter name
        model = run.accelerator.unwrap_model(run.transformer) if run.sharded is None else run.transformer
        sharding.load_optimizer(model, run.optimizer, run.resume_from, fmt, run.resumed["optimizer"])
    run.lr_scheduler.load_state_dict(run.resumed["lr_scheduler"])
    for feature in run.session.features:
        feature.load_state_dict(run.resumed.get("features", {}).get(feature.name, {}))
    own = checkpoint.read_state(run.resume_from, checkpoint.rng_file(run.processes.rank))
    if own is not None:
        checkpoint.restore_rng(own["rng"])
        run.noise_generator.set_state(own["noise_generator"].to(run.noise_generator.get_state().device))
        for feature in run.session.features:
            saved = own.get("features", {}).get(feature.name)
            if saved is not None:
                feature.generator.set_state(saved.to(feature.generator.get_state().device))
    else:  # resumed with more processes than were saved: a fresh, still deterministic stream
        log.warning(
            "no random state for process %d in %s; noise continues from a new seed", run.processes.rank, run.resume_from
        )
        run.noise_generator.manual_seed(run.seed + 7919 * run.processes.rank + run.resumed["state"]["global_step"])
    run.state.restore(run.resumed["state"])
    log.info("resumed from %s at step %d", run.resume_from, run.state.global_step)
