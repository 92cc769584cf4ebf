"""Damaged caches and checkpoints on a real (tiny FLUX) run: a cache entry cut short or flipped by
one bit is found and encoded again to the same tensors; a damaged checkpoint is named and
`latest` falls back to the previous sound one, which resumes to the same result; an adapter
of other shapes stops the resume with one sentence."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stune.data.cache import CHECKSUM_KEY
from stune.errors import ConfigError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_resume import _run_folder as resume_run_folder


def _run_folder(folder: Path, model: Path, **options: Any) -> Path:
    """The resume tests' tiny FLUX run, shortened: 4 steps, a checkpoint every 2."""
    return resume_run_folder(folder, model, **{"max_train_steps": 4, "checkpoint_step_interval": 2, **options})


def _train(**overrides: Any) -> Any:
    return train(prepare(overrides={k: str(v) for k, v in overrides.items()}, host=PluginHost.build(["flux"])))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> Path:
    """One 4-step run (checkpoints at 2 and 4), kept as it ended; each test works on a copy."""
    folder = _run_folder(tmp_path_factory.mktemp("hostile-run"), tiny_flux_dir)
    old = Path.cwd()
    try:
        import os

        os.chdir(folder)
        result = _train()
    finally:
        os.chdir(old)
    assert result.final_step == 4
    return folder


def _copy(first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(first_run, folder, symlinks=True)
    monkeypatch.chdir(folder)
    return folder


def _flip_one_bit(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(first_run, tmp_path, monkeypatch)
    output = run / "output"
    expected = load_file(str(output / "pytorch_lora_weights.safetensors"))
    marker = json.loads((output / "checkpoint-4" / "checkpoint_complete.json").read_text())
    assert "training_state.pt" in marker["sha256"]
    _flip_one_bit(output / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    (output / "pytorch_lora_weights.safetensors").unlink()
    with caplog.at_level(logging.INFO):
        result = _train()
    assert result.final_step == 4
    assert "checkpoint-4 is damaged (pytorch_lora_weights.safetensors differs from what was written" in caplog.text
    assert "resumed from output/checkpoint-2 at step 2" in caplog.text
    again = load_file(str(output / "pytorch_lora_weights.safetensors"))
    for key in expected:
        assert torch.allclose(again[key], expected[key], atol=1e-6), key


def test_checkpoint_without_marker_or_cut_short_is_never_resumed(
    first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stune.checkpoint import resolve_resume

    run = _copy(first_run, tmp_path, monkeypatch)
    output = run / "output"
    (output / "checkpoint-4" / "checkpoint_complete.json").unlink()  # killed before the marker
    assert resolve_resume(output, "latest") == output / "checkpoint-2"
    state = output / "checkpoint-2" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # and the previous one cut short
    with pytest.raises(
        ConfigError, match=r"Every checkpoint in \S+output is damaged \(checkpoint-2: training_state.pt"
    ):
        resolve_resume(output, "latest")
    with pytest.raises(ConfigError, match="'checkpoint-2' is damaged"):
        resolve_resume(output, "checkpoint-2")


def test_adapter_of_other_shapes_on_resume_is_one_sentence(
    first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _copy(first_run, tmp_path, monkeypatch)
    with pytest.raises(ConfigError) as caught:
        _train(lora_rank=8, max_train_steps=6)
    message = str(caught.value)
    assert "checkpoint-4" in message and "other shapes" in message and "lora_rank" in message
    assert "\n" not in message


def test_cache_entries_cut_short_or_flipped_are_encoded_again(
    first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = first_run  # in place (the last test here): latent entries are keyed by the images' own paths
    monkeypatch.chdir(run)
    latents = sorted((run / "cache" / "vae").glob("*.safetensors"))
    texts = sorted((run / "cache" / "text").glob("*.safetensors"))
    assert len(latents) == 4 and len(texts) >= 4
    with safe_open(str(latents[0]), framework="pt") as handle:
        assert CHECKSUM_KEY in (handle.metadata() or {})
    before = {p: {k: v.clone() for k, v in load_file(str(p)).items()} for p in (latents[0], latents[1], texts[0])}
    # a run killed while writing without an atomic rename: the entry is there, cut short
    latents[0].write_bytes(latents[0].read_bytes()[: latents[0].stat().st_size // 2])
    _flip_one_bit(latents[1])  # a flipped bit in the tensor bytes: still a valid safetensors file
    _flip_one_bit(texts[0])
    assert load_file(str(latents[1])).keys() == before[latents[1]].keys()  # safetensors alone reads it
    with caplog.at_level(logging.INFO):
        result = _train(resume_from_checkpoint="none", output_dir="output-again")
    assert result.final_step == 4
    assert "caches: 2 latents and 1 captions to encode" in caplog.text
    assert caplog.text.count("is damaged") == 3
    for path, tensors in before.items():
        again = load_file(str(path))
        assert again.keys() == tensors.keys()
        for key in tensors:
            assert torch.equal(again[key], tensors[key]), (path, key)
    a = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run / "output-again" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run as on sound caches


def test_lycoris_weights_of_other_shapes_are_one_sentence(tmp_path: Path, tiny_flux_dir: Path) -> None:
    from diffusers import FluxTransformer2DModel

    from stune.adapters import Lycoris

    def adapter(dim: int) -> Lycoris:
        settings = tmp_path / f"lycoris-{dim}.json"
        settings.write_text(json.dumps({"algo": "lora", "linear_dim": dim, "linear_alpha": 1}))
        overrides = {
            "model_family": "flux",
            "pretrained_model_name_or_path": str(tiny_flux_dir),
            "lora_type": "lycoris",
            "lycoris_config": str(settings),
        }
        session = prepare(overrides=overrides, host=PluginHost.build(["flux"]))
        transformer = FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir / "transformer"))
        return Lycoris(transformer, session.family, session.config)

    adapter(4).save(tmp_path / "saved")
    with pytest.raises(ConfigError) as caught:
        adapter(8).load(tmp_path / "saved")
    message = str(caught.value)
    assert "LyCORIS weights" in message and "other shapes" in message and "lycoris_config" in message
    assert "\n" not in message
