"""LyCORIS, PEFT options, full fine-tuning and EMA on the tiny FLUX pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import stune
from stune.errors import ConfigError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run, generate

# The seed HiDream quickstart's LoKr config, factor scaled down for a 32-wide model.
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


def run_in(run: Path, monkeypatch: pytest.MonkeyPatch, *plugins: Any, **overrides: Any) -> Any:
    monkeypatch.chdir(run)
    session = prepare(
        overrides={k: str(v) for k, v in overrides.items()}, host=PluginHost.build(["flux"], plugins=list(plugins))
    )
    return session, train(session)


def test_seed_lokr_trains_and_loads_with_lycoris(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxPipeline
    from lycoris import create_lycoris_from_weights

    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        lora_type="lycoris",
        lycoris_config="config/lycoris_config.json",
        max_train_steps=4,
        learning_rate="1e-2",
        validation_prompt="a picture number 1",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
    )
    (run / "config" / "lycoris_config.json").write_text(json.dumps(SEED_LOKR))
    run_in(run, monkeypatch)
    out = run / "output"
    weights = out / "pytorch_lora_weights.safetensors"
    assert json.loads((out / "lycoris_config.json").read_text()) == SEED_LOKR
    with safe_open(str(weights), "pt") as handle:
        keys = list(handle.keys())
        assert json.loads(handle.metadata()["lycoris_config"])["algo"] == "lokr"
    assert keys and all(k.startswith("lycoris_") for k in keys)
    assert any(k.endswith(".lokr_w1") for k in keys)
    assert any("transformer_blocks_0_attn" in k for k in keys)  # FluxAttention, named Attention in the config

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    network, _ = create_lycoris_from_weights(1.0, str(weights), pipe.transformer)
    assert len(network.loras) == len({k.split(".")[0] for k in keys})
    network.merge_to()
    after = generate(pipe)
    assert (after - before).abs().max() > 1e-4


def test_lycoris_config_matching_nothing_names_the_config(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, lora_type="lycoris", lycoris_config="config/ly.json")
    (run / "config" / "ly.json").write_text(json.dumps({"algo": "lokr", "apply_preset": {"target_module": ["Nope"]}}))
    with pytest.raises(ConfigError, match=r"config/ly.json matches no module.*FluxAttention"):
        run_in(run, monkeypatch)


def test_lycoris_name_algo_map_with_fnmatch(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, lora_type="lycoris", lycoris_config="config/ly.json")
    (run / "config" / "ly.json").write_text(
        json.dumps(
            {
                "algo": "lokr",
                "factor": 4,
                "apply_preset": {
                    "target_module": [],
                    "name_algo_map": {"single_transformer_blocks.*.attn*": {"algo": "lora", "dim": 4}},
                    "use_fnmatch": True,
                },
            }
        )
    )
    run_in(run, monkeypatch)
    keys = load_file(str(run / "output" / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("lycoris_single_transformer_blocks_") for k in keys)


def test_init_lokr_norm(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Probe:
        __name__ = "probe"

        @stune.hookimpl
        def route_tokens(self, transformer: torch.nn.Module) -> None:
            net = transformer.stune_lycoris
            seen["w1"] = [m.lokr_w1.detach().clone() for m in net.loras]
            seen["w2"] = [m.lokr_w2.detach().clone() for m in net.loras]

    run = flux_run(tmp_path, tiny_flux_dir, lora_type="lycoris", lycoris_config="config/ly.json", init_lokr_norm=1e-3)
    (run / "config" / "ly.json").write_text(json.dumps(SEED_LOKR))
    run_in(run, monkeypatch, Probe())
    assert all(torch.all(w == 1) for w in seen["w1"])
    assert all(0 < w.std() < 1e-2 for w in seen["w2"])


def test_lycoris_resume(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        lora_type="lycoris",
        lycoris_config="config/ly.json",
        checkpoint_step_interval=1,
        max_train_steps=2,
    )
    (run / "config" / "ly.json").write_text(json.dumps(SEED_LOKR))
    run_in(run, monkeypatch)
    assert (run / "output" / "checkpoint-2" / "lycoris_config.json").is_file()
    _, second = run_in(run, monkeypatch, max_train_steps=3)
    assert second.final_step == 3


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_peft_init_types(init: str, tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, lora_init_type=init, max_train_steps=1)
    _, result = run_in(run, monkeypatch)
    assert result.final_step == 1


def test_loftq_needs_cuda(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = flux_run(tmp_path, tiny_flux_dir, lora_init_type="loftq")
    with pytest.raises(ConfigError, match="loftq"):
        run_in(run, monkeypatch)


def test_dora_loads_in_diffusers(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import FluxPipeline

    run = flux_run(tmp_path, tiny_flux_dir, use_dora="true", lora_dropout=0.0)
    run_in(run, monkeypatch)
    keys = load_file(str(run / "output" / "pytorch_lora_weights.safetensors")).keys()
    assert any("lora_magnitude_vector" in k for k in keys)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(run / "output")


def test_init_lora_starts_from_a_previous_adapter(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = flux_run(tmp_path / "a", tiny_flux_dir, learning_rate="1e-2")
    run_in(first, monkeypatch)
    trained = load_file(str(first / "output" / "pytorch_lora_weights.safetensors"))
    second = flux_run(
        tmp_path / "b",
        tiny_flux_dir,
        max_train_steps=1,
        learning_rate="1e-12",
        init_lora=str(first / "output" / "pytorch_lora_weights.safetensors"),
    )
    run_in(second, monkeypatch)
    again = load_file(str(second / "output" / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(trained[k], again[k], atol=1e-6) for k in trained)


def test_full_finetune_exports_a_diffusers_transformer(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    run = flux_run(tmp_path, tiny_flux_dir, model_type="full", learning_rate="1e-3", checkpoint_step_interval=1)
    run_in(run, monkeypatch)
    trained = FluxTransformer2DModel.from_pretrained(run / "output" / "transformer")
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > len(list(base.parameters())) // 2
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, transformer=trained)
    pipe.set_progress_bar_config(disable=True)
    generate(pipe)
    _, resumed = run_in(run, monkeypatch, max_train_steps=3)  # resume from the full checkpoint
    assert resumed.final_step == 3


def test_full_finetune_refuses_regularisation_data(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, model_type="full")
    datasets = json.loads((run / "config" / "multidatabackend.json").read_text())
    datasets[0]["is_regularisation_data"] = True
    (run / "config" / "multidatabackend.json").write_text(json.dumps(datasets))
    with pytest.raises(ConfigError, match="model_type=lora"):
        run_in(run, monkeypatch)


class WeightRecorder:
    __name__ = "weights"

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.after_step: list[dict[str, torch.Tensor]] = []

    @stune.hookimpl
    def route_tokens(self, transformer: torch.nn.Module) -> None:
        self.model = transformer

    @stune.hookimpl
    def on_step_end(self) -> None:
        assert self.model is not None
        self.after_step.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})


def test_ema_follows_the_weights_and_is_exported(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    recorder = WeightRecorder()
    run = flux_run(tmp_path, tiny_flux_dir, use_ema="true", ema_decay=0.5, max_train_steps=3, learning_rate="1e-2")
    run_in(run, monkeypatch, recorder)
    names = list(recorder.after_step[0])
    assert recorder.model is not None
    ema_files = run / "output" / "ema" / "pytorch_lora_weights.safetensors"
    assert ema_files.is_file()
    ema = load_file(str(ema_files))
    trained = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    assert ema.keys() == trained.keys()
    key = next(k for k in ema if "lora_B" in k)
    name = next(n for n in names if key.removeprefix("transformer.").replace(".weight", "") in n)
    # shadow: s0 = 0 (lora_B starts at zero), s_k = 0.5·s_{k-1} + 0.5·w_k
    shadow = torch.zeros_like(recorder.after_step[0][name])
    for weights in recorder.after_step:
        shadow = 0.5 * shadow + 0.5 * weights[name]
    assert torch.allclose(ema[key].float(), shadow, atol=1e-6)
    assert not torch.allclose(ema[key], trained[key])
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(run / "output" / "ema", adapter_name="ema")
    assert len(get_peft_model_state_dict(pipe.transformer, adapter_name="ema")) == len(ema)


def test_ema_resume_is_exact(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"use_ema": "true", "ema_decay": 0.7, "max_train_steps": 4, "checkpoint_step_interval": 2}
    whole = flux_run(tmp_path / "whole", tiny_flux_dir, **options)
    run_in(whole, monkeypatch)
    split = flux_run(tmp_path / "split", tiny_flux_dir, **options)
    run_in(split, monkeypatch, max_train_steps=2)
    run_in(split, monkeypatch)
    for part in ("", "ema/"):
        a = load_file(str(whole / "output" / f"{part}pytorch_lora_weights.safetensors"))
        b = load_file(str(split / "output" / f"{part}pytorch_lora_weights.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), part


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("comparison", {"step-000002-validation-64x64.png", "step-000002-ema-validation-64x64.png"}),
        ("ema_only", {"step-000002-ema-validation-64x64.png"}),
        ("none", {"step-000002-validation-64x64.png"}),
    ],
)
def test_ema_validation_modes(
    mode: str, expected: set[str], tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        use_ema="true",
        ema_validation=mode,
        validation_prompt="a picture number 1",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        disable_benchmark="true",
    )
    run_in(run, monkeypatch)
    assert {p.name for p in (run / "output" / "validation_images").iterdir()} == expected
