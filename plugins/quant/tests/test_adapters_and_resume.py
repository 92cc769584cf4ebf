"""LyCORIS on quantized bases (class-name presets, bypass mode, LoKr loading with lycoris), exact
resume with a quantized base, and the load-time paths (quantize_via=pipeline, quantization_config)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from .conftest import LORA, assert_loads_unquantized, generate, quantized_kind, train_in

# The HiDream seed's LoKr config, its factor scaled down for a 32-wide model.
SEED_LOKR = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 16384,
    "linear_alpha": 1,
    "full_matrix": True,
    "use_scalar": True,
    "factor": 4,
    "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 4}}},
}


def lycoris_run(
    run: Path, monkeypatch: pytest.MonkeyPatch, name: str, lycoris: dict[str, Any], **overrides: Any
) -> Any:
    path = run / "config" / f"{name}.json"
    path.write_text(json.dumps(lycoris))
    return train_in(run, monkeypatch, name, lora_type="lycoris", lycoris_config=f"config/{name}.json", **overrides)


def test_seed_lokr_on_an_int8_quanto_base_loads_with_lycoris(
    flux_run: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxPipeline
    from lycoris import create_lycoris_from_weights

    trained = lycoris_run(
        flux_run, monkeypatch, "lokr-quanto", SEED_LOKR, base_model_precision="int8-quanto", init_lokr_norm="1e-3"
    )
    network = trained.transformer.stune_lycoris
    assert network.loras and all(m.bypass_mode for m in network.loras)
    assert {type(m.org_module[0]).__name__ for m in network.loras} == {"QLinear"}
    weights = trained.output / LORA
    keys = load_file(str(weights)).keys()
    assert any(k.endswith(".lokr_w1") for k in keys)
    # init_lokr_norm drew lokr_w2 from the dequantized weights' spread, not from packed integers.
    w2 = load_file(str(weights))
    assert all(torch.isfinite(v).all() for v in w2.values())

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    loaded, _ = create_lycoris_from_weights(1.0, str(weights), pipe.transformer)
    assert len(loaded.loras) == len(network.loras) == len({k.split(".")[0] for k in keys})
    loaded.merge_to()
    assert (generate(pipe) - before).abs().max() > 1e-4


def test_lokr_on_a_torchao_base_runs_in_bypass_mode(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = lycoris_run(
        flux_run, monkeypatch, "lokr-torchao", SEED_LOKR, base_model_precision="int8-torchao", init_lokr_norm="1e-3"
    )
    network = trained.transformer.stune_lycoris
    assert network.loras and all(m.bypass_mode for m in network.loras)
    assert any(float(v.abs().sum()) > 0 for k, v in network.state_dict().items() if "lokr_w2" in k)  # it learned


def test_a_preset_naming_linear_matches_quantized_layers(
    flux_run: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LyCORIS matches module classes by name; `Linear` in a preset also means quanto's QLinear and
    bitsandbytes' LinearNF4 (a bare lycoris default would match nothing on a quanto base)."""
    from diffusers import FluxTransformer2DModel

    from stune.adapters import create_adapter
    from stune.plugins import PluginHost
    from stune.quantize import plan_targets
    from stune.session import prepare

    (flux_run / "config" / "lokr-linear.json").write_text(
        json.dumps({"algo": "lokr", "factor": 4, "apply_preset": {"target_module": ["Linear"], "module_algo_map": {}}})
    )
    monkeypatch.chdir(flux_run)
    for precision, kind in (("int4-quanto", "QLinear"), ("nf4-bnb", "LinearNF4")):
        host = PluginHost.build(["flux", "quant"])
        overrides = {
            "lora_type": "lycoris",
            "lycoris_config": "config/lokr-linear.json",
            "base_model_precision": precision,
        }
        session = prepare(host=host, overrides=overrides)
        transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").requires_grad_(
            False
        )
        [target] = plan_targets(session.config, session.family, None)
        host.quantizers[precision](session.config).quantize(transformer, target)
        adapter = create_adapter(transformer, session.family, session.config, torch.float32)
        kinds = {quantized_kind(m.org_module[0]) for m in adapter.network.loras}
        assert kinds == {kind, "Parameter"}  # the quantized layers, and the excluded plain ones


def test_bypass_mode_false_on_a_quantized_base_is_refused(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stune.errors import ConfigError

    with pytest.raises(ConfigError, match="sets bypass_mode false, which cannot train on a quantized base"):
        lycoris_run(
            flux_run,
            monkeypatch,
            "lokr-nobypass",
            {**SEED_LOKR, "bypass_mode": False},
            base_model_precision="int8-quanto",
        )


def test_resume_with_a_quantized_base_equals_an_uninterrupted_run(
    flux_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = {
        "base_model_precision": "int8-quanto",
        "checkpoint_step_interval": 2,
        "caption_dropout_probability": 0.3,
        "learning_rate": "1e-3",
    }
    whole = train_in(flux_run, monkeypatch, "resume-whole", max_train_steps=4, **common)
    first = train_in(flux_run, monkeypatch, "resume-split", max_train_steps=2, **common)
    assert first.result.final_step == 2
    second = train_in(
        flux_run, monkeypatch, "resume-split", max_train_steps=4, resume_from_checkpoint="latest", **common
    )
    assert second.result.final_step == 4
    a, b = load_file(str(whole.output / LORA)), load_file(str(second.output / LORA))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert [r["loss"] for r in whole.records[2:]] == pytest.approx([r["loss"] for r in second.records[2:]], abs=1e-6)


def test_quantize_via_pipeline_loads_int8_torchao_through_diffusers(
    flux_run: Path,
    unquantized: tuple[Any, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trained = train_in(
        flux_run, monkeypatch, "pipeline-torchao", base_model_precision="int8-torchao", quantize_via="pipeline"
    )
    transformer = trained.transformer
    assert transformer.config.quantization_config.quant_method == "torchao"  # loaded by diffusers' quantizer
    assert quantized_kind(transformer.transformer_blocks[0].attn.to_q) == "Int8Tensor"
    for name in ("proj_out", "x_embedder", "context_embedder"):  # the exclusions, mapped to None
        assert type(transformer.get_submodule(name).weight) is torch.nn.Parameter, name
    assert_loads_unquantized(unquantized, trained.output, caplog)


def test_quantize_via_pipeline_with_quanto_quantizes_after_loading(
    flux_run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="stune_quant"):
        trained = train_in(
            flux_run,
            monkeypatch,
            "pipeline-quanto",
            base_model_precision="int8-quanto",
            quantize_via="pipeline",
            max_train_steps=1,
        )
    assert "quantized block by block right after loading: diffusers 0.42 deprecates QuantoConfig" in caplog.text
    assert quantized_kind(trained.transformer.transformer_blocks[0].attn.to_q) == "QLinear"


def test_quantization_config_quantizes_while_loading(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"]).to_dict()
    (flux_run / "config" / "torchao.json").write_text(json.dumps(config))
    trained = train_in(flux_run, monkeypatch, "quantization-config", quantization_config="config/torchao.json")
    transformer = trained.transformer
    assert quantized_kind(transformer.transformer_blocks[0].attn.to_q) == "Int8Tensor"
    assert type(transformer.proj_out.weight) is torch.nn.Parameter
    assert (trained.output / LORA).is_file()
