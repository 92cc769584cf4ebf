"""Trackers: report_to parsing, TensorBoard and wandb (offline) runs read back from their files."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from stune.config import CoreOptions, validate_config
from stune.errors import ConfigError
from stune.tracking import check_trackers, start_trackers, wandb_key_configured

MAIN = SimpleNamespace(is_main_process=True)
OTHER = SimpleNamespace(is_main_process=False)


def _config(tmp_path: Path, **values: Any) -> CoreOptions:
    return validate_config({"output_dir": str(tmp_path / "out"), "model_family": "toy", **values}, CoreOptions)


def _records(n: int) -> Iterator[dict[str, float]]:
    for step in range(1, n + 1):
        yield {
            "step": step,
            "epoch": 0,
            "loss": 1.0 / step,
            "lr": 1e-4 * step,
            "grad_norm": 0.5,
            "step_seconds": 0.1,
            "samples_per_second": 20.0,
        }


def _image(output_dir: Path, step: int, colour: tuple[int, int, int]) -> Path:
    folder = output_dir / "validation_images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}-validation-32x32.png"
    Image.new("RGB", (32, 32), colour).save(path)
    return path


# -- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", []),
        ("tensorboard", ["tensorboard"]),
        ("wandb", ["wandb"]),
        ("all", ["tensorboard", "wandb"]),
        ("tensorboard,wandb", ["tensorboard", "wandb"]),
        ("wandb, tensorboard", ["tensorboard", "wandb"]),
        ('["wandb"]', ["wandb"]),
        ("simpletuner", []),  # SimpleTuner's local JSONL log: stune always writes metrics.jsonl
    ],
)
def test_report_to_values(tmp_path: Path, value: str, expected: list[str]) -> None:
    config = _config(tmp_path, report_to=value)
    assert config.trackers == expected
    assert config.report_to == (",".join(expected) or "none")


def test_report_to_errors_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^Option `report_to` = 'mlflow' is invalid: unknown tracker 'mlflow'"):
        _config(tmp_path, report_to="mlflow")
    with pytest.raises(ConfigError, match="does not support the comet_ml tracker"):
        _config(tmp_path, report_to="tensorboard,comet_ml")


def test_tracker_defaults(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert (config.report_to, config.tracker_project_name, config.tracker_run_name, config.logging_dir) == (
        "none",
        "stune",
        None,
        "logs",
    )


def test_missing_tracker_package_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    check_trackers(_config(tmp_path, report_to="tensorboard"))
    with pytest.raises(ConfigError, match=r"report_to=wandb needs the `wandb` package; install it with"):
        check_trackers(_config(tmp_path, report_to="all"))


def test_none_and_other_processes_start_nothing(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    for config, accelerator in [(_config(tmp_path), MAIN), (_config(tmp_path, report_to="all"), OTHER)]:
        trackers = start_trackers(config, accelerator, output_dir)
        assert not trackers.active
        trackers.log({"step": 1, "loss": 1.0}, 1)
        trackers.log_images([], 1)
        trackers.finish()
    assert not output_dir.exists()


# -- TensorBoard -------------------------------------------------------------------------------------


def test_tensorboard_scalars_images_and_hparams(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = _config(tmp_path, report_to="tensorboard", tracker_run_name="first", learning_rate="3e-4")
    output_dir = Path(config.output_dir)
    trackers = start_trackers(config, MAIN, output_dir)
    for record in _records(3):
        trackers.log(record, int(record["step"]))
    trackers.log_images([_image(output_dir, 2, (255, 0, 0))], 2)
    trackers.log_images([_image(output_dir, 3, (0, 0, 255))], 3)
    trackers.log({"step": 3, "eval_loss": 0.25, "eval_loss/sigma_00": 0.5}, 3)  # stune.evaluation's record
    trackers.finish()

    run_dir = output_dir / "logs" / "first"
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/step_seconds", "train/samples_per_second"} <= set(
        tags["scalars"]
    )
    assert "train/step" not in tags["scalars"]  # the step is the x axis
    assert [(s.step, s.value) for s in events.Scalars("eval_loss")] == [(3, 0.25)]
    assert [(s.step, s.value) for s in events.Scalars("eval_loss/sigma_00")] == [(3, 0.5)]
    assert [(s.step, round(s.value, 4)) for s in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert [round(s.value, 8) for s in events.Scalars("train/lr")] == [1e-4, 2e-4, 3e-4]
    # One image tag across steps, so TensorBoard shows a slider over the run.
    images = events.Images("validation/validation-32x32")
    assert [(i.step, i.width, i.height) for i in images] == [(2, 32, 32), (3, 32, 32)]
    import io

    decoded = Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")
    assert decoded.getpixel((5, 5)) == (0, 0, 255)
    # The options: as hyperparameters (HParams tab) and as JSON text.
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```"))["learning_rate"] == 3e-4
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["learning_rate"].number_value == pytest.approx(3e-4)
    assert start.session_start_info.hparams["report_to"].string_value == "tensorboard"
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS


def test_logging_dir_and_default_run_name(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere"
    config = _config(tmp_path, report_to="tensorboard", logging_dir=str(absolute))
    trackers = start_trackers(config, MAIN, Path(config.output_dir))
    trackers.log({"step": 1, "loss": 1.0}, 1)
    trackers.finish()
    (run_dir,) = absolute.iterdir()
    assert run_dir.name.startswith("out-")  # output folder name + start time
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert not (Path(config.output_dir) / "logs").exists()


# -- wandb (offline) --------------------------------------------------------------------------------


def _wandb_records(path: Path) -> Iterator[Any]:
    """Records of a ``.wandb`` file: wandb's LevelDB-style log of protobuf ``Record`` messages
    (what ``wandb sync`` uploads). There is no public reader for it offline."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    import wandb

    for key in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # ignore the developer's own wandb login
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    yield tmp_path
    wandb.teardown()  # wandb keeps one service per process; the next test starts from its own environment


def test_wandb_offline_without_key_writes_history_config_and_images(wandb_offline: Path) -> None:
    # No WANDB_MODE and no API key: stune picks offline itself instead of wandb prompting for a key.
    assert not wandb_key_configured()
    config = _config(
        wandb_offline, report_to="wandb", tracker_project_name="proj", tracker_run_name="run-a", lora_rank="8"
    )
    output_dir = Path(config.output_dir)
    trackers = start_trackers(config, MAIN, output_dir)
    run = trackers.wandb_run
    assert (run.settings.mode, run.project, run.name) == ("offline", "proj", "run-a")
    assert run.config["lora_rank"] == 8 and run.config["report_to"] == "wandb"
    for record in _records(3):
        trackers.log(record, int(record["step"]))
    trackers.log_images([_image(output_dir, 3, (0, 255, 0))], 3)
    assert run.summary["train/loss"] == pytest.approx(0.5)  # step 3 is still open (images may join it)
    trackers.finish()

    (run_file,) = (output_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    config_items = {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            config_items = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert sorted(history) == [1, 2, 3]
    assert [round(history[s]["train/loss"], 4) for s in (1, 2, 3)] == [1.0, 0.5, 0.3333]
    assert history[3]["train/grad_norm"] == 0.5
    image = history[3]["validation/validation-32x32/_type"], history[3]["validation/validation-32x32/path"]
    assert image[0] == "image-file"
    assert (run_file.parent / "files" / image[1]).is_file()
    assert config_items["lora_rank"] == 8


def test_wandb_mode_from_environment_wins(wandb_offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_offline / "wandb-home"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # would mean online, but WANDB_MODE says offline
    assert wandb_key_configured()
    config = _config(wandb_offline, report_to="wandb")
    trackers = start_trackers(config, MAIN, Path(config.output_dir))
    assert trackers.wandb_run.settings.mode == "offline"
    trackers.log({"step": 1, "loss": 2.0}, 1)
    trackers.finish()
    assert list((wandb_offline / "wandb-home" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_key_in_netrc_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not wandb_key_configured()
