"""Quantizing block by block hands the checkpoint's pages back as it goes: once a loaded model is
quantized, almost nothing of its mapped safetensors file is still resident in the process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from stune.plugins import PluginHost
from stune.quantize import QuantizeTarget
from stune_quant.quantizers import QuantoQuantizer, TorchaoQuantizer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_mb(path: Path) -> float:
    """Resident size of this process's mappings of ``path``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) >= 6 and head[-1] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total / 1024


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX transformer 512 wide (1 double + 2 single blocks, ~35 MB in bf16), saved once."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(16, 24, 24),
    ).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("wide-flux") / "transformer"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("quantizer", [QuantoQuantizer, TorchaoQuantizer])
def test_quantizing_releases_the_checkpoint_pages(wide_flux: Path, quantizer: type) -> None:
    from diffusers import FluxTransformer2DModel

    from stune_flux.family import FluxFamily

    config = PluginHost.build(["flux", "quant"]).config_model().model_validate({"quantize_via": "cpu"})
    checkpoint = wide_flux / "diffusion_pytorch_model.safetensors"
    size = checkpoint.stat().st_size / 2**20
    model = FluxTransformer2DModel.from_pretrained(wide_flux, torch_dtype=torch.bfloat16)
    layer = model.transformer_blocks[0].ff.net[2]
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = layer(x).float()
        for param in model.parameters():
            param.sum()  # read every weight: the whole file becomes resident
    assert resident_mb(checkpoint) > 0.9 * size

    precision = "int8-quanto" if quantizer is QuantoQuantizer else "int8-torchao"
    target = QuantizeTarget("transformer", "base_model_precision", precision, FluxFamily.quantization_exclusions, None)
    quantizer(config).quantize(model, target)

    assert resident_mb(checkpoint) < 0.1 * size  # only the norms, biases and excluded layers' pages remain
    layer = model.transformer_blocks[0].ff.net[2]
    with torch.no_grad():
        out = layer(x).float()
    assert (out - reference).abs().mean() < 0.02 * reference.abs().mean()  # int8 weights, same function


def test_after_a_load_time_quantization_the_read_pages_are_handed_back(wide_flux: Path) -> None:
    """diffusers' TorchAoConfig quantizes each weight as it loads it, but the bf16 pages it read stay
    resident while the unquantized norms keep the file mapped: the plugin hands them back after loading."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from stune_quant.hostmem import release_unused

    checkpoint = wide_flux / "diffusion_pytorch_model.safetensors"
    size = checkpoint.stat().st_size / 2**20
    model = FluxTransformer2DModel.from_pretrained(
        wide_flux, torch_dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    assert type(model.transformer_blocks[0].ff.net[2].weight).__name__ == "Int8Tensor"
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    inputs = {
        "hidden_states": x,
        "encoder_hidden_states": torch.randn(2, 4, 64, dtype=torch.bfloat16),
        "pooled_projections": torch.randn(2, 64, dtype=torch.bfloat16),
        "timestep": torch.tensor([0.5, 0.5], dtype=torch.bfloat16),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(4, 3),
        "return_dict": False,
    }
    with torch.no_grad():
        before = model(**inputs)[0]
    assert resident_mb(checkpoint) > 0.5 * size

    release_unused(model)

    assert resident_mb(checkpoint) < 0.1 * size
    with torch.no_grad():
        after = model(**inputs)[0]
    assert torch.equal(before, after)  # the weights still in use were not touched
