"""FLUX Kontext: edit LoRAs trained on (reference image, edited image, instruction) pairs.

A tiny paired dataset — coloured shapes as references, the same shapes recoloured as targets —
trains a Kontext LoRA on the tiny FLUX pipeline; the LoRA loads into FluxKontextPipeline.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stune.errors import ConfigError
from stune.family import LoadRequest
from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import step_inputs, write_run
from stune.train import train

LORA_FILE = "pytorch_lora_weights.safetensors"
SHAPES = [("circle", (200, 40, 40)), ("square", (40, 200, 40)), ("circle", (40, 40, 200)), ("square", (200, 200, 40))]


def _shape(path: Path, kind: str, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    w, h = size
    pixels = np.full((h, w, 3), 235, dtype=np.uint8)
    ys, xs = np.mgrid[:h, :w]
    if kind == "circle":
        inside = (xs - w / 2) ** 2 + (ys - h / 2) ** 2 < (min(w, h) / 3) ** 2
    else:
        inside = (abs(xs - w / 2) < w / 4) & (abs(ys - h / 2) < h / 4)
    pixels[inside] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def kontext_run(folder: Path, model: Path, strict: bool = True, missing: int | None = None, **options: Any) -> Path:
    """Targets are the references recoloured purple; the caption is the instruction."""
    for i, (kind, colour) in enumerate(SHAPES):
        if i != missing:
            _shape(folder / "refs" / f"pair_{i}.png", kind, colour, (64, 64) if strict else (192, 128))
        _shape(folder / "edits" / f"pair_{i}.png", kind, (160, 40, 200), (64, 64))
        (folder / "edits" / f"pair_{i}.txt").write_text(f"make the {kind} purple\n")
    config = {
        "model_family": "flux",
        "model_flavour": "kontext",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "output"),
        "max_train_steps": 4,
        "train_batch_size": 2,
        "learning_rate": "3e-3",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 2,
        "validation_step_interval": 0,
        **options,
    }
    datasets = [
        {
            "id": "edits",
            "instance_data_dir": str(folder / "edits"),
            "conditioning_data": "refs",
            "cache_dir_vae": str(folder / "cache" / "edits"),
        },
        {
            "id": "refs",
            "dataset_type": "conditioning",
            "conditioning_type": "reference_strict" if strict else "reference_loose",
            "instance_data_dir": str(folder / "refs"),
            "resolution": 64 if strict else 128,  # loose references get their own size and bucket
            "cache_dir_vae": str(folder / "cache" / "refs"),
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(folder / "cache" / "text")},
    ]
    write_run(folder, config, datasets)
    return folder


def _train(run: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Any:
    monkeypatch.chdir(run)
    return train(prepare(host=PluginHost.build(["flux"]), overrides={k: str(v) for k, v in overrides.items()}))


def _edit(pipe: Any, source: Path) -> torch.Tensor:
    with Image.open(source) as image:
        reference = image.convert("RGB")
    result = pipe(
        image=reference,
        prompt="make the circle purple",
        num_inference_steps=2,
        height=64,
        width=64,
        max_area=64 * 64,
        _auto_resize=False,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=16,
    ).images[0]
    return torch.as_tensor(result)


def test_a_kontext_lora_trains_on_pairs_and_loads_in_the_kontext_pipeline(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    run = kontext_run(
        tmp_path,
        tiny_flux_dir,
        validation_prompt="make the circle purple",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        validation_input=str(tmp_path / "refs" / "pair_0.png"),
        disable_benchmark=True,
    )
    result = _train(run, monkeypatch)
    assert result.final_step == 4
    [image] = [p for p in result.validation_images if "step-000004" in p.name]
    with Image.open(image) as rendered:
        assert rendered.size == (128, 64)  # the input on the left, the edit on the right
        left = np.asarray(rendered.convert("RGB"))[:, :64]
    with Image.open(tmp_path / "refs" / "pair_0.png") as source:
        assert np.abs(left.astype(int) - np.asarray(source.convert("RGB")).astype(int)).max() <= 1

    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = _edit(pipe, tmp_path / "refs" / "pair_0.png")
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(result.output_dir, adapter_name="edit")
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
    file_keys = set(load_file(str(result.output_dir / LORA_FILE)))
    assert {f"transformer.{k}" for k in get_peft_model_state_dict(pipe.transformer, adapter_name="edit")} == file_keys
    after = _edit(pipe, tmp_path / "refs" / "pair_0.png")
    assert (after - before).abs().max() > 1e-4  # the LoRA changes the edited image
    assert "FluxKontextPipeline" in (result.output_dir / "README.md").read_text()


def test_the_reference_gets_no_loss_and_the_model_sees_it(tiny_flux_dir: Path) -> None:
    host = PluginHost.build(["flux"])
    config = host.config_model().model_validate(
        {
            "model_family": "flux",
            "model_flavour": "kontext",
            "pretrained_model_name_or_path": str(tiny_flux_dir),
            "mixed_precision": "no",
            "tokenizer_max_length": 16,
        }
    )
    family = host.family_class("flux")(config)
    family.apply_defaults()
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    [embeds] = family.encode_prompts(components, ["make the circle purple"])
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 16, 8, 12, generator=gen)  # its own size: 4×6 tokens after the 4×4 image
    inputs = step_inputs(
        torch.randn(1, 16, 8, 8, generator=gen),
        torch.tensor([0.5]),
        {k: v[None] for k, v in embeds.items()},
        target=torch.randn(1, 16, 8, 8, generator=gen),
        conditioning={"reference_latents": reference},
    )
    transformer = components.transformer
    with_reference = family.predict(transformer, inputs).velocity
    without = family.predict(transformer, inputs.replace(conditioning={})).velocity
    assert with_reference.shape == without.shape == (1, 16, 8, 8)  # only the noisy image's tokens come back
    assert not torch.allclose(with_reference, without)  # the model attends to the reference

    # Whatever the model outputs at the reference's 24 positions, the loss does not change.
    def poison(module: Any, args: Any, output: Any) -> Any:
        sample = output[0].clone()
        sample[:, 16:] = 1e6
        return (sample,)

    handle = transformer.register_forward_hook(poison)
    try:
        poisoned = family.predict(transformer, inputs).velocity
    finally:
        handle.remove()
    assert torch.equal(poisoned, with_reference)
    tokens = family.forward_tokens(inputs)
    assert tokens.counts == {"image": 16, "text": 16, "reference": 24}
    assert [s.name for s in family.token_layout().block_lists[0].segments] == ["image", "reference"]


def test_strict_pairs_with_a_missing_partner_are_skipped_and_named(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = kontext_run(tmp_path, tiny_flux_dir, missing=3, max_train_steps=1, checkpoint_step_interval=0)
    result = _train(run, monkeypatch)
    assert result.final_step == 1
    report = json.loads((result.output_dir / "dataset_report.json").read_text())
    [edits] = [d for d in report["datasets"] if d["id"] == "edits"]
    assert edits["used"] == 3 and edits["skipped"] == {"missing reference": 1}
    assert edits["skipped_files"][0]["path"].endswith("pair_3.png")
    assert edits["references"] == str(tmp_path / "refs")


def test_loose_pairs_of_another_size_train(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = kontext_run(tmp_path, tiny_flux_dir, strict=False, max_train_steps=2, checkpoint_step_interval=0)
    result = _train(run, monkeypatch)
    assert result.final_step == 2
    report = json.loads((result.output_dir / "dataset_report.json").read_text())
    [edits] = [d for d in report["datasets"] if d["id"] == "edits"]
    assert edits["buckets"] == {"64x64+192x128": 4}  # a batch shares the target's and the reference's size


def test_strict_pairs_of_different_sizes_are_refused_pair_by_pair(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = kontext_run(tmp_path, tiny_flux_dir, max_train_steps=1, checkpoint_step_interval=0)
    _shape(run / "refs" / "pair_2.png", "circle", (40, 40, 200), (96, 64))
    result = _train(run, monkeypatch)
    report = json.loads((result.output_dir / "dataset_report.json").read_text())
    [edits] = [d for d in report["datasets"] if d["id"] == "edits"]
    assert edits["skipped"] == {"reference size differs": 1}


def test_kontext_resumes_exactly(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _train(kontext_run(tmp_path / "a", tiny_flux_dir), monkeypatch)
    halves = kontext_run(tmp_path / "b", tiny_flux_dir, max_train_steps=2)
    _train(halves, monkeypatch)
    resumed = _train(halves, monkeypatch, max_train_steps=4)
    a, b = load_file(str(straight.output_dir / LORA_FILE)), load_file(str(resumed.output_dir / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kontext_without_references_and_references_without_kontext_are_refused(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = kontext_run(tmp_path, tiny_flux_dir)
    datasets = json.loads((run / "config" / "multidatabackend.json").read_text())
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="learns edits from"):
        (run / "config" / "multidatabackend.json").write_text(
            json.dumps(
                [{k: v for k, v in d.items() if k != "conditioning_data"} for d in datasets if d["id"] != "refs"]
            )
        )
        train(prepare(host=PluginHost.build(["flux"])))
    (run / "config" / "multidatabackend.json").write_text(json.dumps(datasets))
    with pytest.raises(ConfigError, match="does not train on"):
        train(prepare(host=PluginHost.build(["flux"]), overrides={"model_flavour": "dev"}))
    with pytest.raises(ConfigError, match="has no input image to edit"):
        train(prepare(host=PluginHost.build(["flux"]), overrides={"validation_prompt": "make it purple"}))
