"""Checkpoints of a run: what goes into them, and resuming from one exactly.

The main process writes the adapter (in its loadable format, through the ``save_adapter`` hook),
the EMA weights, the optimizer and schedule, the counters and every feature's state; every
process writes its own random streams (the global generators, the noise generator and each
feature's generator), so a resumed run draws exactly what the uninterrupted one would have.
:mod:`stune.checkpoint` makes the folder appear whole or not at all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import load_file, save_file

from stune import checkpoint
from stune.run import Run

log = logging.getLogger("stune.train")
EMA_STATE = "ema_state.safetensors"


def save_adapter(run: Run, folder: Path) -> list[Path]:
    assert run.adapter is not None
    folder.mkdir(parents=True, exist_ok=True)
    return run.session.host.hooks.save_adapter(
        family=run.session.family,
        transformer=run.accelerator.unwrap_model(run.transformer),
        adapter=run.adapter,
        output_dir=folder,
        config=run.session.config,
    )


def save_checkpoint(run: Run) -> Path:
    state, features = run.state, run.session.features
    assert run.noise_generator is not None

    def write(folder: Path) -> None:  # main process
        save_adapter(run, folder)
        if run.ema is not None:
            save_file(run.ema.state_dict(), str(folder / EMA_STATE))
        checkpoint.write_state(
            folder,
            {
                "seed": run.seed,
                "state": state.to_json(),
                "optimizer": run.optimizer.state_dict(),
                "lr_scheduler": run.lr_scheduler.state_dict(),
                "features": {f.name: f.state_dict() for f in features},
            },
        )
        (folder / "training_state.json").write_text(json.dumps({"seed": run.seed, **state.to_json()}, indent=2))

    def write_each(folder: Path) -> None:  # every process: its own random streams
        own = {
            "rng": checkpoint.capture_rng(),
            "noise_generator": run.noise_generator.get_state(),  # type: ignore[union-attr]
            "features": {f.name: f.generator.get_state() for f in features},
        }
        checkpoint.write_state(folder, own, checkpoint.rng_file(run.processes.rank))

    config = run.session.config
    path = checkpoint.save(
        run.output_dir, state.global_step, write, config.checkpoints_total_limit, run.processes, write_each
    )
    run.session.host.hooks.on_checkpoint_saved(state=state, path=path)
    return path


def resume(run: Run) -> None:
    if run.resume_from is None or run.resumed is None:
        return
    assert run.adapter is not None and run.noise_generator is not None
    run.adapter.load(run.resume_from)
    if run.ema is not None and (run.resume_from / EMA_STATE).is_file():
        run.ema.load_state_dict(load_file(str(run.resume_from / EMA_STATE)))
    run.optimizer.load_state_dict(run.resumed["optimizer"])
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
