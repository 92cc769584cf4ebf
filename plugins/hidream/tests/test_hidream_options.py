"""HiDream's options and declared data: flavours and paths, limits, quantization rules, LoRA presets,
the VAE, the canvas, and the errors a user sees."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import stune
from stune.errors import ConfigError
from stune.family import LoadRequest, match_modules
from stune.testing import make_images, offline_env, run_cli, write_run
from stune_hidream.options import DEFAULT_LLAMA


def test_flavours_and_paths(family: Any, tmp_path: Path) -> None:
    assert family().model_path() == "HiDream-ai/HiDream-I1-Full"
    assert family(model_flavour="dev").model_path() == "HiDream-ai/HiDream-I1-Dev"
    assert family(model_flavour="fast").model_path() == "HiDream-ai/HiDream-I1-Fast"
    assert family(pretrained_model_name_or_path="/models/hd").model_path() == "/models/hd"
    with pytest.raises(ConfigError, match="not a hidream flavour"):
        family(model_flavour="pro").check_config()

    # The Llama: its own option, else the base model's text_encoder_4/, else the quickstart's Llama.
    assert family().llama_location() == (DEFAULT_LLAMA, None)
    assert family(pretrained_text_encoder_4_model_name_or_path="me/llama").llama_location() == ("me/llama", None)
    (tmp_path / "text_encoder_4").mkdir()
    (tmp_path / "text_encoder_4" / "config.json").write_text("{}")
    assert family(pretrained_model_name_or_path=str(tmp_path)).llama_location() == (str(tmp_path), "text_encoder_4")


def test_flavour_defaults(family: Any) -> None:
    full, dev = family(), family(model_flavour="dev")
    assert full.config.tokenizer_max_length == 128
    assert (full.config.validation_guidance, full.config.validation_num_inference_steps) == (5.0, 50)
    assert (dev.config.validation_guidance, dev.config.validation_num_inference_steps) == (0.0, 28)
    assert full.config.validation_resolution == "1024x1024"
    assert family(validation_guidance=3.0).config.validation_guidance == 3.0  # the user's value wins
    assert full.maximum_canvas_pixels == 1024 * 1024 and full.alignment == 64
    assert [s.precision_option for s in full.text_encoder_slots] == [
        f"text_encoder_{n}_precision" for n in (1, 2, 3, 4)
    ]


def test_t5_token_limit(family: Any, caplog: Any) -> None:
    with pytest.raises(ConfigError, match="at most 128"):
        family(tokenizer_max_length=256).check_config()
    with caplog.at_level(logging.WARNING, logger="stune.hidream"):
        family(tokenizer_max_length=256, i_know_what_i_am_doing=True).check_config()
    assert "beyond HiDream's 128 tokens" in caplog.text


def test_refusals(family: Any) -> None:
    with pytest.raises(ConfigError, match="hidream_load_balancing_loss_weight 0"):
        family(hidream_use_load_balancing_loss=True, hidream_load_balancing_loss_weight=0).check_config()


class PrecisionOptions(stune.Options):
    """The two precision options as the quantization plugin declares them (names checked there)."""

    base_model_precision: str = stune.options.Field("no_change", description="Base model precision.")
    text_encoder_4_precision: str = stune.options.Field("no_change", description="Llama precision.")


class PrecisionPlugin:
    __name__ = "precisions"

    @stune.hookimpl
    def register_options(self, register: Any) -> None:
        register(PrecisionOptions)


def test_two_quantization_backends_for_the_base_and_the_llama_are_refused() -> None:
    """The rule reads the precision names (as SimpleTuner's does), whichever quantizers are installed."""
    from stune.plugins import PluginHost

    host = PluginHost.build(["hidream"], plugins=[PrecisionPlugin()])

    def check(base: str, llama: str) -> None:
        config = host.config_model().model_validate(
            {"model_family": "hidream", "base_model_precision": base, "text_encoder_4_precision": llama}
        )
        host.family_class("hidream")(config).check_config()

    with pytest.raises(
        ConfigError, match=r"int8-quanto and text_encoder_4_precision nf4-bnb use two .* \(quanto and bnb\)"
    ):
        check("int8-quanto", "nf4-bnb")
    with pytest.raises(ConfigError, match="give the Llama a torchao precision or no_change"):
        check("int8-torchao", "fp8-quanto")
    for base, llama in [
        ("int8-quanto", "int8-quanto"),
        ("int8-quanto", "int4-quanto"),
        ("fp8-quanto", "no_change"),
        ("no_change", "nf4-bnb"),
        ("int8-torchao", "bf16"),  # a dtype is not a backend
        ("fp8wo-torchao", "int8-torchao"),
    ]:
        check(base, llama)


def test_lora_presets_name_diffusers_modules(tiny_hidream_dir: Path, family: Any) -> None:
    from diffusers import HiDreamImageTransformer2DModel

    transformer = HiDreamImageTransformer2DModel.from_pretrained(tiny_hidream_dir, subfolder="transformer")
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    double, single = 2, 2
    expected = {
        "attention": (double + single) * 4,
        "attention+text": double * 8 + single * 4,
        "attention+text+shared_experts": double * 8 + single * 4 + (double + single) * 3,
        "attention+text+ffs": double * 8 + single * 4 + (double + single) * 3 + double * 3,
    }
    for preset, count in expected.items():
        matched = match_modules(linears, family(hidream_lora_target=preset).lora_target_modules())
        assert len(matched) == count, preset
        assert not any(".experts." in n or "gate" in n for n in matched)
    attention = match_modules(linears, family().lora_target_modules())
    assert all(n.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v", "to_out") for n in attention)
    assert family(peft_lora_target_modules='["to_q"]').lora_target_modules() == ["to_q"]


def test_loading_turns_vae_tiling_and_slicing_on(tiny_hidream_dir: Path, family: Any) -> None:
    fam = family(pretrained_model_name_or_path=str(tiny_hidream_dir), mixed_precision="no")
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32, text_encoders=False))
    assert components.vae.use_tiling and components.vae.use_slicing
    assert components.text_encoders == {} and components.tokenizers == {}  # every caption cached: no Llama at all
    assert fam.max_image_tokens == components.transformer.max_seq == 64


def test_transformer_and_vae_from_their_own_folders(tiny_hidream_dir: Path, family: Any) -> None:
    fam = family(
        pretrained_model_name_or_path=str(tiny_hidream_dir),
        pretrained_transformer_model_name_or_path=str(tiny_hidream_dir / "transformer"),
        pretrained_transformer_subfolder="none",  # a component folder itself
        pretrained_vae_model_name_or_path=str(tiny_hidream_dir / "vae"),
    )
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32, text_encoders=False))
    assert type(components.transformer).__name__ == "HiDreamImageTransformer2DModel"
    assert components.vae.config.latent_channels == 16


def test_unreachable_hub_model_is_a_user_error(family: Any) -> None:
    fam = family(model_flavour="full")
    with pytest.raises(stune.UserError, match="Could not load the HiDream model from 'HiDream-ai/HiDream-I1-Full'"):
        fam.load(LoadRequest(torch.device("cpu"), torch.float32))


def test_buckets_stay_within_the_1024_squared_canvas(tmp_path: Path, family: Any) -> None:
    from stune.data.report import scan_all

    make_images(tmp_path / "data", 1, size=(1536, 1024))
    write_run(
        tmp_path,
        {"model_family": "hidream", "resolution": 1536, "caption_strategy": "textfile"},
        [{"id": "big", "instance_data_dir": str(tmp_path / "data")}],
    )
    fam = family(data_backend_config=str(tmp_path / "config" / "multidatabackend.json"), resolution=1536)
    report = scan_all(fam.config, fam, 1)
    [(width, height)] = [tuple(map(int, b.split("x"))) for d in report.as_dict()["datasets"] for b in d["buckets"]]
    assert width * height <= 1024 * 1024 and width % 64 == 0 and height % 64 == 0
    assert width > height  # the aspect is kept


def test_a_bad_option_exits_2_with_one_sentence(tmp_path: Path) -> None:
    make_images(tmp_path / "data", 2, size=(64, 64))
    write_run(
        tmp_path,
        {"model_family": "hidream", "tokenizer_max_length": 300, "pretrained_model_name_or_path": "x"},
        [{"id": "pics", "instance_data_dir": "data"}],
    )
    proc = run_cli(["check", "--plugin", "hidream"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("st-train: error: tokenizer_max_length 300 is longer")


def test_registering_imports_no_torch() -> None:
    code = "import sys, stune_hidream; from stune.plugins import PluginHost; PluginHost.build(['hidream']); "
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_text_cache_holds_real_tokens_of_the_layers_read(tiny_hidream_dir: Path, family: Any) -> None:
    """Bytes per cached caption, trimmed vs the pipeline's padded layout (real-model numbers:
    plugins/hidream/bench/text_cache.py)."""
    from stune_hidream.family import LLAMA, T5

    caption = "a red circle on a blue background"
    sizes = {}
    for padding in ("trim", "pipeline"):
        fam = family(
            pretrained_model_name_or_path=str(tiny_hidream_dir),
            mixed_precision="bf16",
            tokenizer_max_length=128,
            hidream_text_padding=padding,
        )
        components = fam.load(LoadRequest(torch.device("cpu"), torch.float32))
        [entry] = fam.encode_prompts(components, [caption])
        sizes[padding] = sum(t.numel() * t.element_size() for t in entry.values())
        assert entry[LLAMA].shape[0] == 3  # of the Llama's 5 layers
        if padding == "pipeline":
            assert entry[T5].shape[0] == entry[LLAMA].shape[1] == 128
    assert sizes["trim"] * 3 < sizes["pipeline"]


def test_seed_dataset_list_and_options_pass_check(tmp_path: Path, tiny_hidream_dir: Path) -> None:
    """The seed's dataset list (regularisation set + instance-prompt set) with the seed's config keys
    that need no plugin other than hidream."""
    seed = json.loads(
        (Path(__file__).resolve().parents[3] / "tests" / "seeds" / "multidatabackend-hidream.json").read_text()
    )
    for entry in seed:
        if "instance_data_dir" in entry:
            make_images(tmp_path / entry["instance_data_dir"], 2, size=(1024, 1024), captions=False)
    (tmp_path / "config" / "hidream").mkdir(parents=True)
    (tmp_path / "config" / "hidream" / "multidatabackend.json").write_text(json.dumps(seed))
    # lora_type lycoris reads config/lycoris_config.json (the seed's first) already at check
    lycoris = Path(__file__).resolve().parent / "seeds" / "lycoris_config-1.json"
    (tmp_path / "config" / "lycoris_config.json").write_text(lycoris.read_text())
    (tmp_path / "config" / "config.json").write_text(
        json.dumps(
            {
                "model_family": "hidream",
                "pretrained_model_name_or_path": str(tiny_hidream_dir),
                "data_backend_config": "config/hidream/multidatabackend.json",
                "lora_type": "lycoris",
                "aspect_bucket_rounding": 2,
                "offload_during_startup": True,
            }
        )
    )
    proc = run_cli(["check", "--plugin", "hidream", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = {d["id"]: d for d in json.loads(proc.stdout)["datasets"]}
    assert report["pseudo-camera-10k-hidream"]["regularisation"] is True
    assert report["dreambooth-subject"]["buckets"] == {"1024x1024": 2}
