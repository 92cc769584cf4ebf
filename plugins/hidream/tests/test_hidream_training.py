"""HiDream training runs on the tiny pipeline: the seeds' quickstart config and LyCORIS configs end
to end, LoKr and PEFT outputs loaded the way users load them, square and non-square buckets,
resume after SIGKILL and exact resume, full fine-tuning with the load-balancing loss in a fresh
environment holding only stune and stune-hidream."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import stune
from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, offline_env, run_cli, venv_with_only, write_run
from stune.train import train

TESTS = Path(__file__).resolve().parent
SEEDS = TESTS / "seeds"
SHARED_SEEDS = TESTS.parents[3] / "shared" / "seeds"
SEED_CONFIG = TESTS.parents[2] / "tests" / "seeds" / "config-000-1.json"  # checked against the seeds by tests/
QUANT = importlib.util.find_spec("stune_quant") is not None
PRECISIONS = ("base_model_precision", "text_encoder_3_precision", "text_encoder_4_precision")


def _steps(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _train(run: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Any:
    monkeypatch.chdir(run)
    return train(prepare(overrides={k: str(v) for k, v in overrides.items()}, host=PluginHost.build(["hidream"])))


def _render(pipe: Any, **extra: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = 8  # the tiny model renders 64×64 (the pipeline scales every image to this area)
    return pipe(
        "a picture number 1",
        num_inference_steps=2,
        guidance_scale=3.0,
        negative_prompt="blurry",
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=32,
        **extra,
    ).images[0]


def test_seed_lycoris_configs_are_the_seeds() -> None:
    if not SHARED_SEEDS.is_dir():
        pytest.skip("../shared/seeds is not beside this checkout")
    texts = "".join(p.read_text() for p in SHARED_SEEDS.glob("*.txt"))
    for copy in sorted(SEEDS.glob("lycoris_config-*.json")):
        assert copy.read_text() in texts, f"{copy.name} no longer matches the seed documents"


# -- the quickstart, as the seeds write it -------------------------------------------------------------------


def _seed_folder(folder: Path, model: Path) -> Path:
    """The quickstart's layout: config/config.json (the seed's, with a local model path),
    config/lycoris_config.json (the seed's first, trailing commas included) and the dataset list at
    the seed's config/hidream/multidatabackend.json path (tiny images, an eval set, the text cache)."""
    config = json.loads(SEED_CONFIG.read_text())
    config["pretrained_model_name_or_path"] = str(model)
    (folder / "config" / "hidream").mkdir(parents=True)
    (folder / "config" / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(SEEDS / "lycoris_config-1.json", folder / "config" / "lycoris_config.json")
    make_images(folder / "datasets" / "subject", 4, size=(64, 64))
    make_images(folder / "datasets" / "held-out", 1, size=(64, 64))
    datasets = [
        {"id": "subject", "instance_data_dir": "datasets/subject", "caption_strategy": "textfile", "resolution": 64},
        {"id": "eval", "dataset_type": "eval", "instance_data_dir": "datasets/held-out", "resolution": 64},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text/hidream"},
    ]
    (folder / "config" / "hidream" / "multidatabackend.json").write_text(json.dumps(datasets))
    return folder


def test_the_seed_quickstart_trains_a_lokr_from_the_command_line(tmp_path: Path, tiny_hidream_dir: Path) -> None:
    """`st-train --plugin hidream` in the quickstart's folder. The command line shortens the run
    (3 steps; validation images of 2 steps at 64×64 instead of 20 at 1024², two minutes each on a
    CPU; the eval loss over 4 σ instead of 28). With stune-quant the three components are
    int8-quanto as the seed says; without it (after checking that the config names the package)
    they stay unquantized."""
    run = _seed_folder(tmp_path, tiny_hidream_dir)
    check = run_cli(["check", "--plugin", "hidream"], cwd=run)
    if QUANT:  # the installed quant plugin owns base_model_precision: `--plugin hidream` brings it in
        assert check.returncode == 0, check.stderr[-2000:]
        plugins, unquantized = ["--plugin", "hidream"], []
    else:
        assert check.returncode == 2, check.stderr[-2000:]
        assert "pip install stune-quant" in check.stderr, check.stderr[-2000:]
        plugins, unquantized = ["--plugin", "hidream"], [f"--{key}=no_change" for key in PRECISIONS]
    check = run_cli(["check", *plugins, *unquantized], cwd=run)
    assert check.returncode == 0, check.stderr[-2000:]
    shorter = ["--max_train_steps=3", "--validation_resolution=64x64", "--validation_num_inference_steps=2"]
    proc = run_cli([*plugins, *shorter, "--eval_timesteps=4", *unquantized], cwd=run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "LyCORIS lokr: 24 modules" in proc.stderr  # the attention Linears: 8 per double block, 4 per single
    if QUANT:
        for component in ("transformer", "text_encoder_3", "text_encoder_4"):
            assert re.search(rf"{component}: \d+ linear layers quantized to int8-quanto", proc.stderr), component

    out = run / "output" / "models-hidream"
    records = _steps(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["grad_norm"] >= 0 and r["lr"] < 4e-5 for r in records)  # optimi-lion under warm-up
    eval_records = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line
    ]
    assert len(eval_records) == 1  # num_eval_images=1 at the end (eval_steps_interval=100)
    assert sorted(p.name for p in (out / "validation_images").iterdir()) == [
        "base-validation-64x64.png",  # disable_benchmark=false
        "step-000003-validation-64x64.png",
    ]
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # report_to=tensorboard
    assert (out / "checkpoint-3" / "checkpoint_complete.json").is_file()
    saved = json.loads((out / "lycoris_config.json").read_text())
    assert saved["apply_preset"]["target_module"] == ["Attention"] and saved["use_scalar"] is True
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["lycoris_config"])["algo"] == "lokr"
        keys = list(handle.keys())  # a safetensors handle is not a dict
        assert keys and all(k.startswith("lycoris_") for k in keys)


# -- LyCORIS configs select exactly what fnmatch / the class names select ----------------------------------------


def _lycoris_targets(tiny: Path, family: Any, settings: dict[str, Any], tmp_path: Path, caplog: Any) -> set[str]:
    from diffusers import HiDreamImageTransformer2DModel

    from stune.adapters import create_adapter

    path = tmp_path / "ly.json"
    path.write_text(json.dumps(settings))
    fam = family(pretrained_model_name_or_path=str(tiny), lora_type="lycoris", lycoris_config=str(path))
    transformer = HiDreamImageTransformer2DModel.from_pretrained(tiny, subfolder="transformer")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stune.adapters"):
        adapter = create_adapter(transformer, fam, fam.config, torch.float32)
    names = {lora.lora_name for lora in adapter.network.loras}
    logged = [r.getMessage() for r in caplog.records if "LyCORIS lokr:" in r.getMessage()]
    assert logged and f": {len(names)} modules" in logged[0]
    return names


def _linear_names(tiny: Path, keep: Any) -> set[str]:
    from diffusers import HiDreamImageTransformer2DModel

    transformer = HiDreamImageTransformer2DModel.from_pretrained(tiny, subfolder="transformer")
    owners = dict(transformer.named_modules())
    return {
        "lycoris_" + name.replace(".", "_")
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and keep(name, owners)
    }


def test_seed_lycoris_configs_adapt_exactly_what_they_name(
    tmp_path: Path, tiny_hidream_dir: Path, family: Any, caplog: Any
) -> None:
    from fnmatch import fnmatch

    from stune.jsonfile import read_json

    first = read_json(SEEDS / "lycoris_config-1.json")  # trailing commas, as in the seeds
    second = json.loads((SEEDS / "lycoris_config-2.json").read_text())

    def under(classes: tuple[str, ...]) -> Any:
        def keep(name: str, owners: dict[str, Any]) -> bool:
            parts = name.split(".")
            return any(type(owners[".".join(parts[:i])]).__name__ in classes for i in range(1, len(parts)))

        return keep

    attention = _linear_names(tiny_hidream_dir, under(("HiDreamAttention",)))
    assert _lycoris_targets(tiny_hidream_dir, family, first, tmp_path, caplog) == attention
    assert len(attention) == 2 * 8 + 2 * 4  # double blocks: image + text projections; single: image only

    patterns = list(second["apply_preset"]["name_algo_map"])
    named = _linear_names(tiny_hidream_dir, lambda name, owners: any(fnmatch(name, p) for p in patterns))
    assert _lycoris_targets(tiny_hidream_dir, family, second, tmp_path, caplog) == named
    assert len(named) == 2 * (8 + 3 + 3) + 2 * (4 + 3)  # attention, ff_t, shared experts; no routed expert
    assert not any("experts_0" in n or "gate" in n for n in named)

    broken = tmp_path / "broken.json"
    broken.write_text((SEEDS / "lycoris_config-1.json").read_text().replace('"factor": 16,', '"factor": 16'))
    with pytest.raises(stune.ConfigError, match=rf"{broken} is not valid JSON: .* at line 9"):
        read_json(broken, "LyCORIS config (lycoris_config)")

    feed_forward = {**first, "apply_preset": {"target_module": ["Attention", "FeedForward"]}}
    classes = ("HiDreamAttention", "MOEFeedForwardSwiGLU", "HiDreamImageFeedForwardSwiGLU")
    everything = _linear_names(tiny_hidream_dir, under(classes))
    assert _lycoris_targets(tiny_hidream_dir, family, feed_forward, tmp_path, caplog) == everything
    assert any("experts_3_w2" in n for n in everything)


# -- LoKr: the second seed config, non-square buckets, load balancing, EMA, exact resume, the snippet -----------


@pytest.fixture(scope="module")
def lokr_run(tmp_path_factory: pytest.TempPathFactory, tiny_hidream_dir: Path, hidream_run: Any) -> Path:
    folder = tmp_path_factory.mktemp("lokr")
    shutil.copy(SEEDS / "lycoris_config-2.json", folder / "lycoris.json")
    options = {
        "lora_type": "lycoris",
        "lycoris_config": str(folder / "lycoris.json"),
        "init_lokr_norm": 1e-3,
        "max_train_steps": 4,
        "hidream_use_load_balancing_loss": "true",
        "use_ema": "true",
        "caption_dropout_probability": 0.25,
    }
    data = {"images": 4, "wide": 2, "wide_regularisation": True}  # the wide set: prior preservation
    whole = hidream_run(folder / "whole", tiny_hidream_dir, **data, **options)
    split = hidream_run(folder / "split", tiny_hidream_dir, **data, checkpoint_step_interval=2, **options)
    with pytest.MonkeyPatch.context() as mp:
        _train(whole, mp)
        assert _train(split, mp, max_train_steps=2).final_step == 2
        assert _train(split, mp).final_step == 4
    return folder


def test_square_and_non_square_buckets_train_with_the_balancing_term_logged(lokr_run: Path) -> None:
    output = lokr_run / "whole" / "output"
    report = json.loads((output / "dataset_report.json").read_text())
    buckets = {b for d in report["datasets"] for b in d.get("buckets", {})}
    assert buckets == {"64x64", "128x64"}
    assert [d["regularisation"] for d in report["datasets"] if d["id"] == "wide"] == [True]
    records = _steps(output)
    assert len(records) == 4
    for record in records:
        assert record["loss"] == pytest.approx(record["diffusion_loss"] + record["aux_loss/load_balancing"], rel=1e-5)
        assert 0 < record["aux_loss/load_balancing"] < 1  # 0.01 × Σ over 4 MoE layers of ~1
        assert record["moe/expert_share_min"] <= 0.25 <= record["moe/expert_share_max"]
    assert (output / "ema" / "pytorch_lora_weights.safetensors").is_file()


def test_stopped_and_resumed_equals_uninterrupted(lokr_run: Path) -> None:
    a = load_file(str(lokr_run / "whole" / "output" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(lokr_run / "split" / "output" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    steps = [r["step"] for r in _steps(lokr_run / "split" / "output")]
    assert steps == [1, 2, 3, 4]


def test_the_seeds_inference_snippet_loads_our_lokr(lokr_run: Path, tiny_hidream_dir: Path) -> None:
    """The quickstart's pattern: create_lycoris_from_weights(1.0, file, pipeline.transformer), merge_to()."""
    from diffusers import HiDreamImagePipeline
    from lycoris import create_lycoris_from_weights

    output = lokr_run / "whole" / "output"
    pipeline = HiDreamImagePipeline.from_pretrained(tiny_hidream_dir)
    before = _render(pipeline)
    wrapper, _ = create_lycoris_from_weights(
        1.0, str(output / "pytorch_lora_weights.safetensors"), pipeline.transformer
    )
    assert len(wrapper.loras) == 2 * 14 + 2 * 7
    wrapper.merge_to()
    after = _render(pipeline)
    assert (after - before).abs().max() > 1e-4


# -- PEFT LoRA: validation through the pipeline, diffusers loading ---------------------------------------------


def test_peft_lora_validates_through_the_pipeline_and_loads_in_diffusers(
    tmp_path: Path, tiny_hidream_dir: Path, hidream_run: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from diffusers import HiDreamImagePipeline
    from PIL import Image

    run = hidream_run(
        tmp_path,
        tiny_hidream_dir,
        hidream_lora_target="attention+text+ffs",
        lora_rank=4,
        max_train_steps=2,
        validation_prompt="a picture number 1",
        validation_resolution="64x64,128x64",
        validation_num_inference_steps=2,
        validation_guidance=3.0,
        validation_negative_prompt="blurry, cropped, ugly",
        validation_preview="true",
        disable_benchmark="true",
        hidream_use_load_balancing_loss="true",
        report_to="tensorboard",
    )
    result = _train(run, monkeypatch)
    assert result.final_step == 2
    images = run / "output" / "validation_images"
    assert sorted(p.name for p in images.glob("*.png")) == [
        "step-000002-validation-128x64.png",
        "step-000002-validation-64x64.png",
    ]
    assert Image.open(images / "step-000002-validation-128x64.png").size == (128, 64)  # the size asked for
    assert len(list((images / "previews").glob("step-000002-validation-64x64-s*.png"))) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = {p.parent for p in (run / "output" / "logs").rglob("events.out.tfevents.*")}
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"aux_loss/load_balancing", "train/diffusion_loss", "moe/expert_share_min", "moe/expert_share_max"} <= set(
        tags
    )

    with safe_open(str(run / "output" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        file_keys = set(handle.keys())
    assert any(".ff_t.w1.lora_A" in k for k in file_keys) and any(".to_out_t.lora_B" in k for k in file_keys)
    pipe = HiDreamImagePipeline.from_pretrained(tiny_hidream_dir)
    before = _render(pipe)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(run / "output", adapter_name="trained")
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == file_keys
    assert (_render(pipe) - before).abs().max() > 1e-5


# -- resume after SIGKILL ---------------------------------------------------------------------------------------


def test_sigkill_resumes_from_the_latest_checkpoint(tmp_path: Path, tiny_hidream_dir: Path, hidream_run: Any) -> None:
    run = hidream_run(
        tmp_path,
        tiny_hidream_dir,
        max_train_steps=6,
        checkpoint_step_interval=2,
        checkpoints_total_limit=10,
        hidream_use_load_balancing_loss="true",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "stune.cli", "--plugin", "hidream", "--plugin", str(TESTS / "hidream_slow_steps.py")],
        cwd=run,
        env=offline_env({"STUNE_TEST_STEP_SLEEP": "0.5"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (run / "output" / "checkpoint-2" / "checkpoint_complete.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for checkpoint-2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    output = run / "output"
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    latest = max(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert 2 <= latest < 6

    resumed = run_cli(["--plugin", "hidream"], cwd=run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from output/checkpoint-{latest} at step {latest}" in resumed.stderr
    assert [r["step"] for r in _steps(output)] == list(range(1, 7))  # lost steps redone, none twice


# -- full fine-tuning in an environment with stune and stune-hidream only ------------------------------------------


def test_full_fine_tune_with_load_balancing_in_a_fresh_venv(tmp_path: Path, tiny_hidream_dir: Path) -> None:
    repo = TESTS.parents[2]
    python = venv_with_only(tmp_path / "venv", [repo / "core", repo / "plugins" / "hidream"])
    listing = subprocess.run(
        [str(python), "-m", "stune.cli", "plugins"], capture_output=True, text=True, env=offline_env()
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert [p["name"] for p in json.loads(listing.stdout)] == ["hidream"]

    run = tmp_path / "run"
    make_images(run / "data", 2, size=(64, 64))
    write_run(
        run,
        {
            "model_family": "hidream",
            "model_type": "full",
            "pretrained_model_name_or_path": str(tiny_hidream_dir),
            "output_dir": "output",
            "max_train_steps": 2,
            "train_batch_size": 2,
            "learning_rate": "1e-2",
            "mixed_precision": "no",
            "tokenizer_max_length": 32,
            "resolution": 64,
            "caption_strategy": "textfile",
            "seed": 0,
            "checkpoint_step_interval": 0,
            "validation_step_interval": 0,
            "hidream_use_load_balancing_loss": True,
            "hidream_load_balancing_loss_weight": 0.5,
        },
        [
            {"id": "pics", "instance_data_dir": "data", "minimum_image_size": 0},
            {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
        ],
    )
    proc = subprocess.run(
        [str(python), "-m", "stune.cli", "--plugin", "hidream"],
        cwd=run,
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from diffusers import HiDreamImageTransformer2DModel

    trained = HiDreamImageTransformer2DModel.from_pretrained(run / "output" / "transformer")
    base = HiDreamImageTransformer2DModel.from_pretrained(tiny_hidream_dir, subfolder="transformer")
    gates = [n for n, _ in base.named_parameters() if n.endswith("ff_i.gate.weight")]
    assert len(gates) == 4
    moved = dict(trained.named_parameters())
    assert all(not torch.equal(moved[n], p) for n, p in base.named_parameters() if n in gates)
    assert all(r["aux_loss/load_balancing"] > 0 for r in _steps(run / "output"))
