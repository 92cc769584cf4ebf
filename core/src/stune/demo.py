"""``st-train demo``: a family plugin builds a tiny model, a small dataset and a config; we train on it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from stune.errors import UserError
from stune.family import ModelFamily
from stune.plugins import PluginHost


def _has_demo(family: type[ModelFamily]) -> bool:
    return family.build_demo.__func__ is not ModelFamily.build_demo.__func__  # type: ignore[attr-defined]


def run_demo(plugins: Sequence[str] | None, workdir: str | Path, steps: int | None) -> int:
    host = PluginHost.build(plugins)
    candidates = [f for name, f in sorted(host.families.items()) if _has_demo(f)]
    if not candidates:
        raise UserError("No installed model family plugin ships a demo; install one (see `st-train plugins`).")
    family_cls = candidates[0]
    workdir = Path(workdir).resolve()
    print(
        f"stune demo: a tiny {family_cls.name} model and dataset under {workdir} (the first time, its VAE and "
        "base transformer are trained on generated shapes: a few minutes) …",
        flush=True,
    )
    from stune.cli import _setup_logging
    from stune.session import prepare
    from stune.train import train

    _setup_logging()  # before the build: it logs the VAE's and the base transformer's training
    config_path = family_cls.build_demo(workdir)
    # The demo always trains from scratch; a second `make demo` is a new run, not a resume.
    overrides = {"resume_from_checkpoint": "none", **({"max_train_steps": str(steps)} if steps else {})}
    logging.getLogger("stune").info("config: %s", config_path)
    session = prepare(plugins, config_path, overrides, host=host)
    result = train(session)
    out = result.output_dir.resolve()
    lines = [
        "",
        f"stune demo finished: {result.final_step} steps of a {family_cls.name} LoRA.",
        f"  LoRA:              {', '.join(str(p.resolve()) for p in result.adapter_files)}",
        f"  checkpoints:       {', '.join(str(p.resolve()) for p in result.checkpoints if p.exists()) or '(none)'}",
        f"  report:            {out / 'report.html'}  (loss curves and the validation images over the steps)",
        f"  validation images: {out / 'validation_images'}",
        f"  metrics:           {out / 'metrics.jsonl'}",
        f"  config:            {config_path}",
    ]
    example = session.family.loading_example(out)
    if example:
        lines += ["", "Load the LoRA in diffusers:", "", example]
    print("\n".join(lines))
    return 0
