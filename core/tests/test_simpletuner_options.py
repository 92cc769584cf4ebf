"""SimpleTuner's training options that need no model: the loss, optimizer settings, EMA warm-up,
rolling checkpoints, missing files, parquet column defaults and the disk-space guard.

Each test is named after the option it covers (``test_<option>…``); the runs that need a model are
in tests/test_simpletuner_options.py.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from stune import _defaults, checkpoint, diskguard, optim
from stune.data.config import resolve_datasets
from stune.data.metadata import scan_dataset
from stune.distributed import Processes
from stune.ema import EMA
from stune.errors import ConfigError
from stune.flow import elementwise_loss, huber_c
from stune.plugins import PluginHost
from stune.step import Prediction
from stune.testing import make_images, step_inputs


def config(**options: Any) -> Any:
    return PluginHost.build(entry_points=False).config_model().model_validate(options)


# -- loss_type, huber_schedule, huber_c ------------------------------------------------------------------


def _loss(cfg: Any, prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> float:
    """The core's own compute_loss hook on these tensors, as training calls it."""
    inputs = step_inputs(prediction.clone(), sigmas, {}, target=target)
    return float(_defaults.compute_loss(Prediction(prediction), inputs, cfg))


def test_loss_type_each_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    error = prediction - target
    c = 0.3  # constant schedule: c is huber_c everywhere
    expected = {
        "l2": error.square().mean(),
        "huber": (2 * c * (torch.sqrt(error.square() + c * c) - c)).mean(),
        "smooth_l1": (2 * (torch.sqrt(error.square() + c * c) - c)).mean(),
    }
    assert config().loss_type == "l2"  # SimpleTuner's default
    for loss_type, value in expected.items():
        cfg = config(loss_type=loss_type, huber_c=c, huber_schedule="constant")
        assert _loss(cfg, prediction, target, sigmas) == pytest.approx(float(value), rel=1e-6)
    with pytest.raises(ValidationError, match="loss_type"):
        config(loss_type="l1")


def test_loss_type_huber_is_robust_to_outliers() -> None:
    """Huber grows linearly for large errors: one outlier weighs far less than under l2."""
    target = torch.zeros(1, 1, 4, 4)
    prediction = torch.zeros(1, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        prediction[0, 0, 0, 0] = 100.0
    sigmas = torch.tensor([1.0])
    grads = {}
    for loss_type in ("l2", "huber"):
        loss = elementwise_loss(prediction, target, sigmas, loss_type, 0.1, "constant").mean()
        (grad,) = torch.autograd.grad(loss, prediction)
        grads[loss_type] = float(grad[0, 0, 0, 0])
    assert grads["l2"] == pytest.approx(2 * 100 / 16)
    assert grads["huber"] == pytest.approx(2 * 0.1 / 16, rel=1e-3)  # 2c·sign(e)/N for |e| ≫ c


def test_huber_schedule_over_sigma() -> None:
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    assert huber_c(sigmas, 0.1, "constant").tolist() == pytest.approx([0.1, 0.1, 0.1])
    # exponential: c₀^σ — SimpleTuner's exp(−(−ln c₀/1000)·t) with t = 1000σ
    assert huber_c(sigmas, 0.1, "exponential").tolist() == pytest.approx([1.0, 0.1**0.5, 0.1])
    # snr: c₀ + (1 − c₀)/(1 + σ/(1 − σ))²
    assert huber_c(sigmas, 0.1, "snr").tolist() == pytest.approx([1.0, 0.1 + 0.9 * 0.25, 0.1])
    assert config().huber_schedule == "snr"  # SimpleTuner's default
    # The schedule reaches the loss: per sample, from its own σ.
    prediction, target = torch.full((2, 1, 1, 1), 0.5), torch.zeros(2, 1, 1, 1)
    both = _loss(config(loss_type="huber", huber_schedule="exponential"), prediction, target, torch.tensor([0.0, 1.0]))
    c = torch.tensor([1.0, 0.1])
    assert both == pytest.approx(float((2 * c * (torch.sqrt(0.25 + c * c) - c)).mean()))


def test_huber_c_sets_where_the_loss_turns_linear() -> None:
    """Errors well below c are squared (as l2), errors well above it count linearly, 2c·|e|."""
    small, large = torch.full((1, 1, 1, 1), 1e-2), torch.full((1, 1, 1, 1), 50.0)
    zero, sigma = torch.zeros(1, 1, 1, 1), torch.tensor([1.0])
    for c in (0.05, 0.5):
        cfg = config(loss_type="huber", huber_c=c, huber_schedule="constant")
        assert _loss(cfg, small, zero, sigma) == pytest.approx(1e-4, rel=2e-2)
        assert _loss(cfg, large, zero, sigma) == pytest.approx(2 * c * 50, rel=2e-2)
    assert config().huber_c == 0.1
    with pytest.raises(ValidationError, match="huber_c"):
        config(huber_c=0)


# -- optimizer_beta1/2, lr_scale, lr_scale_sqrt, prodigy_steps ------------------------------------------


def _group(**options: Any) -> dict[str, Any]:
    params = [torch.nn.Parameter(torch.zeros(2))]
    return optim.build_optimizer(params, config(**options)).param_groups[0]


def test_optimizer_beta1_and_beta2_override_every_optimizer() -> None:
    assert _group(optimizer_beta1=0.8)["betas"] == (0.8, 0.999)
    assert _group(optimizer_beta2=0.95)["betas"] == (0.9, 0.95)
    # they win over adam_beta1/2, and optimizer_config wins over them
    assert _group(adam_beta1=0.7, adam_beta2=0.9, optimizer_beta1=0.85, optimizer_beta2=0.98)["betas"] == (0.85, 0.98)
    assert _group(optimizer_beta1=0.85, optimizer_config="betas=(0.5,0.6)")["betas"] == (0.5, 0.6)
    lion = _group(optimizer="optimi-lion", optimizer_beta1=0.95, optimizer_beta2=0.98)
    assert (lion["beta1"], lion["beta2"]) == (0.95, 0.98)
    assert _group(optimizer="prodigy", optimizer_beta1=0.8, optimizer_beta2=0.9)["betas"] == (0.8, 0.9)
    with pytest.raises(ValidationError, match="optimizer_beta1"):
        config(optimizer_beta1=1.0)


def test_optimizer_beta2_changes_the_step() -> None:
    """Different betas give different updates from the same gradients (they reach the optimizer)."""
    finals = []
    for beta2 in (0.5, 0.999):
        param = torch.nn.Parameter(torch.zeros(4))
        opt = optim.build_optimizer([param], config(optimizer_beta2=beta2, adam_weight_decay=0.0))
        for step in range(3):
            param.grad = torch.full((4,), float(step + 1))
            opt.step()
        finals.append(param.detach().clone())
    assert not torch.allclose(finals[0], finals[1])


def test_lr_scale_multiplies_by_the_total_batch() -> None:
    cfg = config(learning_rate=1e-4, train_batch_size=4, gradient_accumulation_steps=2, lr_scale=True)
    assert optim.scaled_learning_rate(cfg, processes=3) == pytest.approx(1e-4 * 4 * 2 * 3)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optim.build_optimizer(params, cfg, processes=3).param_groups[0]["lr"] == pytest.approx(2.4e-3)
    assert optim.scaled_learning_rate(config(learning_rate=1e-4, train_batch_size=4), 3) == 1e-4  # off by default


def test_lr_scale_sqrt_takes_the_square_root() -> None:
    cfg = config(
        learning_rate=1e-4, train_batch_size=4, gradient_accumulation_steps=2, lr_scale=True, lr_scale_sqrt=True
    )
    assert optim.scaled_learning_rate(cfg, processes=2) == pytest.approx(1e-4 * 4)
    # As in SimpleTuner, lr_scale_sqrt alone does not scale.
    assert optim.scaled_learning_rate(config(learning_rate=1e-4, train_batch_size=4, lr_scale_sqrt=True), 2) == 1e-4


def test_prodigy_steps_freezes_the_step_size() -> None:
    """prodigyopt has no setting that stops the adaptation (its Prodigy takes lr, betas, beta3, eps,
    weight_decay, decouple, use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate,
    fsdp_in_use, slice_p); stune keeps d fixed from step prodigy_steps on with a step post-hook."""
    import inspect

    from prodigyopt import Prodigy

    assert "prodigy_steps" not in inspect.signature(Prodigy.__init__).parameters

    def d_values(**options: Any) -> list[float]:
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(16))
        cfg = config(optimizer="prodigy", **options)
        opt = optim.build_optimizer([param], cfg)
        optim.build_lr_scheduler(opt, cfg, max_steps=40)
        values = []
        for _ in range(10):
            param.grad = 2 * param.detach()  # the gradient of |p|²
            opt.step()
            values.append(float(opt.param_groups[0]["d"]))
        return values

    frozen = d_values(prodigy_steps=3)
    assert frozen[0] < frozen[2]  # adapting at first
    assert len(set(frozen[2:])) == 1  # then kept: d after step 3 stays
    free = d_values(prodigy_steps=0)  # 0: never stops
    assert free[:3] == frozen[:3] and free[-1] > frozen[-1]


# -- ema_warmup_steps -------------------------------------------------------------------------------------


def test_ema_warmup_steps_ramps_the_decay() -> None:
    assert config().ema_warmup_steps == 0
    param = torch.nn.Parameter(torch.zeros(3))
    warm = EMA([param], decay=0.9, interval=1, device=torch.device("cpu"), warmup=4)
    assert [warm.decay_at(s) for s in (1, 2, 4, 10)] == pytest.approx([0.225, 0.45, 0.9, 0.9])
    cold = EMA([param], decay=0.9, interval=1, device=torch.device("cpu"))
    with torch.no_grad():
        param.fill_(1.0)
    warm.update(1)
    cold.update(1)
    assert warm.shadow[0].tolist() == pytest.approx([0.775] * 3)  # 1 − 0.225: follows the new weights
    assert cold.shadow[0].tolist() == pytest.approx([0.1] * 3)  # anchored at the start
    with pytest.raises(ValidationError, match="ema_warmup_steps"):
        config(ema_warmup_steps=-1)


# -- checkpointing_rolling_steps, checkpoints_rolling_total_limit ------------------------------------------


def _write(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"w")


def test_checkpointing_rolling_steps_is_a_second_series(tmp_path: Path) -> None:
    assert config().checkpointing_rolling_steps == 0
    for step in (2, 4):
        checkpoint.save(tmp_path, step, _write, keep=5)
    for step in (5, 6, 7):
        checkpoint.save(tmp_path, step, _write, keep=2, rolling=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6-rolling", "checkpoint-7-rolling"]
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 4]
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path, rolling=True)] == [6, 7]
    # resume takes the newest complete checkpoint of both series
    assert checkpoint.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-7-rolling"
    checkpoint.save(tmp_path, 8, _write, keep=5)
    assert checkpoint.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-8"
    # a rolling checkpoint without its completion marker is never picked
    (tmp_path / "checkpoint-9-rolling").mkdir()
    assert checkpoint.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-8"
    assert checkpoint.resolve_resume(tmp_path, "checkpoint-7-rolling") == tmp_path / "checkpoint-7-rolling"


def test_checkpoints_rolling_total_limit_leaves_regular_ones(tmp_path: Path) -> None:
    assert config().checkpoints_rolling_total_limit == 1
    checkpoint.save(tmp_path, 1, _write, keep=1)
    for step in range(2, 6):
        checkpoint.save(tmp_path, step, _write, keep=1, rolling=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-5-rolling"]
    checkpoint.save(tmp_path, 6, _write, keep=1)  # the regular limit counts regular ones only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5-rolling", "checkpoint-6"]
    with pytest.raises(ValidationError, match="checkpoints_rolling_total_limit"):
        config(checkpoints_rolling_total_limit=0)


# -- ignore_missing_files, parquet_caption_column, parquet_filename_column ------------------------------


def _scan(tmp_path: Path, entry: dict[str, Any], **options: Any) -> Any:
    listing = tmp_path / "datasets.json"
    listing.write_text(json.dumps([{"id": "d", "instance_data_dir": str(tmp_path / "img"), **entry}]))
    cfg = config(data_backend_config=str(listing), cache_dir=str(tmp_path / "cache"), **options)
    return scan_dataset(resolve_datasets(cfg).datasets[0], 64, 2)


def test_ignore_missing_files(tmp_path: Path) -> None:
    make_images(tmp_path / "img", 4)
    assert len(_scan(tmp_path, {}).records) == 4  # writes the size index
    (tmp_path / "img" / "image_002.png").unlink()
    trusted = {"skip_file_discovery": "metadata"}
    with pytest.raises(ConfigError, match=r"image_002\.png.*ignore_missing_files"):
        _scan(tmp_path, trusted)
    scan = _scan(tmp_path, trusted, ignore_missing_files=True)
    assert len(scan.records) == 3 and scan.found == 4
    assert [(s.path.name, s.reason) for s in scan.skipped] == [("image_002.png", "missing file")]
    assert len(_scan(tmp_path, {}).records) == 3  # a normal scan lists the folder: nothing is missing


def _table(tmp_path: Path) -> Path:
    make_images(tmp_path / "img", 2, captions=False)
    table = tmp_path / "meta.jsonl"
    rows = [{"file": f"image_00{i}", "text": f"caption {i}", "caption": "wrong"} for i in range(2)]
    table.write_text("\n".join(json.dumps(r) for r in rows))
    return table


def test_parquet_caption_column_and_filename_column_are_global_defaults(tmp_path: Path) -> None:
    entry = {"caption_strategy": "parquet", "parquet": {"path": str(_table(tmp_path))}}
    scan = _scan(tmp_path, entry, parquet_caption_column="text", parquet_filename_column="file")
    assert sorted(c for r in scan.records for c in r.captions) == ["caption 0", "caption 1"]
    assert config().parquet_caption_column is None and config().parquet_filename_column is None


def test_parquet_filename_column_dataset_value_wins(tmp_path: Path) -> None:
    table = str(_table(tmp_path))
    entry = {"caption_strategy": "parquet", "parquet": {"path": table, "caption_column": "caption"}}
    scan = _scan(tmp_path, entry, parquet_caption_column="text", parquet_filename_column="file")
    assert {c for r in scan.records for c in r.captions} == {"wrong"}  # the block's own caption_column
    # without the global filename column the block's default `id` is used, which this table lacks
    with pytest.raises(ConfigError, match=r"no column `id`.*parquet_filename_column"):
        _scan(tmp_path, {"caption_strategy": "parquet", "parquet": {"path": table}}, parquet_caption_column="text")


# -- disk_low_threshold, disk_low_action, disk_low_script ------------------------------------------------


def _more_than_free(path: Path) -> str:
    return str(shutil.disk_usage(path).free + 1024**3)


def test_disk_low_threshold_values(tmp_path: Path) -> None:
    assert config().disk_low_threshold is None
    for value in ("10G", "500M", "1048576", "5%", "1.5T", "2GiB"):
        assert config(disk_low_threshold=value).disk_low_threshold == value
    with pytest.raises(ValidationError, match="disk_low_threshold"):
        config(disk_low_threshold="lots")
    with pytest.raises(ValidationError, match="disk_low_threshold"):
        config(disk_low_threshold="150%")
    assert diskguard.shortfall(config(disk_low_threshold="1"), tmp_path) is None
    assert diskguard.shortfall(config(disk_low_threshold="99.999%"), tmp_path) is not None
    assert "below disk_low_threshold" in str(
        diskguard.shortfall(config(disk_low_threshold=_more_than_free(tmp_path)), tmp_path)
    )


def test_disk_low_action_stop(tmp_path: Path) -> None:
    """stop: the run ends before anything of the checkpoint is written."""
    cfg = config(disk_low_threshold=_more_than_free(tmp_path))
    assert cfg.disk_low_action == "stop"
    with pytest.raises(diskguard.DiskSpaceLow, match=r"before writing checkpoint-3.*disk_low_threshold"):
        diskguard.ensure_space(cfg, tmp_path / "output", "checkpoint-3", Processes())
    diskguard.ensure_space(config(disk_low_threshold="1K"), tmp_path, "checkpoint-3")  # enough: returns


def test_disk_low_action_wait_until_space_returns(tmp_path: Path) -> None:
    cfg = config(disk_low_threshold=_more_than_free(tmp_path), disk_low_action="wait")
    done = threading.Event()

    def save() -> None:
        diskguard.ensure_space(cfg, tmp_path, "checkpoint-1", poll=0.02)
        done.set()

    worker = threading.Thread(target=save)
    worker.start()
    time.sleep(0.3)
    assert not done.is_set()  # still waiting
    cfg.disk_low_threshold = "1K"  # space is back (as far as the guard can tell)
    worker.join(timeout=10)
    assert done.is_set()


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "free_space.py"
    script.write_text(f"#!{sys.executable}\nimport sys, pathlib\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_disk_low_script_runs_with_output_dir(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    script = _script(tmp_path, f"pathlib.Path({str(marker)!r}).write_text(sys.argv[1] + '|' + str(len(sys.argv)))")
    output = tmp_path / "out put"  # a space in the path: one argument, no shell
    cfg = config(disk_low_threshold=_more_than_free(tmp_path), disk_low_script=str(script))
    with pytest.raises(diskguard.DiskSpaceLow):  # the script freed nothing: stop
        diskguard.ensure_space(cfg, output, "checkpoint-2")
    assert marker.read_text() == f"{output}|2"
    # action `script` is the same, and needs the script
    config(disk_low_threshold="1G", disk_low_action="script", disk_low_script=str(script))
    with pytest.raises(ValidationError, match="disk_low_script"):
        config(disk_low_threshold="1G", disk_low_action="script")


def test_disk_low_script_that_frees_space_lets_the_save_go_on(tmp_path: Path) -> None:
    """A script that solves the problem: the guard looks again after it and the save goes ahead."""
    limit = tmp_path / "limit.txt"
    limit.write_text(_more_than_free(tmp_path))
    script = _script(tmp_path, f"pathlib.Path({str(limit)!r}).write_text('1K')")
    cfg = config(disk_low_threshold=limit.read_text(), disk_low_script=str(script))

    class Reread:  # the threshold as the script left it (stands for the space it freed)
        def __getattr__(self, name: str) -> Any:
            return limit.read_text() if name == "disk_low_threshold" else getattr(cfg, name)

    diskguard.ensure_space(Reread(), tmp_path, "checkpoint-2")  # type: ignore[arg-type]
    assert limit.read_text() == "1K"
