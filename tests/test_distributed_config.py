"""Several processes from config.json alone: `num_processes: 2` makes `st-train` relaunch itself
through accelerate (no launcher typed), and `fsdp_enable` shards the transformer with FSDP2 over
two CPU processes (gloo); its checkpoints resume under FSDP and in a single process."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stune.testing import make_images, run_cli, write_run


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_folder(folder: Path, model: Path, **options: Any) -> Path:
    if not (folder / "data").is_dir():
        make_images(folder / "data", 8, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 4,
        "train_batch_size": 1,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 5,
        "checkpoint_step_interval": 2,
        "validation_step_interval": 0,
        "num_processes": 2,
        "main_process_port": _port(),
        **options,
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def _train(run: Path) -> str:
    proc = run_cli(["--plugin", "flux"], cwd=run, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]


def _optimizer_steps(checkpoint: Path) -> set[float]:
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    return {float(s["step"]) for s in state["optimizer"]["state"].values()}


def test_num_processes_in_the_config_runs_two_processes(tmp_path: Path, tiny_flux_dir: Path) -> None:
    log = _train(_run_folder(tmp_path, tiny_flux_dir))
    assert "relaunching with accelerate" in log and "--num_processes 2" in log
    shares = re.search(r"caches filled: 8 latents and \d+ captions encoded \(per process: (.*)\)", log)
    assert shares and len(eval(shares.group(1))) == 2, log[-3000:]  # each process encoded its share
    assert "4 batches per epoch" in log  # 8 samples, batch 1, two processes
    assert _steps(tmp_path) == [1, 2, 3, 4] and log.count("done: 4 steps") == 1


def test_fsdp_trains_and_resumes_sharded_and_in_one_process(tmp_path: Path, tiny_flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    first = _run_folder(
        tmp_path / "fsdp",
        tiny_flux_dir,
        fsdp_enable=True,
        fsdp_cpu_ram_efficient_loading=True,
        fsdp_activation_checkpointing=True,
        validation_prompt="a picture number 2",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        validation_step_interval=2,
    )
    log = _train(first)
    assert "FSDP2: 3 sharded units over 2 processes" in log
    out = first / "output"
    assert {p.name for p in (out / "checkpoint-4" / "optimizer").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    assert len(list((out / "validation_images").glob("step-*.png"))) == 2  # rendered by both, saved once
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(out)
    assert len([k for k in pipe.transformer.state_dict() if "lora" in k]) == len(saved)

    single = tmp_path / "single"
    shutil.copytree(first, single, ignore=shutil.ignore_patterns("cache"))

    # Resumed under FSDP (sharded optimizer state), writing the gathered one this time.
    _run_folder(first, tiny_flux_dir, fsdp_enable=True, max_train_steps=6, fsdp_state_dict_type="FULL_STATE_DICT")
    log = _train(first)
    assert "resumed from output/checkpoint-4 at step 4" in log
    assert _steps(first) == [1, 2, 3, 4, 5, 6]
    assert _optimizer_steps(out / "checkpoint-6") == {6.0}  # the state went on from step 4

    # The same FSDP checkpoint resumed by one process.
    _run_folder(single, tiny_flux_dir, fsdp_enable=True, max_train_steps=6, num_processes=1)
    log = _train(single)
    assert "resumed from output/checkpoint-4 at step 4" in log and "relaunching" not in log
    assert _optimizer_steps(single / "output" / "checkpoint-6") == {6.0}
