"""The SimpleTuner configs SimpleTuner 4.10.1 itself ran (../shared/reference/simpletuner-anchor-configs,
PEFT LoRA and LyCORIS LoKr, with `vae_cache_ondemand`) run unchanged under `st-train`, paths aside:
the run folder is laid out as their README says (config/, models/tiny-flux, datasets/shapes), the
config files are copied byte for byte, and the adapters load in diffusers and in lycoris."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from stune.testing import make_images, run_cli

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "simpletuner-anchor-configs"

pytestmark = [
    pytest.mark.skipif(not ANCHORS.is_dir(), reason="../shared/reference is not beside this checkout"),
    pytest.mark.slow,  # two 30-step trainings in subprocesses, as the configs ask
]


def anchor_run(folder: Path, kind: str, model: Path) -> Path:
    """The run folder of the anchor README, with the anchor's config files as they are."""
    shutil.copytree(model, folder / "models" / "tiny-flux")
    make_images(folder / "datasets" / "shapes", 12, size=(64, 64))
    shutil.copytree(ANCHORS / kind, folder / "config")
    for path in (ANCHORS / kind).iterdir():
        assert (folder / "config" / path.name).read_bytes() == path.read_bytes()
    return folder


@pytest.fixture(scope="module", params=["lora", "lokr"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> Any:
    kind = request.param
    run = anchor_run(tmp_path_factory.mktemp(f"anchor-{kind}"), kind, tiny_flux_dir)
    proc = run_cli([], cwd=run)  # `st-train`: config/config.json, nothing on the command line
    return kind, run, proc


def _generate(pipe: Any) -> torch.Tensor:
    out = pipe(
        "a red square",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    )
    return out.images


def test_the_anchor_config_trains_unchanged(trained: Any) -> None:
    kind, run, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = run / "output" / kind
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1] == 30  # max_train_steps of the config
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert any(run.joinpath(f"cache/{kind}/vae").rglob("*.safetensors"))  # cache_dir_vae of the dataset list
    assert any(run.joinpath(f"cache/{kind}/text").rglob("*.safetensors"))  # cache_dir of the text_embeds entry
    # the SimpleTuner-only key is accepted, saying what stune does instead
    assert "`vae_cache_ondemand` accepted: stune encodes every latent before training" in proc.stderr


def test_the_adapter_loads_like_simpletuners(trained: Any, caplog: pytest.LogCaptureFixture) -> None:
    from diffusers import FluxPipeline

    kind, run, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = run / "output" / kind / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as handle:
        keys = set(handle.keys())
    pipe = FluxPipeline.from_pretrained(run / "models" / "tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe)
    if kind == "lora":
        from peft import get_peft_model_state_dict

        assert len(keys) == 28  # as SimpleTuner's own file of this config
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            pipe.load_lora_weights(weights, adapter_name="anchor")
        assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="anchor")
        assert {f"transformer.{k}" for k in loaded} == keys  # none unused, none missing
    else:
        from lycoris import create_lycoris_from_weights

        assert any(k.endswith(".lokr_w1") for k in keys)
        network, _ = create_lycoris_from_weights(1.0, str(weights), pipe.transformer)
        assert len(network.loras) == len({k.split(".")[0] for k in keys})
        network.merge_to()
    after = _generate(pipe)
    assert (after - before).abs().max() > 1e-4  # the adapter changes the image
