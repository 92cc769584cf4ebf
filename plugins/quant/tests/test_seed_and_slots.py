"""The FLUX seed's quantised settings (int8-quanto base, T5 at int8-quanto, adamw_bf16), and the
text-encoder slots with four encoders (as SD3 and HiDream declare them), on a toy family variant."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch

import stune
from stune.family import Components, LoadRequest, TextEncoderSlot
from stune.plugins import PluginHost
from stune.testing import make_images, run_cli, write_run

from .conftest import Probe, quantized_kind

FLUX_SEED = {  # seed 002 (FLUX, Hindi): quantised model training
    "base_model_precision": "int8-quanto",
    "text_encoder_2_precision": "int8-quanto",  # T5-XXL
    "optimizer": "adamw_bf16",
    "mixed_precision": "bf16",
}


class EncoderProbe:
    """Records the classes of each text encoder's layers while captions are encoded."""

    __name__ = "encoder-probe"

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, str]] = {}

    @stune.hookimpl(wrapper=True)
    def encode_text(self, components: Components) -> Iterator[None]:
        for key, encoder in components.text_encoders.items():
            self.kinds[key] = {
                name: quantized_kind(layer)
                for name, layer in encoder.named_modules()
                if isinstance(layer, torch.nn.Linear)
            }
        return (yield)


def test_flux_seed_quantised_settings_check_and_train(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["check", "--quick", *(f"--{k}={v}" for k, v in FLUX_SEED.items())]
    proc = run_cli(args, cwd=flux_run)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from stune.session import prepare
    from stune.train import train

    monkeypatch.chdir(flux_run)
    probe, kept = EncoderProbe(), Probe()
    session = prepare(
        host=PluginHost.build(["flux", "quant"], plugins=[probe, kept]),
        overrides={"output_dir": "out-seed", "max_train_steps": "3", "learning_rate": "1e-3", **FLUX_SEED},
    )
    result = train(session)
    assert result.final_step == 3 and result.encoded_captions > 0
    records = [json.loads(line) for line in (flux_run / "out-seed" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    t5 = probe.kinds["text_encoder_2"]
    assert t5 and set(t5.values()) == {"QLinear"}  # T5 quantized for caching
    assert set(probe.kinds["text_encoder"].values()) == {"Parameter"}  # CLIP-L left as loaded
    assert (flux_run / "out-seed" / "pytorch_lora_weights.safetensors").is_file()
    # What stays unquantized is in base_model_default_dtype (bf16 under bf16 mixed precision); the
    # LoRA in bf16 too, for adamw_bf16.
    [transformer] = kept.transformers
    assert transformer.proj_out.weight.dtype == torch.bfloat16
    assert quantized_kind(transformer.transformer_blocks[0].attn.to_q) == "QLinear"
    assert transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight.dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------------
# Four text-encoder slots on the toy family (SD3: CLIP-L, CLIP-G, T5; HiDream adds a Llama)
# -------------------------------------------------------------------------------------------------

TOY_PATH = Path(__file__).resolve().parents[3] / "tests" / "toy_family.py"


def load_toy() -> ModuleType:
    name = "stune_test_toy_family"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOY_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


toy = load_toy()
SLOTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")


class FourEncoders(toy.ToyFamily):  # type: ignore[misc]
    """The toy family with four text encoders (copies of its CLIP), each slot with its own exclusions."""

    name = "toy4"
    text_encoder_slots = (
        TextEncoderSlot("text_encoder", "CLIP A"),
        TextEncoderSlot("text_encoder_2", "CLIP B", ("*.mlp.fc2",)),
        TextEncoderSlot("text_encoder_3", "CLIP C", ("*.self_attn.out_proj",)),
        TextEncoderSlot("text_encoder_4", "CLIP D", ("*.layers.0.*",)),
    )
    EXCLUDED: ClassVar[dict[str, str]] = {
        "text_encoder_2": ".mlp.fc2",
        "text_encoder_3": ".self_attn.out_proj",
        "text_encoder_4": ".layers.0.",
    }

    def load(self, request: LoadRequest) -> Components:
        from transformers import CLIPTextModel

        components: Components = super().load(replace(request, text_encoders=False))
        if request.text_encoders:
            for slot in SLOTS:
                encoder = CLIPTextModel.from_pretrained(
                    self.model_path(), subfolder="text_encoder", **request.pretrained_kwargs(slot, "dtype")
                )
                components.text_encoders[slot] = encoder.requires_grad_(False).eval().to(request.device)
        return components

    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        tokenizer = components.tokenizers["tokenizer"]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = sum(components.text_encoders[slot](ids).last_hidden_state.float() for slot in SLOTS) / len(SLOTS)
        return [{"tokens": hidden[i].cpu()} for i in range(len(prompts))]


class FourEncoderPlugin:
    __name__ = "toy4-family"

    @stune.hookimpl
    def register_families(self, register: Any) -> None:
        register(FourEncoders)


def test_four_encoder_slots_each_take_their_precision_and_exclusions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stune.session import prepare
    from stune.train import train

    model = toy.build_toy_model(tmp_path / "model")
    make_images(tmp_path / "data", 2, size=(32, 32))
    config = {
        "model_family": "toy4",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(tmp_path / "output"),
        "max_train_steps": 1,
        "train_batch_size": 2,
        "mixed_precision": "no",
        "resolution": 32,
        "validation_disable": True,
        "disable_benchmark": True,
        "text_encoder_1_precision": "no_change",
        "text_encoder_2_precision": "int8-quanto",
        "text_encoder_3_precision": "int8-torchao",
        "text_encoder_4_precision": "int4-quanto",
        "base_model_precision": "int8-quanto",
    }
    datasets = [
        {"id": "pics", "instance_data_dir": str(tmp_path / "data"), "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "cache" / "text")},
    ]
    write_run(tmp_path, config, datasets)
    monkeypatch.chdir(tmp_path)
    probe = EncoderProbe()
    host = PluginHost.build(["quant"], plugins=[FourEncoderPlugin(), probe])
    session = prepare(host=host)
    assert {k: session.family.text_cache_identity()[k] for k in SLOTS} == {
        "text_encoder": "no_change",
        "text_encoder_2": "int8-quanto",
        "text_encoder_3": "int8-torchao",
        "text_encoder_4": "int4-quanto",
    }
    result = train(session)
    assert result.final_step == 1 and result.encoded_captions > 0

    expected = {"text_encoder_2": "QLinear", "text_encoder_3": "Int8Tensor", "text_encoder_4": "QLinear"}
    assert set(probe.kinds["text_encoder"].values()) == {"Parameter"}
    for slot, kind in expected.items():
        layers = probe.kinds[slot]
        kept = {n for n, k in layers.items() if k == "Parameter"}
        assert kept and all(FourEncoders.EXCLUDED[slot] in n for n in kept), (slot, kept)
        assert {k for n, k in layers.items() if n not in kept} == {kind}, slot
    # The transformer was quantized too, and the encoders were dropped once the captions were cached.
    assert result.encoded_captions > 0
