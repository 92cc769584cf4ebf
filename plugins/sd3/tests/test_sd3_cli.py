"""`st-train` end to end with SD3: in a fresh environment holding only `stune` and `stune-sd3` (a LoRA
run with validation and skip-layer guidance whose LoRA loads in diffusers; the demo), SIGKILL and
resume, and the seed quickstart's config blocks unchanged (paths aside)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from stune.testing import make_images, offline_env, run_cli, venv_with_only, write_run

from .helpers import LORA_FILE, generate, sd3_run, train_in

REPO = Path(__file__).resolve().parents[3]
SEEDS = REPO / "tests" / "seeds"
SLOW_PLUGIN = REPO / "tests" / "slow_steps.py"
LIBRARY = {"red_circle": "a red circle on a blue background"}


def _st_train(venv_python: Path, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`st-train ARGS` with the fresh environment's interpreter (the `bin/st-train` script pip writes there
    with --prefix names the interpreter that ran pip, which would see every installed plugin)."""
    return subprocess.run(
        [str(venv_python), "-m", "stune.cli", *args],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sd3_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with `stune` and `stune-sd3` only (no `stune-flux`)."""
    return venv_with_only(tmp_path_factory.mktemp("sd3-only") / "venv", [REPO / "core", REPO / "plugins" / "sd3"])


def test_fresh_environment_lists_only_sd3_and_trains_a_lora_that_loads_in_diffusers(
    sd3_only: Path, tmp_path: Path, tiny_sd3_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    listing = _st_train(sd3_only, ["plugins"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert [p["name"] for p in json.loads(listing.stdout)] == ["sd3"]
    no_flux = subprocess.run([str(sd3_only), "-c", "import stune_flux"], capture_output=True)
    assert no_flux.returncode != 0

    run = sd3_run(
        tmp_path,
        tiny_sd3_dir,
        max_train_steps=4,
        checkpoint_step_interval=2,
        validation_step_interval=2,
        validation_prompt="a picture number 1",
        user_prompt_library="config/user_prompt_library.json",
        validation_resolution="64x64,128x64",
        validation_num_inference_steps=2,
        validation_guidance=4.0,
        disable_benchmark="true",
        validation_negative_prompt="blurry, cropped, ugly",
        validation_guidance_skip_layers="[7, 8, 9]",
        validation_guidance_skip_layers_start=0.2,  # with 2 sampling steps: the second step only
        validation_guidance_skip_layers_stop=0.8,
        lora_rank=4,
        lora_alpha=8,
        learning_rate="1e-2",
    )
    (run / "config" / "user_prompt_library.json").write_text(json.dumps(LIBRARY))
    proc = _st_train(sd3_only, ["--plugin", "sd3"], run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "output"
    assert _steps(run) == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "checkpoint_complete.json").is_file()
    names = {p.name for p in (out / "validation_images").glob("*.png")}
    expected = {
        f"{prefix}-{nick}-{size}.png"
        for prefix in ("step-000002", "step-000004")
        for nick in ("validation", "red_circle")
        for size in ("64x64", "128x64")
    }
    assert names == expected

    lora = out / LORA_FILE
    with safe_open(str(lora), "pt") as handle:
        file_keys = set(handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert file_keys and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in file_keys)
    # lora_alpha 8 / rank 4 is folded into lora_B (scale 2) and recorded as alpha = rank, so loaders
    # that ignore the metadata (ComfyUI) apply the trained strength too (lora_format diffusers).
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "pipe.load_lora_weights('output')" in card

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(out, adapter_name="trained")
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == file_keys  # nothing missing, nothing unexpected
    assert pipe.transformer.peft_config["trained"].lora_alpha == 4  # alpha (= rank, scale folded) from the metadata
    after = generate(pipe)
    assert (after - before).abs().max() > 1e-4  # the LoRA changes the image


def test_demo_in_the_fresh_environment(sd3_only: Path, sd3_demo_model: Path, tmp_path: Path) -> None:
    shutil.copytree(sd3_demo_model, tmp_path / "demo" / "model")  # built once per session
    proc = _st_train(sd3_only, ["demo", "--plugin", "sd3", "--dir", str(tmp_path / "demo"), "--steps", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo" / "output"
    assert "stune demo finished: 2 steps of a sd3 LoRA" in proc.stdout
    assert "load_lora_weights" in proc.stdout
    assert (out / LORA_FILE).is_file()
    assert sorted(p.name for p in (out / "validation_images").glob("*.png")) == [
        "base-base-colours-64x64.png",
        "base-validation-64x64.png",
        "step-000002-base-colours-64x64.png",
        "step-000002-validation-64x64.png",
    ]
    assert not (tmp_path / "demo" / "base-training").exists()  # the model in the folder was reused


def _start(run: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "stune.cli", "--plugin", "sd3", "--plugin", str(SLOW_PLUGIN)],
        cwd=run,
        env=offline_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_when(condition: Any, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_while_and_between_checkpoints_resumes_without_losing_or_repeating_steps(
    tmp_path: Path, tiny_sd3_dir: Path
) -> None:
    run = sd3_run(tmp_path, tiny_sd3_dir, max_train_steps=6, checkpoint_step_interval=2, checkpoints_total_limit=10)
    output = run / "output"

    flag = tmp_path / "stalled"  # 1. killed while writing checkpoint-4
    first = _start(run, {"STUNE_TEST_STALL_SAVE_AT": "4", "STUNE_TEST_STALL_FLAG": str(flag)})
    _kill_when(flag.exists, first)
    assert list(output.glob(".checkpoint-4.tmp*")) and not (output / "checkpoint-4").exists()

    # 2. resumed from checkpoint-2, killed between checkpoints once checkpoint-4 is complete
    second = _start(run, {"STUNE_TEST_STEP_SLEEP": "0.4"})
    _kill_when((output / "checkpoint-4" / "checkpoint_complete.json").is_file, second)
    log = second.stdout.read() if second.stdout else ""
    assert "resumed from output/checkpoint-2 at step 2" in log
    assert max(_steps(run)) < 6

    resumed = run_cli(["--plugin", "sd3"], cwd=run)  # 3. to the end
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from output/checkpoint-4 at step 4" in resumed.stderr
    assert _steps(run) == list(range(1, 7))  # lost steps are replaced, none duplicated
    assert not list(output.glob(".checkpoint-*"))
    assert (output / LORA_FILE).is_file()


# -- the seed quickstart ---------------------------------------------------------------------------------


def _seed(name: str) -> dict[str, Any]:
    return {k.lstrip("-"): v for k, v in json.loads((SEEDS / name).read_text()).items()}


def _quant_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("stune_quant") is not None


def seed_run(folder: Path, model: Path, *blocks: str) -> Path:
    """The seed's base config and the given blocks, and its dataset list, paths replaced; a few
    keys added to keep the run small (steps, validation sampling steps): no seed value is changed."""
    config: dict[str, Any] = {}
    for block in ("config-004-14.json", *blocks):
        config.update(_seed(block))
    make_images(folder / "datasets" / "pseudo-camera-10k", 1, size=(96, 80), captions=False)
    (folder / "config").mkdir(parents=True, exist_ok=True)
    # An empty library: every validation image at the seed's sizes costs seconds on a CPU.
    (folder / "config" / "user_prompt_library.json").write_text("{}")
    datasets = json.loads((SEEDS / "multidatabackend-sd3.json").read_text())
    datasets[0]["instance_data_dir"] = str(folder / "datasets" / "pseudo-camera-10k")
    datasets[0]["cache_dir_vae"] = str(folder / "cache" / "vae" / "sd3" / "pseudo-camera-10k")
    datasets[1]["cache_dir"] = str(folder / "cache" / "text" / "sd3" / "pseudo-camera-10k")
    added = {"max_train_steps": 1, "validation_num_inference_steps": 1, "disable_benchmark": True, "seed": 0}
    assert not set(added) & set(config)
    config.update(
        {
            "pretrained_model_name_or_path": str(model),
            "output_dir": str(folder / "output"),
            "user_prompt_library": str(folder / "config" / "user_prompt_library.json"),
            **added,
        }
    )
    write_run(folder, config, datasets)
    return folder


QUANT = _quant_installed()


def test_seed_blocks_pass_check(tmp_path: Path, tiny_sd3_dir: Path) -> None:
    blocks = ["config-004-16.json", "config-004-17.json"]
    run = seed_run(tmp_path / "a", tiny_sd3_dir, *blocks, *(["config-004-15.json"] if QUANT else []))
    check = run_cli(["check", "--plugin", "sd3", *(["--plugin", "quant"] if QUANT else [])], cwd=run)
    assert check.returncode == 0, check.stderr[-2000:]
    assert "pseudo-camera-10k-sd3" in check.stdout
    if not QUANT:  # without the quantization plugin the quantised block names it
        run = seed_run(tmp_path / "b", tiny_sd3_dir, "config-004-15.json")
        check = run_cli(["check", "--plugin", "sd3"], cwd=run)
        assert check.returncode == 2 and "Traceback" not in check.stderr
        assert "`base_model_precision` belongs to the `quant` plugin" in check.stderr
        assert "pip install stune-quant" in check.stderr


def _trained_seed_outputs(run: Path) -> None:
    names = {p.name for p in (run / "output" / "validation_images").glob("*.png")}
    assert names == {f"step-000001-validation-{size}.png" for size in ("1024x1024", "1280x768")}
    report = json.loads((run / "output" / "dataset_report.json").read_text())
    assert [b for d in report["datasets"] for b in d.get("buckets", [])] == ["1024x1024"]  # the seed's crops
    config = json.loads((run / "output" / "training_config.json").read_text())
    assert config["validation_guidance_skip_layers"] == [7, 8, 9] and config["flow_schedule_auto_shift"] is True
    assert (run / "output" / LORA_FILE).is_file()


@pytest.mark.skipif(not QUANT, reason="the seed's quantised block needs stune-quant (plugins/quant), not installed")
def test_seed_base_quantised_and_slg_blocks_train_with_adamw_bf16(tmp_path: Path, tiny_sd3_dir: Path) -> None:
    run = seed_run(tmp_path, tiny_sd3_dir, "config-004-15.json", "config-004-16.json")
    seen: dict[str, Any] = {}

    class Probe:
        __name__ = "probe"

        import stune

        @stune.hookimpl
        def route_tokens(self, transformer: torch.nn.Module) -> None:
            seen["attention"] = type(transformer.get_submodule("transformer_blocks.0.attn.to_q.base_layer")).__name__
            seen["kept"] = type(transformer.get_submodule("proj_out")).__name__
            seen["lora"] = {p.dtype for n, p in transformer.named_parameters() if "lora_" in n}

    assert train_in(run, Probe(), names=("sd3", "quant")).final_step == 1
    assert seen["attention"] == "QLinear" and seen["kept"] == "Linear"  # int8-quanto, SD3's exclusions kept
    assert seen["lora"] == {torch.bfloat16}  # adamw_bf16 keeps the trained weights in bf16
    _trained_seed_outputs(run)


@pytest.mark.skipif(QUANT, reason="stune-quant is installed: the run above trains these blocks with the quantised one")
def test_seed_base_and_slg_blocks_train(tmp_path: Path, tiny_sd3_dir: Path) -> None:
    run = seed_run(tmp_path, tiny_sd3_dir, "config-004-16.json")
    assert train_in(run).final_step == 1
    _trained_seed_outputs(run)
