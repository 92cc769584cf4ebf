"""Scheduled sampling with the rest of a run, on the toy DiT (tests/toy_family.py): exact resume,
LyCORIS, full fine-tuning, a quantized base (stune-quant), TREAD (stune-tread) and two processes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stune
import stune_rollout
from stune.testing import make_images, offline_env

from .conftest import LORA_FILE, REPO, load_toy, metrics, toy_run, train_here

LOKR = {"algo": "lokr", "factor": 4, "apply_preset": {"target_module": ["SelfAttention", "CrossAttention"]}}
ROLLOUT = {"scheduled_sampling_max_step_offset": 4, "scheduled_sampling_probability": 0.75}


def test_exact_resume_with_rollout_on(tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = load_toy()
    options = {**ROLLOUT, "checkpoint_step_interval": 2}
    straight = toy_run(tmp_path / "straight", toy_model, max_train_steps=4, **options)
    train_here(straight, [toy, stune_rollout], monkeypatch)
    halves = toy_run(tmp_path / "halves", toy_model, max_train_steps=2, **options)
    train_here(halves, [toy, stune_rollout], monkeypatch)
    train_here(halves, [toy, stune_rollout], monkeypatch, max_train_steps=4)

    a, b = load_file(str(straight / "output" / LORA_FILE)), load_file(str(halves / "output" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # interrupted or not, the same run
    first, second = metrics(straight), metrics(halves)
    assert [r["step"] for r in second] == [1, 2, 3, 4]
    keys = ("loss", "rollout/fraction", "rollout/mean_offset", "rollout/samples_rolled", "aux_loss/reflexflow_adr")
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    assert first[-1]["rollout/samples_rolled"] > 0


def test_rollout_with_lycoris_full_fine_tuning_regularisation_and_accumulation(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lycoris import create_lycoris_from_weights

    toy = load_toy()
    cases = {
        "lycoris": {"lora_type": "lycoris", "lycoris_config": "config/lycoris_config.json"},
        "full": {"model_type": "full", "learning_rate": 1e-5},
        # Its batches are rolled out too; their target is the base model's prediction at the rolled-out state.
        "regularisation": {"train_batch_size": 2, "max_train_steps": 3},
        "accumulation": {"train_batch_size": 2, "gradient_accumulation_steps": 2},
    }
    for name, options in cases.items():
        run = toy_run(tmp_path / name, toy_model, **{**ROLLOUT, "scheduled_sampling_probability": 1.0})
        (run / "config" / "lycoris_config.json").write_text(json.dumps(LOKR))
        if name == "regularisation":
            make_images(run / "reg", 2, size=(32, 32))
            path = run / "config" / "multidatabackend.json"
            datasets = json.loads(path.read_text())
            datasets.append({"id": "reg", "instance_data_dir": str(run / "reg"), "is_regularisation_data": True})
            path.write_text(json.dumps(datasets))
        assert train_here(run, [toy, stune_rollout], monkeypatch, **options).final_step == int(
            options.get("max_train_steps", 2)
        )
        records = metrics(run)
        assert all(r["rollout/fraction"] > 0 and r["rollout/forwards"] > 0 for r in records), name
    transformer = toy.ToyDiT.from_pretrained(toy_model / "transformer")
    network, _ = create_lycoris_from_weights(1.0, str(tmp_path / "lycoris" / "output" / LORA_FILE), transformer)
    assert network.loras
    assert (tmp_path / "full" / "output" / "transformer" / "config.json").is_file()


def test_rollout_on_a_quantized_base(tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quant = pytest.importorskip("stune_quant", reason="stune-quant is not installed")
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    seen: list[torch.nn.Module] = []

    class Keep:
        __name__ = "keep-transformer"

        @stune.hookimpl
        def route_tokens(self, transformer: torch.nn.Module) -> None:
            seen.append(transformer)

    run = toy_run(tmp_path, toy_model, **{**ROLLOUT, "scheduled_sampling_probability": 1.0})
    options = {"base_model_precision": "int8-quanto"}
    assert train_here(run, [load_toy(), quant, stune_rollout, Keep()], monkeypatch, **options).final_step == 2
    assert isinstance(seen[0].get_submodule("blocks.0.mlp.0"), QLinear)  # the rollouts ran on int8 weights
    assert all(r["rollout/forwards"] > 0 for r in metrics(run))


def test_tread_routes_the_training_forward_and_leaves_rollouts_whole(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tread = pytest.importorskip("stune_tread", reason="stune-tread is not installed")
    tokens: list[tuple[bool, int]] = []  # (gradient on, image tokens the second block's attention got)

    class Watch:
        __name__ = "watch-tokens"

        @stune.hookimpl
        def route_tokens(self, transformer: torch.nn.Module) -> None:
            attention = transformer.get_submodule("blocks.1.attn")
            attention.register_forward_pre_hook(
                lambda m, args: tokens.append((torch.is_grad_enabled(), args[0].shape[1]))
            )

    route = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}
    run = toy_run(tmp_path, toy_model, **{**ROLLOUT, "scheduled_sampling_probability": 1.0})
    options = {"tread_config": json.dumps(route)}
    assert train_here(run, [load_toy(), tread, stune_rollout, Watch()], monkeypatch, **options).final_step == 2
    image_tokens = (32 // 2 // 2) ** 2  # 32 px, VAE factor 2, 2×2 patches
    assert {count for grad, count in tokens if grad} == {image_tokens // 2}
    assert {count for grad, count in tokens if not grad} == {image_tokens}  # rollouts are never routed
    records = metrics(run)
    assert all(r["tread/kept_fraction"] == 0.5 and r["rollout/forwards"] > 0 for r in records)


def test_two_processes_roll_out_and_save_their_generators(tmp_path: Path, toy_model: Path) -> None:
    run = toy_run(tmp_path, toy_model, max_train_steps=3, train_batch_size=2, checkpoint_step_interval=3, **ROLLOUT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    st_train = shutil.which("st-train") or str(Path(sys.executable).with_name("st-train"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    toy = REPO / "tests" / "toy_family.py"
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            st_train,
            "--plugin",
            str(toy),
            "--plugin",
            "rollout",
        ],
        cwd=run,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sum(r["rollout/forwards"] for r in records) > 0
    checkpoint = run / "output" / "checkpoint-3"
    for rank in (0, 1):
        saved = torch.load(checkpoint / f"rng_state_{rank}.pt", weights_only=True)
        assert "rollout" in saved["features"]  # each process's own rollout stream, for exact resume
