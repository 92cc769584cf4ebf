"""Interrupted runs: SIGKILL between or during checkpoints, and resume continuing the same run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, offline_env, run_cli, write_run
from stune.train import train

SLOW_PLUGIN = str(Path(__file__).with_name("slow_steps.py"))


def _run_folder(folder: Path, model: Path, **options: Any) -> Path:
    make_images(folder / "data", 4, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 24,
        "train_batch_size": 2,
        "learning_rate": "1e-3",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 3,
        "checkpoint_step_interval": 4,
        "checkpoints_total_limit": 10,
        "validation_step_interval": 0,
        **options,
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def _start(run: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stune.cli", "--plugin", "flux", "--plugin", SLOW_PLUGIN],
        cwd=run,
        env=offline_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(condition: Any, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_between_checkpoints_resumes_from_latest(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir)
    proc = _start(run, {"STUNE_TEST_STEP_SLEEP": "0.15"})
    _wait_for(lambda: (run / "output" / "checkpoint-8" / "checkpoint_complete.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_steps(run)) < 24
    latest = max(int(p.name.split("-")[1]) for p in (run / "output").glob("checkpoint-*"))
    assert latest >= 8

    resumed = run_cli(["--plugin", "flux"], cwd=run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from output/checkpoint-{latest} at step {latest}" in resumed.stderr
    assert _steps(run) == list(range(1, 25))  # lost steps are replaced, none duplicated


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir)
    flag = tmp_path / "stalled"
    proc = _start(run, {"STUNE_TEST_STALL_SAVE_AT": "8", "STUNE_TEST_STALL_FLAG": str(flag)})
    _wait_for(flag.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    output = run / "output"
    assert list(output.glob(".checkpoint-8.tmp*"))  # the half-written checkpoint is left behind
    assert not (output / "checkpoint-8").exists()

    resumed = run_cli(["--plugin", "flux"], cwd=run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from output/checkpoint-4 at step 4" in resumed.stderr
    assert not list(output.glob(".checkpoint-*"))  # cleaned up by the next save
    assert _steps(run) == list(range(1, 25))


def test_stopped_and_resumed_equals_uninterrupted(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _run_folder(tmp_path / "whole", tiny_flux_dir, max_train_steps=8, caption_dropout_probability=0.3)
    monkeypatch.chdir(whole)
    train(prepare(host=PluginHost.build(["flux"])))

    split = _run_folder(tmp_path / "split", tiny_flux_dir, max_train_steps=8, caption_dropout_probability=0.3)
    monkeypatch.chdir(split)
    first = train(prepare(overrides={"max_train_steps": "4"}, host=PluginHost.build(["flux"])))
    assert first.final_step == 4
    second = train(prepare(host=PluginHost.build(["flux"])))
    assert second.final_step == 8

    a = load_file(str(whole / "output" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "output" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)


def test_sigkill_while_caching_leaves_no_corrupt_entry(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir, text_encoder_batch_size=1)
    flag = tmp_path / "stalled"
    proc = _start(run, {"STUNE_TEST_STALL_CAPTIONS": "2", "STUNE_TEST_STALL_FLAG": str(flag)})
    _wait_for(flag.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cached = list((run / "cache" / "text").glob("*.safetensors"))
    assert len(cached) == 1  # the first caption was written; the second was in the encoder's hands
    assert all(load_file(str(p)) for p in cached)  # nothing half-written under a real name
    resumed = run_cli(["--plugin", "flux"], cwd=run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "caches: 0 latents and 4 captions to encode" in resumed.stderr  # 4 captions + "" minus the one kept
    assert not list((run / "cache").rglob("*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(
    signum: signal.Signals, tmp_path: Path, tiny_flux_dir: Path
) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir, checkpoint_step_interval=100)
    proc = _start(run, {"STUNE_TEST_STEP_SLEEP": "0.2"})
    _wait_for(lambda: (run / "output" / "metrics.jsonl").is_file() and len(_steps(run)) >= 3, proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out[-3000:]
    assert "Traceback" not in out
    assert "stopped by signal" in out
    stopped_at = max(_steps(run))
    assert (run / "output" / f"checkpoint-{stopped_at}" / "checkpoint_complete.json").is_file()
    assert not (run / "output" / "pytorch_lora_weights.safetensors").exists()  # not finished: no final export
    resumed = run_cli(["--plugin", "flux"], cwd=run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from output/checkpoint-{stopped_at} at step {stopped_at}" in resumed.stderr
    assert _steps(run) == list(range(1, 25))


def test_non_finite_loss_stops_naming_the_step_and_files(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _run_folder(tmp_path, tiny_flux_dir, learning_rate="1e30", max_train_steps=50, checkpoint_step_interval=1)
    proc = run_cli(["--plugin", "flux"], cwd=run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"loss became (nan|inf) at step \d+ \(batch: .*image_\d+\.png", message), message
    assert "Traceback" not in proc.stderr
    assert list((run / "output").glob("checkpoint-*"))  # the last good checkpoints stay
