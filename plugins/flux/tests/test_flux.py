"""The FLUX family on a tiny random FLUX pipeline: training, diffusers loading, caches, options."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import stune
from stune.errors import ConfigError
from stune.family import LoadRequest, match_modules
from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, run_cli, step_inputs, write_run
from stune.train import train


def flux_run(folder: Path, model: Path, images: int = 4, **options: Any) -> Path:
    make_images(folder / "data", images, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 2,
        "train_batch_size": 2,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "gradient_checkpointing": "true",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        **options,
    }
    datasets = [
        {"id": "pics", "type": "local", "instance_data_dir": "data", "cache_dir_vae": "cache/vae/pics"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def generate(pipe: Any) -> torch.Tensor:
    image = pipe(
        "a picture number 1",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=16,
    ).images[0]
    return image


def test_cli_trains_a_lora_that_loads_in_diffusers(tmp_path: Path, tiny_flux_dir: Path, caplog: Any) -> None:
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        max_train_steps=6,
        checkpoint_step_interval=3,
        validation_prompt="a picture number 1",
        validation_step_interval=3,
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        lora_rank=4,
        lora_alpha=8,
    )
    proc = run_cli(["--plugin", "flux"], cwd=run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "output"
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    assert sorted(p.name for p in (out / "validation_images").iterdir()) == [
        "base-validation-64x64.png",  # the base model, before training (disable_benchmark=false)
        "step-000003-validation-64x64.png",
        "step-000006-validation-64x64.png",
    ]
    assert (out / "checkpoint-6" / "checkpoint_complete.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "step_seconds", "samples_per_second"} <= set(records[0])

    with safe_open(str(lora), "pt") as handle:
        file_keys = set(handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.") and ".lora_" in k for k in file_keys)
    # lora_alpha 8 / rank 4 is folded into lora_B (scale 2) and recorded as alpha = rank, so loaders
    # that ignore the metadata (ComfyUI) apply the trained strength too (lora_format diffusers).
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(out, adapter_name="trained")
    key_warnings = [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
    assert not key_warnings
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == file_keys  # nothing missing, nothing unexpected
    after = generate(pipe)
    assert (after - before).abs().max() > 1e-4  # the LoRA changes the image


def _host_recording_loads(calls: list[dict[str, Any]]) -> PluginHost:
    class Recorder:
        __name__ = "recorder"

        @stune.hookimpl(wrapper=True)
        def load_model(self, request: LoadRequest) -> Any:
            calls.append({"text_encoders": request.text_encoders})
            return (yield)

    return PluginHost.build(["flux"], plugins=[Recorder()])


def test_second_run_encodes_nothing_and_resolution_change_reencodes(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(tmp_path, tiny_flux_dir)
    monkeypatch.chdir(run)
    calls: list[dict[str, Any]] = []
    first = train(prepare(host=_host_recording_loads(calls)))
    assert (first.encoded_latents, first.encoded_captions) == (4, 5)  # 4 captions and the dropped one
    cache_files = {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")}
    assert len(cache_files) == 9

    second = train(prepare(overrides={"output_dir": "output2"}, host=_host_recording_loads(calls)))
    assert (second.encoded_latents, second.encoded_captions) == (0, 0)
    assert {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")} == cache_files
    assert calls == [{"text_encoders": True}, {"text_encoders": False}]  # T5 was not even loaded

    third = train(prepare(overrides={"output_dir": "output3", "resolution": "128"}, host=_host_recording_loads(calls)))
    assert (third.encoded_latents, third.encoded_captions) == (4, 0)

    # Text and latents have separate cache identities: a text-encoder option re-encodes captions only.
    fourth = train(
        prepare(overrides={"output_dir": "output4", "t5_padding": "zero"}, host=_host_recording_loads(calls))
    )
    assert (fourth.encoded_latents, fourth.encoded_captions) == (0, 5)


def test_changed_image_is_reencoded(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir)
    monkeypatch.chdir(run)
    train(prepare(host=PluginHost.build(["flux"])))
    image = run / "data" / "image_000.png"
    image.write_bytes((run / "data" / "image_001.png").read_bytes())
    again = train(prepare(overrides={"output_dir": "o2"}, host=PluginHost.build(["flux"])))
    assert again.encoded_latents == 1


@pytest.fixture(scope="module")
def wide_transformer() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=21,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def _family(**options: Any) -> Any:
    host = PluginHost.build(["flux"])
    config = host.config_model().model_validate({"model_family": "flux", **options})
    family = host.family_class("flux")(config)
    family.apply_defaults()
    return family


@pytest.mark.parametrize(
    "preset,allowed,count",
    [
        (
            "all",
            ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
            2 * 8 + 21 * 3,
        ),
        ("context", ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), 2 * 4),
        (
            "context+ffs",
            ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2"),
            2 * 6,
        ),
        ("all+ffs", None, 2 * 8 + 21 * 3 + 2 * 4 + 21 * 2 + 1),
        ("all+ffs+embedder", None, 2 * 8 + 21 * 3 + 2 * 4 + 21 * 2 + 1 + 1),
        ("ai-toolkit", None, 2 * 8 + 21 * 3 + 2 * 4 + 21 * 2 + 1 + 21 + 2 * 2),
        ("tiny", ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"), 2),
        ("nano", ("single_transformer_blocks.7.proj_out",), 1),
    ],
)
def test_lora_target_presets(wide_transformer: torch.nn.Module, preset: str, allowed: Any, count: int) -> None:
    names = [n for n, m in wide_transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = match_modules(names, _family(flux_lora_target=preset).lora_target_modules())
    assert len(matched) == count
    if allowed:
        assert all(any(n == a or n.endswith("." + a) for a in allowed) for n in matched)


def test_peft_target_modules_override() -> None:
    family = _family(peft_lora_target_modules='["to_q", "to_k"]')
    assert family.lora_target_modules() == ["to_q", "to_k"]


def test_flavours_and_limits() -> None:
    assert _family().model_path() == "black-forest-labs/FLUX.1-Krea-dev"
    assert _family(model_flavour="dev").model_path() == "black-forest-labs/FLUX.1-dev"
    assert _family(model_flavour="libreflux").model_path() == "jimmycarter/LibreFlux-SimpleTuner"
    assert _family(model_flavour="libreflux").config.flux_attention_masked_training is True
    assert _family(model_flavour="schnell").config.tokenizer_max_length == 256
    assert _family().config.tokenizer_max_length == 512
    assert _family(pretrained_model_name_or_path="/models/x").model_path() == "/models/x"
    with pytest.raises(ConfigError, match="at most 256"):
        _family(model_flavour="schnell", tokenizer_max_length=300).check_config()
    with pytest.raises(ConfigError, match="not a flux flavour"):
        _family(model_flavour="pro").check_config()


def test_attention_mask_and_t5_zero_padding(tiny_flux_dir: Path) -> None:
    family = _family(
        pretrained_model_name_or_path=str(tiny_flux_dir),
        tokenizer_max_length=16,
        t5_padding="zero",
        mixed_precision="no",
    )
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    [embeds] = family.encode_prompts(components, ["a red circle"])
    padding = embeds["attention_mask"] == 0
    assert padding.any() and torch.all(embeds["prompt_embeds"][padding] == 0)

    family.options.t5_padding = "unmodified"
    [raw] = family.encode_prompts(components, ["a red circle"])
    inputs = step_inputs(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), {k: v[None] for k, v in raw.items()})
    plain = family.predict(components.transformer, inputs).velocity
    family.options.flux_attention_masked_training = True
    masked = family.predict(components.transformer, inputs).velocity
    assert plain.shape == masked.shape == (1, 16, 8, 8)
    assert not torch.allclose(plain, masked)  # padding tokens no longer attended to


def test_captions_longer_than_t5_reads_are_counted_and_reported(
    tiny_flux_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    family = _family(pretrained_model_name_or_path=str(tiny_flux_dir), tokenizer_max_length=16, mixed_precision="no")
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    long = "a red circle on a blue square beside a green triangle under a yellow star " * 8
    family.encode_prompts(components, ["a red circle", long])
    family.encode_prompts(components, [long + "again"])
    assert {label: (cut.count, cut.max_length, cut.main) for label, cut in family.truncated.items()} == {
        "CLIP-L": (2, 77, False),
        "T5-XXL": (2, 16, True),
    }
    with caplog.at_level(logging.INFO, logger="stune.text"):
        family.report_truncation()
    t5 = next(r for r in caplog.records if "T5-XXL" in r.message)
    assert t5.levelno == logging.WARNING
    assert t5.message.startswith("2 captions are longer than T5-XXL's 16 tokens: the rest is cut (e.g. 'a red circle")
    clip = next(r for r in caplog.records if "CLIP-L" in r.message)
    assert clip.levelno == logging.INFO  # T5 reads the whole caption: CLIP's cut is routine
    assert not family.truncated  # reported once
    family.encode_prompts(components, ["a red circle"])
    assert not family.truncated


def test_masked_training_run(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, flux_attention_masked_training="true", t5_padding="zero")
    monkeypatch.chdir(run)
    result = train(prepare(host=PluginHost.build(["flux"])))
    assert result.final_step == 2


def test_unreachable_hub_id_is_a_user_error(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = flux_run(tmp_path, tiny_flux_dir, pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev")
    proc = run_cli(["--plugin", "flux"], cwd=run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Could not load the FLUX model from 'black-forest-labs/FLUX.1-dev'" in proc.stderr
    assert "Traceback" not in proc.stderr
