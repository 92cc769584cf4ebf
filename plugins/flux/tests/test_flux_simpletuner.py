"""SimpleTuner options of issue 15 on a tiny FLUX: lora_format (diffusers / comfyui), the assistant
LoRA, flux_lora_init, flux_lora_module_type and validation previews decoded by a tiny autoencoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

from .test_flux import flux_run

LORA = "pytorch_lora_weights.safetensors"


def _comfyui_flux_unet_keys(depth: int, depth_single: int) -> set[str]:
    """The diffusers module names ComfyUI maps for a FLUX model, re-derived from ComfyUI's source:
    comfy/utils.py ``flux_to_diffusers`` (the diffusers weight names of every double and single
    block and of the embedders), which comfy/lora.py ``model_lora_keys_unet`` turns into the LoRA
    keys ``transformer.<name without .weight>`` for ``comfy.model_base.Flux``; ``load_lora`` then
    reads ``<key>.lora_up.weight``, ``<key>.lora_down.weight`` and the scalar ``<key>.alpha``."""
    names = set()
    for i in range(depth):
        block = f"transformer_blocks.{i}"
        for attn in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            names.add(f"{block}.attn.{attn}")
        for other in ("norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2"):
            names.add(f"{block}.{other}")
        names |= {f"{block}.ff_context.net.0.proj", f"{block}.ff_context.net.2"}
    for i in range(depth_single):
        block = f"single_transformer_blocks.{i}"
        names |= {f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"}
        names |= {f"{block}.norm.linear", f"{block}.proj_out"}
    names |= {"proj_out", "x_embedder", "context_embedder", "norm_out.linear"}
    names |= {f"time_text_embed.{e}_embedder.linear_{n}" for e in ("timestep", "text", "guidance") for n in (1, 2)}
    return {f"transformer.{name}" for name in names}


def _image(pipe: Any, seed: int = 0) -> torch.Tensor:
    return pipe(
        "a picture number 1",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=16,
    ).images[0]


@pytest.fixture(scope="module")
def two_formats(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> dict[str, Path]:
    """The same training (rank 4, alpha 8) exported as diffusers and as comfyui."""
    outputs = {}
    for fmt in ("diffusers", "comfyui"):
        run = flux_run(
            tmp_path_factory.mktemp(fmt),
            tiny_flux_dir,
            lora_rank=4,
            lora_alpha=8,
            lora_format=fmt,
            learning_rate="3e-2",
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(run)
            train(prepare(host=PluginHost.build(["flux"])))
        outputs[fmt] = run / "output"
    return outputs


def test_lora_format_comfyui_keys_and_alpha(two_formats: dict[str, Path]) -> None:
    with safe_open(str(two_formats["comfyui"] / LORA), "pt") as handle:
        keys = set(handle.keys())
    modules = {k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}
    assert modules and modules <= _comfyui_flux_unet_keys(depth=1, depth_single=2)
    for module in modules:  # every module: down, up and its alpha, nothing else
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= keys
    assert len(keys) == 3 * len(modules)
    weights = load_file(str(two_formats["comfyui"] / LORA))
    assert {float(weights[f"{m}.alpha"]) for m in modules} == {8.0}
    assert weights[next(iter(modules)) + ".lora_down.weight"].shape[0] == 4


def test_lora_format_comfyui_converts_back_exactly(two_formats: dict[str, Path], tiny_flux_dir: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from stune.adapters import read_comfyui_lora
    from stune_flux.family import FluxFamily

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"]))
    family = FluxFamily.__new__(FluxFamily)
    state_dict, alpha = read_comfyui_lora(two_formats["comfyui"] / LORA, transformer, family)
    assert alpha == 8.0  # scale 8 / 4 = 2, as trained
    comfy = load_file(str(two_formats["comfyui"] / LORA))
    for key, value in state_dict.items():
        module, _, part = key.rpartition(".lora_")
        source = f"transformer.{module}.lora_{'down' if part == 'A.weight' else 'up'}.weight"
        assert torch.equal(value, comfy[source])
    # The diffusers file holds the same training with the scale folded into lora_B (alpha = rank).
    diffusers = load_file(str(two_formats["diffusers"] / LORA))
    assert {f"transformer.{k}" for k in state_dict} == set(diffusers)
    for key, value in state_dict.items():
        expected = value * 2 if ".lora_B." in key else value
        assert torch.equal(diffusers[f"transformer.{key}"], expected)
    with safe_open(str(two_formats["diffusers"] / LORA), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4
    assert metadata["transformer.lora_dropout"] == 0  # training-only; diffusers would apply it at inference


def test_lora_format_both_files_give_the_same_image_in_diffusers(
    two_formats: dict[str, Path], tiny_flux_dir: Path
) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    base = _image(pipe)
    images = {}
    for fmt, folder in two_formats.items():
        pipe.load_lora_weights(folder / LORA, adapter_name=fmt)
        pipe.set_adapters(fmt)
        # No .eval(): diffusers adds the LoRA layers in training mode, so the files record lora_dropout 0.
        images[fmt] = _image(pipe)
        pipe.delete_adapters(fmt)
    # The trained model itself: the comfyui weights as they are in a PEFT LoRA with alpha 8, rank 4.
    from peft import LoraConfig, set_peft_model_state_dict

    from stune.adapters import read_comfyui_lora
    from stune_flux.family import FluxFamily

    with safe_open(str(two_formats["comfyui"] / LORA), "pt") as handle:
        targets = json.loads(handle.metadata()["lora_adapter_metadata"])["transformer.target_modules"]
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="trained")
    trained, _ = read_comfyui_lora(two_formats["comfyui"] / LORA, pipe.transformer, FluxFamily.__new__(FluxFamily))
    set_peft_model_state_dict(pipe.transformer, trained, adapter_name="trained")
    pipe.transformer.set_adapter("trained")
    pipe.transformer.eval()
    reference = _image(pipe)
    effect = float((reference - base).abs().max())
    errors = {fmt: float((image - reference).abs().max()) for fmt, image in images.items()}
    # Rounding only (lora_B·2 against 2·(lora_B·x)); half the strength would differ by about effect / 2.
    assert effect > 100 * max(errors.values()), (effect, errors)
    assert max(errors.values()) < 1e-5, errors


def test_lora_format_diffusers_resumes_exactly_and_init_lora_keeps_the_strength(
    tmp_path: Path, tiny_flux_dir: Path, two_formats: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # alpha 12 / rank 8: a scale of 1.5 folded into the exported lora_B is rounded; checkpoints keep
    # the trained lora_B beside it, so a stopped and resumed run ends bit-identical to an unbroken one.
    options = {"lora_rank": 8, "lora_alpha": 12, "max_train_steps": 2, "checkpoint_step_interval": 1}
    finals = {}
    for name, stops in (("whole", [2]), ("split", [1, 2])):
        run = flux_run(tmp_path / name, tiny_flux_dir, learning_rate="1e-2", **options)
        monkeypatch.chdir(run)
        for stop in stops:
            train(prepare(overrides={"max_train_steps": str(stop)}, host=PluginHost.build(["flux"])))
        finals[name] = load_file(str(run / "output" / LORA))
    assert all(torch.equal(finals["whole"][k], finals["split"][k]) for k in finals["whole"])

    # init_lora reads either layout and converts the file's scale to this run's alpha (8 here).
    trained = load_file(str(two_formats["diffusers"] / LORA))
    for fmt, folder in two_formats.items():
        run = flux_run(
            tmp_path / f"init-{fmt}",
            tiny_flux_dir,
            max_train_steps=1,
            learning_rate="1e-12",
            lora_rank=4,
            lora_alpha=8,
            init_lora=str(folder / LORA),
        )
        monkeypatch.chdir(run)
        train(prepare(host=PluginHost.build(["flux"])))
        again = load_file(str(run / "output" / LORA))
        assert all(torch.allclose(trained[k], again[k], atol=1e-6) for k in trained), fmt


# -- flux_lora_init and flux_lora_module_type -------------------------------------------------------


def _lora_modules(output: Path) -> set[str]:
    return {k.split(".lora_")[0].removeprefix("transformer.") for k in load_file(str(output / LORA))}


def test_flux_lora_module_type_and_flux_lora_init(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stune.errors import ConfigError

    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        max_train_steps=1,
        learning_rate="1e-12",  # the saved LoRA is its initialisation
        flux_lora_init="gaussian",
        flux_lora_target="all+ffs",
        flux_lora_module_type="feedforward",
    )
    monkeypatch.chdir(run)
    session = prepare(host=PluginHost.build(["flux"]))
    assert session.config.lora_init_type == "gaussian"  # → PEFT init_lora_weights="gaussian"
    train(session)
    # gaussian draws lora_A from N(0, 1/r); PEFT's default (kaiming-uniform, a = sqrt 5) stays within
    # ±1/sqrt(fan_in), which a normal of std 1/16 leaves.
    weights = load_file(str(run / "output" / LORA))
    key = next(k for k in weights if k.endswith("proj_mlp.lora_A.weight"))
    assert weights[key].abs().max() > weights[key].shape[1] ** -0.5
    modules = _lora_modules(run / "output")
    assert modules and all(m.endswith((".net.0.proj", ".net.2", "proj_mlp", "proj_out")) for m in modules)
    assert not any(".attn." in m for m in modules)

    attention = prepare(overrides={"flux_lora_module_type": "attention"}, host=PluginHost.build(["flux"]))
    assert set(attention.family.lora_target_modules()) <= {
        "to_q", "to_k", "to_v", "to_qkv", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "add_qkv_proj",
        "to_add_out",
    }  # fmt: skip
    with pytest.raises(ConfigError, match="flux_lora_module_type"):
        prepare(overrides={"flux_lora_target": "all"}, host=PluginHost.build(["flux"]))  # all has no feed-forward


def test_flux_lora_init_is_lora_init_type(tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stune.errors import ConfigError

    run = flux_run(tmp_path, tiny_flux_dir, flux_lora_init="olora")
    monkeypatch.chdir(run)
    assert prepare(host=PluginHost.build(["flux"])).config.lora_init_type == "olora"
    with pytest.raises(ConfigError, match="flux_lora_init"):
        prepare(overrides={"lora_init_type": "pissa"}, host=PluginHost.build(["flux"]))


# -- the assistant LoRA ------------------------------------------------------------------------------


class Keeper:
    """Keeps the transformer stune trains (route_tokens hands it over after the adapter is added)."""

    __name__ = "keeper"
    transformer: Any = None

    import stune as _stune

    @_stune.hookimpl
    def route_tokens(self, transformer: Any) -> None:
        self.transformer = transformer


@pytest.fixture(scope="module")
def assistant_file(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> Path:
    """A tiny LoRA (rank 2, non-zero) on the attention projections, saved as diffusers saves LoRAs."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("assistant")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / LORA


@pytest.fixture(scope="module")
def assistant_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path, assistant_file: Path
) -> dict[str, dict[str, Any]]:
    """Five 2-step runs (lr ~0, so images and losses show the assistant alone): without an assistant,
    with it (strength 1), at strength 0.5, with inference strength 1, and disabled."""
    validation = {
        "validation_prompt": "a picture number 1",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        "disable_benchmark": "true",
        "learning_rate": "1e-12",
    }
    path = str(assistant_file)
    results: dict[str, dict[str, Any]] = {}
    for name, extra in {
        "none": {},
        "assistant": {"assistant_lora_path": path},
        "half": {"assistant_lora_path": path, "assistant_lora_strength": 0.5},
        "inference": {"assistant_lora_path": path, "assistant_lora_inference_strength": 1.0},
        "disabled": {"assistant_lora_path": path, "disable_assistant_lora": "true"},
    }.items():
        run = flux_run(tmp_path_factory.mktemp(f"assistant-{name}"), tiny_flux_dir, **validation, **extra)
        keeper = Keeper()
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(run)
            train(prepare(host=PluginHost.build(["flux"], plugins=[keeper])))
        out = run / "output"
        model = keeper.transformer
        results[name] = {
            "loss": json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"],
            "image": (out / "validation_images" / "step-000002-validation-64x64.png").read_bytes(),
            "keys": set(load_file(str(out / LORA))),
            "adapters": set(getattr(model, "peft_config", {})),
            "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
            "assistant_weights": {n: p.detach().clone() for n, p in model.named_parameters() if ".assistant." in n},
        }
    return results


def test_assistant_lora_path_is_loaded_frozen_and_not_saved(
    assistant_runs: dict[str, dict[str, Any]], assistant_file: Path
) -> None:
    none, assistant = assistant_runs["none"], assistant_runs["assistant"]
    assert assistant["adapters"] == {"default", "assistant"}  # a second, named PEFT adapter
    assert assistant["loss"] != none["loss"]  # trained with the assistant active
    assert assistant["keys"] == none["keys"]  # the output LoRA holds only the trained adapter
    assert assistant["trainable"] and not any(".assistant." in n for n in assistant["trainable"])
    original = load_file(str(assistant_file))
    assert assistant["assistant_weights"]
    for name, value in assistant["assistant_weights"].items():  # frozen: as loaded, after training
        module = name.replace(".assistant", "").removesuffix(".weight")
        assert torch.equal(value, original[f"transformer.{module}.weight"].to(value.dtype))


def test_assistant_lora_strength_weighs_it_while_training(assistant_runs: dict[str, dict[str, Any]]) -> None:
    losses = {name: assistant_runs[name]["loss"] for name in ("none", "half", "assistant")}
    assert len(set(losses.values())) == 3, losses


def test_assistant_lora_inference_strength_in_validation_images(assistant_runs: dict[str, dict[str, Any]]) -> None:
    # 0 (default) takes it out of the validation images; 1 keeps it in.
    assert assistant_runs["assistant"]["image"] == assistant_runs["none"]["image"]
    assert assistant_runs["inference"]["image"] != assistant_runs["none"]["image"]


def test_disable_assistant_lora_loads_nothing(assistant_runs: dict[str, dict[str, Any]]) -> None:
    assert assistant_runs["disabled"]["adapters"] == {"default"}
    assert assistant_runs["disabled"]["loss"] == assistant_runs["none"]["loss"]


# -- validation previews decoded by a tiny autoencoder ----------------------------------------------


def test_validation_preview_steps_decoded_by_the_tiny_autoencoder(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from diffusers import AutoencoderTiny
    from PIL import Image

    # A tiny AutoencoderTiny with FLUX's 16 latent channels whose decoder outputs a constant: every
    # preview it decodes is one flat grey, which the full VAE never gives.
    tiny = AutoencoderTiny(
        latent_channels=16,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    with torch.no_grad():
        for param in tiny.decoder.parameters():
            param.zero_()
        tiny.decoder.layers[-1].bias.fill_(0.25)  # → 0.25·2 − 1 = −0.5 → pixel value 64
    tiny.save_pretrained(tmp_path / "taef1")
    run = flux_run(
        tmp_path / "run",
        tiny_flux_dir,
        validation_prompt="a picture number 1",
        validation_resolution="64x64",
        validation_num_inference_steps=4,
        disable_benchmark="true",
        validation_preview="true",
        validation_preview_steps=2,
        validation_preview_autoencoder=str(tmp_path / "taef1"),
    )
    monkeypatch.chdir(run)
    train(prepare(host=PluginHost.build(["flux"])))
    folder = run / "output" / "validation_images"
    previews = sorted((folder / "previews").iterdir())
    assert [p.name for p in previews] == [
        "step-000002-validation-64x64-s002.png",
        "step-000002-validation-64x64-s004.png",
    ]
    for path in previews:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (64, 64, 3) and set(np.unique(pixels)) <= {63, 64}
    final = np.asarray(Image.open(folder / "step-000002-validation-64x64.png").convert("RGB"))
    assert len(np.unique(final)) > 2  # the full VAE decodes the validation image itself

    # A tiny autoencoder of another latent space (4 channels, SD 1.x's) is refused by name.
    from stune.errors import ConfigError

    AutoencoderTiny(
        latent_channels=4,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(tmp_path / "taesd")
    with pytest.raises(ConfigError, match="validation_preview_autoencoder"):
        train(
            prepare(
                overrides={"validation_preview_autoencoder": str(tmp_path / "taesd"), "max_train_steps": "1"},
                host=PluginHost.build(["flux"]),
            )
        )


def test_validation_preview_autoencoder_default_falls_back_offline(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = flux_run(
        tmp_path,
        tiny_flux_dir,
        validation_prompt="a picture number 1",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        disable_benchmark="true",
        validation_preview="true",
    )
    from stune.validation import preview_autoencoder

    monkeypatch.chdir(run)
    session = prepare(host=PluginHost.build(["flux"]))
    assert session.config.validation_preview_autoencoder == "madebyollin/taef1"  # FLUX's default
    # The Hub is offline here: no tiny decoder, so the full VAE decodes the previews (a warning, no error).
    assert preview_autoencoder(session.config, torch.device("cpu")) is None
