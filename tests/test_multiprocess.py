"""Two processes on the CPU (gloo): torchrun and accelerate launch run `st-train`, split the
caching, write outputs once, and resume."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stune.testing import make_images, offline_env, write_run

ST_TRAIN = shutil.which("st-train") or str(Path(sys.executable).with_name("st-train"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_folder(folder: Path, model: Path, **options: object) -> Path:
    make_images(folder / "data", 8, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 6,
        "train_batch_size": 1,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 5,
        "checkpoint_step_interval": 3,
        "validation_prompt": "a picture number 2",
        "validation_step_interval": 3,
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        **options,
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def _launch(launcher: str, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    port = str(_port())
    if launcher == "torchrun":
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", port]
    else:
        cmd = [
            # On a machine without GPUs, --multi_gpu still means "torch.distributed processes"; st-train
            # then builds a gloo group on the CPU. (--cpu makes accelerate launch use mpirun instead.)
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
        ]
    return subprocess.run(
        [*cmd, ST_TRAIN, "--plugin", "flux", *extra],
        cwd=run,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_once_and_split_caching(launcher: str, tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir)
    proc = _launch(launcher, run)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = proc.stdout + proc.stderr
    shares = re.search(r"caches filled: 8 latents and 10 captions encoded \(per process: (.*)\)", log)
    assert shares, log[-3000:]
    assert eval(shares.group(1)) == [(4, 5), (4, 5)]  # each image and caption (+ "", negative) once, split
    assert "4 batches per epoch" in log  # 8 samples, batch 1, two processes
    out = run / "output"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # written once, by the main process
    assert all(r["samples_per_second"] > 0 for r in records)
    assert sorted(p.name for p in (out / "validation_images").iterdir()) == [
        "base-validation-64x64.png",
        "step-000003-validation-64x64.png",
        "step-000006-validation-64x64.png",
    ]
    assert {p.name for p in (out / "checkpoint-6").iterdir()} >= {"rng_state_0.pt", "rng_state_1.pt"}
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert log.count("done: 6 steps") == 1  # the second process only warns


def test_two_processes_resume(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir)
    first = _launch("torchrun", run, "--max_train_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _launch("torchrun", run)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from output/checkpoint-3 at step 3" in second.stdout + second.stderr
    steps = [json.loads(line)["step"] for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
