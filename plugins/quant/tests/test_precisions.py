"""Every precision that runs on a CPU trains a LoRA on a frozen quantized tiny FLUX, validation
renders with the quantized adapted transformer, and the LoRA loads into the unquantized FluxPipeline
with no missing or unexpected keys and changes its image. One process, shared caches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from .conftest import LORA, PROMPT, assert_loads_unquantized, quantized_kind, train_in

#: precision → what a quantized layer of the trained transformer looks like
CPU_PRECISIONS = {
    "int8-quanto": "QLinear",
    "int4-quanto": "QLinear",
    "int2-quanto": "QLinear",
    "fp8-quanto": "QLinear",
    "fp8uz-quanto": "QLinear",
    "int8-torchao": "Int8Tensor",
    "fp8wo-torchao": "Float8Tensor",
    "int4-torchao": "IntxUnpackedToInt8Tensor",
    "nf4-bnb": "LinearNF4",
}
EXCLUDED = ("proj_out", "x_embedder", "context_embedder")  # FLUX's exclusions that are Linear layers


@pytest.mark.parametrize("precision", list(CPU_PRECISIONS))
def test_lora_on_a_quantized_base(
    precision: str,
    flux_run: Path,
    unquantized: tuple[Any, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trained = train_in(
        flux_run,
        monkeypatch,
        f"out-{precision}",
        base_model_precision=precision,
        validation_disable="false",
        validation_prompt=PROMPT,
        validation_resolution="64x64",
        validation_num_inference_steps=2,
    )
    assert trained.result.final_step == 2
    assert all(math.isfinite(r["loss"]) for r in trained.records)
    transformer = trained.transformer

    # The base is quantized (attention layers under their LoRA, and layers without one) and frozen;
    # the family's exclusions stay plain Linear layers.
    expected = CPU_PRECISIONS[precision]
    assert quantized_kind(transformer.transformer_blocks[0].attn.to_q) == expected
    assert quantized_kind(transformer.transformer_blocks[0].ff.net[2]) == expected
    assert quantized_kind(transformer.single_transformer_blocks[0].proj_out) == expected  # not the top-level one
    for name in EXCLUDED:
        layer = transformer.get_submodule(name)
        assert type(layer) is torch.nn.Linear and type(layer.weight) is torch.nn.Parameter, name
    base = [n for n, p in transformer.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not base
    # The LoRA learned: lora_B starts at zero and only moves with a gradient through the quantized base.
    lora_b = [p for n, p in transformer.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    assert (trained.output / "validation_images" / "step-000002-validation-64x64.png").is_file()
    assert_loads_unquantized(unquantized, trained.output, caplog)


def test_dora_on_a_quantized_base(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = train_in(flux_run, monkeypatch, "out-dora", base_model_precision="int8-quanto", use_dora="true")
    assert trained.result.final_step == 2
    with safe_open(str(trained.output / LORA), "pt") as handle:
        keys = list(handle.keys())
    assert any("lora_magnitude_vector" in k for k in keys)
    layer = trained.transformer.transformer_blocks[0].attn.to_q
    assert type(layer.base_layer).__name__ == "QLinear"
    # DoRA's magnitude is the norm of the (dequantized) base weight plus the LoRA, not of packed integers.
    dense = layer.base_layer.weight.dequantize().float()
    delta = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    magnitude = layer.lora_magnitude_vector["default"].weight.float()
    assert torch.allclose(magnitude, (dense + delta * layer.scaling["default"]).norm(dim=1), rtol=0.2)


def test_base_model_precision_bf16_loads_the_base_in_bf16(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dtype precision quantizes nothing: the transformer loads in that dtype while the rest of the
    run keeps base_model_default_dtype (the FLUX seed's advice when quantizing runs out of host memory)."""
    trained = train_in(
        flux_run,
        monkeypatch,
        "out-bf16",
        base_model_precision="bf16",
        mixed_precision="bf16",
        base_model_default_dtype="fp32",
    )
    assert trained.result.final_step == 2
    layer = trained.transformer.transformer_blocks[0].attn.to_q.base_layer
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.bfloat16
