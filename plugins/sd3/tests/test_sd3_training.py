"""Training runs on the tiny SD3 pipeline: the seed's LoKr loads with LyCORIS, a full fine-tune's
``transformer/`` loads in diffusers, dropped captions train on what the uncond options ask for, and
a stopped and resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import stune
from stune.family import LoadRequest
from stune.step import StepInputs
from stune.train import TrainResult

from .helpers import LORA_FILE, family, generate, sd3_run, train_in

# The seed quickstarts' LoKr config (SimpleTuner's `Attention` preset), unchanged.
SEED_LOKR = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 16384,
    "linear_alpha": 1,
    "full_matrix": True,
    "use_scalar": True,
    "factor": 16,
    "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 16}}},
}


@dataclass
class EmbedRecorder:
    """Records the caption embeddings and captions of every training micro-batch (a compute_loss wrapper)."""

    __name__: str = "embed-recorder"
    batches: list[tuple[list[str], dict[str, torch.Tensor]]] = field(default_factory=list)

    @stune.hookimpl(wrapper=True)
    def compute_loss(self, inputs: StepInputs) -> Any:
        self.batches.append((list(inputs.batch["captions"]), {k: v.detach().clone() for k, v in inputs.embeds.items()}))
        return (yield)


def _pipeline(model: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def empty_caption(tiny_sd3_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny model's encoding of "" at 77 T5 tokens, computed apart from any training run."""
    fam = family(pretrained_model_name_or_path=str(tiny_sd3_dir), tokenizer_max_length=77)
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32))
    with torch.no_grad():
        return fam.encode_prompts(components, [""])[0]


def test_seed_lokr_trains_on_dropped_captions_and_loads_with_lycoris(
    tmp_path: Path, tiny_sd3_dir: Path, empty_caption: dict[str, torch.Tensor]
) -> None:
    from lycoris import create_lycoris_from_weights

    run = sd3_run(
        tmp_path,
        tiny_sd3_dir,
        lora_type="lycoris",
        lycoris_config="config/lycoris_config.json",
        max_train_steps=3,
        learning_rate="1e-2",
        caption_dropout_probability=1.0,  # every caption dropped: default uncond = the encoding of ""
    )
    (run / "config" / "lycoris_config.json").write_text(json.dumps(SEED_LOKR))
    recorder = EmbedRecorder()
    train_in(run, recorder)

    assert len(recorder.batches) == 3
    for captions, embeds in recorder.batches:
        assert all(c != "a picture number 0" for c in captions)
        for key, value in empty_caption.items():
            torch.testing.assert_close(embeds[key], value[None].expand_as(embeds[key]))

    out = run / "output"
    weights = out / LORA_FILE
    assert json.loads((out / "lycoris_config.json").read_text()) == SEED_LOKR
    with safe_open(str(weights), "pt") as handle:
        keys = list(handle.keys())
        assert json.loads(handle.metadata()["lycoris_config"])["algo"] == "lokr"
    modules = {k.split(".")[0] for k in keys}
    assert all(k.startswith("lycoris_transformer_blocks_") for k in modules)
    # SD3's `Attention` modules: the joint attention of all 10 blocks and the image attention of the first 2.
    assert {m.rsplit("_", 2)[0] for m in modules} >= {
        "lycoris_transformer_blocks_0_attn",
        "lycoris_transformer_blocks_9_attn",
    }
    assert any("transformer_blocks_1_attn2" in m for m in modules)
    assert any(k.endswith(".lokr_w1") for k in keys)

    pipe = _pipeline(tiny_sd3_dir)
    before = generate(pipe)
    network, _ = create_lycoris_from_weights(1.0, str(weights), pipe.transformer)
    assert len(network.loras) == len(modules)  # every trained module found its place
    network.merge_to()
    after = generate(pipe)
    assert (after - before).abs().max() > 1e-4


def test_feedforward_preset_matches_sd3_feed_forwards(tmp_path: Path, tiny_sd3_dir: Path) -> None:
    run = sd3_run(tmp_path, tiny_sd3_dir, lora_type="lycoris", lycoris_config="config/ly.json", max_train_steps=1)
    preset = {"target_module": ["FeedForward"], "module_algo_map": {"FeedForward": {"factor": 8}}}
    (run / "config" / "ly.json").write_text(json.dumps({"algo": "lokr", "factor": 8, "apply_preset": preset}))
    train_in(run)
    modules = {k.split(".")[0] for k in load_file(str(run / "output" / LORA_FILE))}
    assert modules and all("_ff_" in m or "_ff_context_" in m for m in modules)
    assert any("_ff_context_" in m for m in modules)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_sd3_dir: Path) -> tuple[Path, TrainResult, EmbedRecorder]:
    """A full fine-tune whose captions are all dropped, CLIP uncond zero and T5 uncond the empty string."""
    run = sd3_run(
        tmp_path_factory.mktemp("full"),
        tiny_sd3_dir,
        model_type="full",
        max_train_steps=2,
        learning_rate="1e-3",
        caption_dropout_probability=1.0,
        sd3_clip_uncond_behaviour="zero",
        sd3_t5_uncond_behaviour="empty_string",
    )
    recorder = EmbedRecorder()
    return run, train_in(run, recorder), recorder


def test_dropped_captions_train_on_zero_clip_and_empty_t5(
    full_run: tuple[Path, TrainResult, EmbedRecorder], empty_caption: dict[str, torch.Tensor]
) -> None:
    _, result, recorder = full_run
    assert result.final_step == 2 and len(recorder.batches) == 2
    for _, embeds in recorder.batches:
        prompt, pooled = embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
        assert torch.all(prompt[:, :77] == 0) and torch.all(pooled == 0)
        torch.testing.assert_close(prompt[:, 77:], empty_caption["prompt_embeds"][77:].expand_as(prompt[:, 77:]))


def test_full_fine_tune_transformer_loads_in_diffusers(
    full_run: tuple[Path, TrainResult, EmbedRecorder], tiny_sd3_dir: Path
) -> None:
    from diffusers import SD3Transformer2DModel

    run, result, _ = full_run
    folder = run / "output" / "transformer"
    assert [run / p for p in result.adapter_files] == [folder]
    trained = SD3Transformer2DModel.from_pretrained(folder)
    pipe = _pipeline(tiny_sd3_dir)
    base = dict(pipe.transformer.state_dict())
    assert trained.state_dict().keys() == base.keys()  # nothing missing, nothing unexpected
    assert any(not torch.equal(trained.state_dict()[k], base[k]) for k in base)
    before = generate(pipe)
    pipe.transformer = trained
    after = generate(pipe)
    assert (after - before).abs().max() > 1e-4
    card = (run / "output" / "README.md").read_text()
    assert "SD3Transformer2DModel.from_pretrained" in card and "subfolder='transformer'" in card


def test_stopped_and_resumed_equals_uninterrupted(tmp_path: Path, tiny_sd3_dir: Path) -> None:
    options = {"max_train_steps": 4, "caption_dropout_probability": 0.5, "checkpoint_step_interval": 2, "seed": 5}
    whole = sd3_run(tmp_path / "whole", tiny_sd3_dir, **options)
    train_in(whole)
    split = sd3_run(tmp_path / "split", tiny_sd3_dir, **options)
    assert train_in(split, max_train_steps=2).final_step == 2
    assert train_in(split).final_step == 4  # resumes from checkpoint-2

    a = load_file(str(whole / "output" / LORA_FILE))
    b = load_file(str(split / "output" / LORA_FILE))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)
    steps = [json.loads(line)["step"] for line in (split / "output" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
