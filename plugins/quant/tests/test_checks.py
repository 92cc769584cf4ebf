"""What is refused before anything loads (one sentence each), the options the plugin owns, and what a
normal run prints: fast tests, no training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import stune
from stune.errors import ConfigError, UserError
from stune.plugins import PluginHost
from stune.quantize import QuantizeTarget
from stune.session import prepare
from stune.testing import offline_env, run_cli
from stune_quant import quantizers
from stune_quant.options import QuantOptions
from stune_quant.quantizers import BlockwiseQuantizer, QuantoQuantizer, bnb_skip_modules, excluded


def check(run: Path, monkeypatch: pytest.MonkeyPatch, *plugins: Any, **overrides: Any) -> Any:
    monkeypatch.chdir(run)
    host = PluginHost.build(["flux", "quant"], plugins=list(plugins))
    return prepare(host=host, overrides={k: str(v) for k, v in overrides.items()})


def test_options_are_the_catalog_entry() -> None:
    host = PluginHost.build(["quant"])
    assert set(QuantOptions.model_fields) == set(host.catalog["quant"].options)
    for name, field in QuantOptions.model_fields.items():
        assert field.description, name
    model = PluginHost.build(["flux", "quant"]).config_model()
    assert model.model_fields["base_model_precision"].default == "no_change"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_model_precision": "fp8-torchao"}, "needs a CUDA GPU of compute capability ≥ 8.9"),
        ({"base_model_precision": "int8dq-torchao"}, "int8dq-torchao needs a CUDA GPU"),
        ({"quantize_activations": "true"}, "optimum-quanto has no gradient through quantized activations"),
        ({"base_model_precision": "bf16", "mixed_precision": "no"}, "needs autocast; set mixed_precision=bf16"),
        ({"base_model_precision": "int8-quanto", "model_type": "full"}, "model_type=full cannot train a quantized"),
        ({"text_encoder_3_precision": "int8-quanto"}, "names a text encoder flux does not have"),
        ({"base_model_precision": "int9-quanto"}, "not an installed precision"),
        (
            {"base_model_precision": "int8-quanto", "quantization_config": '{"load_in_4bit": true}'},
            "keep one of them",
        ),
        ({"quantization_config": '{"load_in_4bit": true}', "model_type": "full"}, "use model_type=lora"),
        ({"quantization_config": '{"load_in_4bit": true}'}, "loads only onto a CUDA GPU"),
        ({"quantization_config": '{"quant_method": "nope"}'}, "not a diffusers quantization config"),
        ({"quantization_config": "{not json"}, "quantization_config is not valid JSON"),
        ({"quantization_config": "config/missing.json"}, "does not exist"),
    ],
)
def test_refused_with_one_sentence(
    overrides: dict[str, str], message: str, flux_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises((ConfigError, UserError)) as caught:
        check(flux_run, monkeypatch, **overrides)
    text = str(caught.value)
    assert message in text
    assert text.count(". ") == 0 and text.endswith("."), text  # one sentence


def test_what_is_allowed(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for overrides in (
        {"base_model_precision": "bf16", "model_type": "full", "mixed_precision": "bf16"},  # not quantized
        {"base_model_precision": "fp32", "mixed_precision": "no"},
        {"base_model_precision": "nf4-bnb", "text_encoder_2_precision": "int4-quanto", "quantize_via": "cpu"},
        {"base_model_precision": "int8-torchao", "quantize_via": "pipeline"},
    ):
        check(flux_run, monkeypatch, **overrides)


def test_loftq_on_a_quanto_base_is_refused(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The core refuses loftq on any machine without CUDA first; the quantizer's own rule is checked directly.
    session = check(flux_run, monkeypatch, base_model_precision="int8-quanto")
    session.config.lora_init_type = "loftq"
    target = QuantizeTarget("transformer", "base_model_precision", "int8-quanto", (), None)
    with pytest.raises(ConfigError, match="lora_init_type=loftq cannot start from a int8-quanto base"):
        QuantoQuantizer(session.config).check(target, session.family)


def test_a_missing_backend_names_the_extra(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing(BlockwiseQuantizer):
        name = "missing"
        precisions = ("int8-missing",)
        package = "stune_quant_no_such_backend"
        extra = "missing"

    class Plugin:
        __name__ = "missing-backend"

        @stune.hookimpl
        def register_quantizers(self, register: Any) -> None:
            register(Missing)

    with pytest.raises(UserError, match=r"pip install 'stune-quant\[missing\]'"):
        check(flux_run, monkeypatch, Plugin(), base_model_precision="int8-missing")


def test_int4_quanto_without_a_compiler_is_refused(
    flux_run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(quantizers, "quanto_extension_built", lambda extension: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or ninja
    with pytest.raises(UserError, match=r"quanto_cpp extension, which is not built and cannot be built here"):
        check(flux_run, monkeypatch, base_model_precision="int4-quanto")


def test_the_cli_refuses_without_a_traceback(flux_run: Path) -> None:
    proc = run_cli(["check", "--quick", "--base_model_precision=fp8-torchao"], cwd=flux_run)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "fp8-torchao needs a CUDA GPU of compute capability ≥ 8.9" in proc.stderr


def test_exclusions_match_full_module_names() -> None:
    flux = ("*.norm", "*.norm1", "proj_out", "x_embedder")
    assert excluded("proj_out", flux) and excluded("x_embedder", flux)
    assert excluded("transformer_blocks.0.norm1", flux)
    assert not excluded("single_transformer_blocks.0.proj_out", flux)  # only the top-level one
    assert not excluded("transformer_blocks.0.norm1.linear", flux)
    assert excluded("transformer_blocks.3.ff.net.2", ("*.ff.*",))
    # BitsAndBytesConfig skips by name or name prefix: the patterns' literal cores.
    assert bnb_skip_modules(("*.norm", "proj_out", "*.ff.*", "pos_embed*", "*norm*")) == [
        "ff",
        "norm",
        "pos_embed",
        "proj_out",
    ]


def test_registration_is_light_and_backend_notices_stay_out_of_the_output() -> None:
    """Registering the plugin imports no torch (`st-train --help` stays fast); a run's import of
    diffusers (which imports bitsandbytes and torchao) prints none of their notices, while anything
    else those loggers say still shows."""
    code = (
        "import logging, sys; from stune.plugins import PluginHost; PluginHost.build(['quant']); "
        "import stune_quant.options, stune_quant.quiet, stune_quant.checks; "
        "heavy = ('torch', 'diffusers', 'optimum', 'torchao', 'bitsandbytes'); "
        "print('heavy:', sorted(m for m in heavy if m in sys.modules), flush=True); "
        "import diffusers.models.modeling_utils; "
        "logging.getLogger('torchao').warning('a real torchao problem'); "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a real bitsandbytes problem')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env())
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout
    for noise in ("_C_mxfp8", "gemm_4bit_forward", "is an Enum subclass", "Unable to import `torchao`", "no triton"):
        assert noise not in proc.stderr, proc.stderr
    assert "a real torchao problem" in proc.stderr and "a real bitsandbytes problem" in proc.stderr


def test_quantization_config_from_a_file(flux_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = flux_run / "config" / "quantization.json"
    path.write_text(json.dumps({"quant_method": "nope"}))
    with pytest.raises(ConfigError, match="not a diffusers quantization config"):
        check(flux_run, monkeypatch, quantization_config="config/quantization.json")


def test_a_base_that_passes_no_gradient_stops_the_run(tiny_flux_dir: Path) -> None:
    """The probe after quantizing (it guards the CUDA-only paths, which cannot be checked in advance):
    torchao's int8 dynamic activations pass no gradient on the CPU, so the quantized base is refused."""
    from diffusers import FluxTransformer2DModel

    from stune_flux.family import FluxFamily
    from stune_quant.quantizers import TorchaoQuantizer

    config = PluginHost.build(["flux", "quant"]).config_model().model_validate({})
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    target = QuantizeTarget(
        "transformer", "base_model_precision", "int8dq-torchao", FluxFamily.quantization_exclusions, None
    )
    with pytest.raises(UserError, match="int8dq-torchao passes no gradient back through the quantized base"):
        TorchaoQuantizer(config).quantize(transformer, target)


def test_int4_quanto_trains_on_the_cpu_in_the_plain_layout() -> None:
    """quanto packs bf16 int4 weights in groups of 128 for tinygemm, whose CPU backward unpacks through
    an identity matmul (seconds per FLUX-size layer); on the CPU the layers keep quanto's plain int4
    layout (groups of 64)."""
    import torch

    config = PluginHost.build(["flux", "quant"]).config_model().model_validate({})
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).to(torch.bfloat16)
    model.requires_grad_(False)
    reference = model[0].weight.float().clone()
    target = QuantizeTarget("text_encoder", "text_encoder_1_precision", "int4-quanto", (), None)
    QuantoQuantizer(config).quantize(model, target)
    assert [type(layer.weight).__name__ for layer in model] == ["WeightQBitsTensor", "WeightQBitsTensor"]
    assert model[0].weight_group_size == 64
    assert (model[0].weight.dequantize().float() - reference).abs().mean() < 0.1 * reference.abs().mean()
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    model(x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
