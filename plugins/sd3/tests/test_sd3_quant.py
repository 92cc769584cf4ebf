"""SD3 with stune-quant: fp8-quanto trains like the unquantized base (SimpleTuner refuses it for SD3; we
tried it and allow it), and the three text-encoder slots are quantized by their precision options.
The seed's quantised block with adamw_bf16 is trained in test_sd3_cli.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import stune
from stune.family import LoadRequest
from stune.plugins import PluginHost
from stune.quantize import plan_targets

from .helpers import sd3_run, train_in

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("stune_quant") is None, reason="needs stune-quant (plugins/quant), not installed"
)


class Probe:
    __name__ = "probe"

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    @stune.hookimpl
    def route_tokens(self, transformer: torch.nn.Module) -> None:
        layer = transformer.get_submodule("transformer_blocks.0.attn.to_q.base_layer")
        self.seen["to_q"] = (type(layer).__name__, str(getattr(layer, "weight_qtype", None)))
        self.seen["ff"] = type(transformer.get_submodule("transformer_blocks.0.ff.net.2")).__name__


def _losses(run: Path, output: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / output / "metrics.jsonl").read_text().splitlines()]


def test_fp8_quanto_trains_sd3_like_the_unquantized_base(tmp_path: Path, tiny_sd3_dir: Path) -> None:
    run = sd3_run(tmp_path, tiny_sd3_dir, max_train_steps=4, learning_rate="1e-2")
    probe = Probe()
    fp8 = train_in(run, probe, names=("sd3", "quant"), base_model_precision="fp8-quanto", output_dir="fp8")
    plain = train_in(run, names=("sd3", "quant"), output_dir="plain")  # same seed, batches, noise and σ
    assert fp8.final_step == plain.final_step == 4
    assert probe.seen["to_q"][0] == "QLinear" and "float8" in probe.seen["to_q"][1]
    assert probe.seen["ff"] == "Linear"  # feed-forwards are among SD3's exclusions
    quantized, reference = _losses(run, "fp8"), _losses(run, "plain")
    assert all(abs(q - r) <= 0.02 * r for q, r in zip(quantized, reference)), (quantized, reference)
    assert (run / "fp8" / "pytorch_lora_weights.safetensors").is_file()


def test_fp8_quanto_base_gives_the_lora_the_gradients_of_the_full_precision_one(tiny_sd3_dir: Path) -> None:
    from peft import LoraConfig

    from stune.testing import step_inputs

    host = PluginHost.build(["sd3", "quant"])
    config = host.config_model().model_validate(
        {
            "model_family": "sd3",
            "pretrained_model_name_or_path": str(tiny_sd3_dir),
            "mixed_precision": "no",
            "base_model_precision": "fp8-quanto",
            "tokenizer_max_length": 77,
        }
    )
    fam = host.family_class("sd3")(config)
    fam.apply_defaults()
    request = LoadRequest(torch.device("cpu"), torch.float32)
    components = fam.load(request)
    with torch.no_grad():
        embeds = fam.encode_prompts(components, ["a photo of a cat", "a red circle on a blue background"])
    batch = {k: torch.stack([e[k] for e in embeds]) for k in embeds[0]}
    generator = torch.Generator().manual_seed(0)
    inputs = step_inputs(torch.randn(2, 16, 8, 8, generator=generator), torch.tensor([0.3, 0.7]), batch)
    target = torch.randn(2, 16, 8, 8, generator=generator)
    plain = fam.load(LoadRequest(torch.device("cpu"), torch.float32, text_encoders=False)).transformer
    quantized = components.transformer
    host.hooks.quantize(components=components, family=fam, config=config, targets=plan_targets(config, fam, None))
    assert type(components.transformer.get_submodule("transformer_blocks.0.attn.to_q")).__name__ == "QLinear"

    results = []
    for transformer in (plain, components.transformer):
        torch.manual_seed(0)  # the same LoRA initialisation for both
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=fam.lora_target_modules()))
        with torch.no_grad():  # B starts at zero: give it values so every LoRA weight gets a gradient
            for name, param in transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        velocity = fam.predict(transformer, inputs).velocity
        (velocity - target).square().mean().backward()
        grads = {n: p.grad for n, p in transformer.named_parameters() if "lora_" in n}
        results.append((velocity.detach(), grads))
    (v_plain, g_plain), (v_fp8, g_fp8) = results
    assert quantized is components.transformer  # quantized in place, module by module
    assert (v_fp8 - v_plain).norm() / v_plain.norm() < 0.05
    assert g_plain.keys() == g_fp8.keys() and len(g_plain) == 2 * 4 * 12
    for name, grad in g_plain.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), g_fp8[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


def test_text_encoder_slots_are_quantized_by_their_precision_options(tiny_sd3_dir: Path) -> None:
    from optimum.quanto import QLinear

    host = PluginHost.build(["sd3", "quant"])
    config = host.config_model().model_validate(
        {
            "model_family": "sd3",
            "pretrained_model_name_or_path": str(tiny_sd3_dir),
            "mixed_precision": "no",
            "tokenizer_max_length": 77,
            "text_encoder_1_precision": "int8-quanto",
            "text_encoder_3_precision": "fp8-quanto",
        }
    )
    fam = host.family_class("sd3")(config)
    fam.apply_defaults()
    targets = plan_targets(config, fam, torch.device("cpu"))
    assert [(t.component, t.precision) for t in targets] == [
        ("text_encoder", "int8-quanto"),
        ("text_encoder_3", "fp8-quanto"),
    ]
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32))
    with torch.no_grad():
        [before] = fam.encode_prompts(components, ["a photo of a cat"])
    host.hooks.quantize(components=components, family=fam, config=config, targets=targets)
    encoders = components.text_encoders
    assert any(isinstance(m, QLinear) for m in encoders["text_encoder"].modules())
    assert not any(isinstance(m, QLinear) for m in encoders["text_encoder_2"].modules())  # no_change
    assert any(isinstance(m, QLinear) for m in encoders["text_encoder_3"].modules())
    with torch.no_grad():
        [after] = fam.encode_prompts(components, ["a photo of a cat"])
    assert after["prompt_embeds"].shape == before["prompt_embeds"].shape
    assert not torch.equal(after["prompt_embeds"], before["prompt_embeds"])
    torch.testing.assert_close(after["prompt_embeds"], before["prompt_embeds"], atol=0.15, rtol=0.1)
