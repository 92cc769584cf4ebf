"""SimpleTuner's training options acting in real runs: the toy family (tests/toy_family.py) for the
loop options, the tiny FLUX pipeline for validation_noise_scheduler.

One module-scoped run uses most options at once (epoch intervals, rolling checkpoints, startup
validation, jpg images, eval datasets per dataset, the Huber loss, lr_scale, EMA warm-up); a
second run resumes from its rolling checkpoint, a third stops on the disk guard. Each test is named
after the option it covers (``test_<option>…``); the option logic without a model is tested in
core/tests/test_simpletuner_options.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import stune
from stune.diskguard import DiskSpaceLow
from stune.plugins import PluginHost
from stune.testing import make_images, write_run

from .conftest import load_toy

toy = load_toy()

#: 4 training images, batch 2: 2 steps an epoch; 6 steps: 3 epochs
STEPS = 6
OPTIONS: dict[str, Any] = {
    "max_train_steps": STEPS,
    "checkpoint_step_interval": 0,
    "checkpoint_epoch_interval": 2,
    "checkpointing_rolling_steps": 1,
    "checkpoints_rolling_total_limit": 2,
    "validation_step_interval": 0,
    "validation_epoch_interval": 1,
    "validation_on_startup": True,
    "validation_image_format": "jpg",
    "validation_image_quality": 40,
    "eval_epoch_interval": 0.5,
    "loss_type": "huber",
    "huber_schedule": "exponential",
    "huber_c": 0.2,
    "learning_rate": 1e-3,
    "lr_scale": True,
    "lr_scheduler": "constant",
    "use_ema": True,
    "ema_warmup_steps": 3,
}


class Observer:
    """Records the start step and, per micro-step, the loss with what it was computed from."""

    def __init__(self) -> None:
        self.start_steps: list[int] = []
        self.losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []

    @stune.hookimpl
    def on_train_start(self, state: Any) -> None:
        self.start_steps.append(state.global_step)

    @stune.hookimpl(wrapper=True)
    def compute_loss(self, prediction: Any, inputs: Any) -> Iterator[None]:
        loss = yield
        self.losses.append(
            (
                prediction.velocity.detach().float().clone(),
                inputs.target.detach().float().clone(),
                inputs.sigmas.detach().float().clone(),
                float(loss.detach()),
            )
        )
        return loss  # type: ignore[no-any-return]


def make_run(folder: Path, model: Path, **options: Any) -> Path:
    make_images(folder / "data", 4, size=(32, 32))
    for name in ("held_a", "held_b"):
        make_images(folder / name, 1, size=(32, 32))
    config = {
        "model_family": "toy",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "output"),
        "train_batch_size": 2,
        "mixed_precision": "no",
        "resolution": 32,
        "caption_strategy": "textfile",
        "seed": 0,
        "validation_prompt": "a picture number 1",
        "validation_resolution": "32x32",
        "validation_num_inference_steps": 2,
        "disable_benchmark": True,
        "eval_timesteps": 2,
        **options,
    }
    cache = folder / "cache"
    datasets: list[dict[str, Any]] = [
        {"id": "pics", "instance_data_dir": str(folder / "data"), "cache_dir_vae": str(cache / "pics")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(cache / "text")},
    ]
    for name in ("held_a", "held_b"):
        datasets.append(
            {
                "id": name,
                "dataset_type": "eval",
                "instance_data_dir": str(folder / name),
                "cache_dir_vae": str(cache / name),
            }
        )
    write_run(folder, config, datasets)
    return folder


def train_in(folder: Path, observer: Observer | None = None) -> Any:
    import stune.session
    import stune.train

    plugins: list[Any] = [toy] + ([observer] if observer is not None else [])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        host = PluginHost.build(plugins=plugins, entry_points=False)
        return stune.train.train(stune.session.prepare(None, None, None, host=host))


@dataclass
class Trained:
    folder: Path
    result: Any
    observer: Observer
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return self.folder / "output"

    def images(self) -> set[str]:
        return {p.name for p in (self.output / "validation_images").iterdir()}

    def evals(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if "eval_loss" in m]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> Trained:
    folder = make_run(tmp_path_factory.mktemp("st-options"), toy_model, **OPTIONS)
    observer = Observer()
    result = train_in(folder, observer)
    lines = (folder / "output" / "metrics.jsonl").read_text().splitlines()
    return Trained(folder, result, observer, [json.loads(line) for line in lines])


# -- checkpoints ----------------------------------------------------------------------------------------


def test_checkpoint_epoch_interval(trained: Trained) -> None:
    """Every 2 epochs (= 4 steps here) and at the end; checkpoint_step_interval 0 adds none."""
    regular = sorted(p.name for p in trained.output.glob("checkpoint-*") if not p.name.endswith("-rolling"))
    assert regular == ["checkpoint-4", "checkpoint-6"]


def test_checkpointing_rolling_steps(trained: Trained) -> None:
    """A rolling checkpoint every step where no regular one is written (1, 2, 3, 5), each complete."""
    written = [p.name for p in trained.result.checkpoints]
    assert written == [
        "checkpoint-1-rolling",
        "checkpoint-2-rolling",
        "checkpoint-3-rolling",
        "checkpoint-4",
        "checkpoint-5-rolling",
        "checkpoint-6",
    ]
    for name in ("checkpoint-3-rolling", "checkpoint-5-rolling"):
        assert (trained.output / name / "checkpoint_complete.json").is_file()
        assert (trained.output / name / "training_state.pt").is_file()


def test_checkpoints_rolling_total_limit(trained: Trained) -> None:
    rolling = sorted(p.name for p in trained.output.glob("checkpoint-*-rolling"))
    assert rolling == ["checkpoint-3-rolling", "checkpoint-5-rolling"]  # the newest 2


def test_checkpointing_rolling_steps_resume_from_the_newest(trained: Trained, tmp_path: Path, toy_model: Path) -> None:
    """With the regular checkpoints gone, `latest` is the newest rolling one, and training goes on from it."""
    folder = make_run(tmp_path, toy_model, **OPTIONS)
    shutil.copytree(trained.output / "checkpoint-5-rolling", folder / "output" / "checkpoint-5-rolling")
    shutil.copytree(trained.output / "checkpoint-3-rolling", folder / "output" / "checkpoint-3-rolling")
    observer = Observer()
    result = train_in(folder, observer)
    assert observer.start_steps == [5]
    assert result.final_step == STEPS and len(observer.losses) == 1  # one more step
    from safetensors.torch import load_file

    resumed, uninterrupted = load_file(str(result.adapter_files[0])), load_file(str(trained.result.adapter_files[0]))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # exactly the uninterrupted run


# -- validation ----------------------------------------------------------------------------------------


def test_validation_on_startup(trained: Trained) -> None:
    assert "step-000000-validation-32x32.jpg" in trained.images()


def test_validation_epoch_interval(trained: Trained) -> None:
    """After epochs 1 and 2 (steps 2 and 4) and at the end (step 6); validation_step_interval 0 adds none."""
    steps = sorted({int(name.split("-")[1]) for name in trained.images()})
    assert steps == [0, 2, 4, 6]


def test_validation_image_format(trained: Trained) -> None:
    assert all(name.endswith(".jpg") for name in trained.images())
    path = trained.output / "validation_images" / "step-000002-validation-32x32.jpg"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (32, 32)
    assert all(p.suffix == ".jpg" for p in trained.result.validation_images)


def test_validation_image_quality(trained: Trained, tmp_path: Path) -> None:
    """The file was written at quality 40: re-encoding the decoded pixels at 40 gives about the same size."""
    path = trained.output / "validation_images" / "step-000006-validation-32x32.jpg"
    with Image.open(path) as image:
        pixels = image.convert("RGB")
    sizes = {}
    for quality in (40, 100):
        out = tmp_path / f"q{quality}.jpg"
        pixels.save(out, format="JPEG", quality=quality)
        sizes[quality] = out.stat().st_size
    assert abs(path.stat().st_size - sizes[40]) < abs(path.stat().st_size - sizes[100])


# -- evaluation ------------------------------------------------------------------------------------------


def test_eval_epoch_interval(trained: Trained) -> None:
    """0.5 epochs = every step here (fractions run several times an epoch), and at the end."""
    assert [m["step"] for m in trained.evals()] == [1, 2, 3, 4, 5, 6]


def test_eval_dataset_pooling(trained: Trained, tmp_path: Path, toy_model: Path) -> None:
    """Default (false): each eval dataset has its own number, eval_loss is the mean over all; true: one number."""
    for record in trained.evals():
        assert record["eval_loss"] == pytest.approx((record["eval_loss/held_a"] + record["eval_loss/held_b"]) / 2)
        assert record["eval_loss/held_a"] != record["eval_loss/held_b"]
    pooled = make_run(tmp_path, toy_model, max_train_steps=1, eval_dataset_pooling=True, validation_disable=True)
    train_in(pooled)
    [record] = [json.loads(line) for line in (pooled / "output" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert "eval_loss" in record and not any(key in record for key in ("eval_loss/held_a", "eval_loss/held_b"))


# -- the loss, the learning rate, EMA -------------------------------------------------------------------


def test_loss_type_huber_in_training(trained: Trained) -> None:
    """Every training micro-step's loss is the pseudo-Huber loss with c = huber_c^σ (huber_schedule exponential)."""
    assert len(trained.observer.losses) == STEPS
    for velocity, target, sigmas, loss in trained.observer.losses:
        c = (0.2**sigmas).view(-1, 1, 1, 1)
        expected = (2 * c * (torch.sqrt((velocity - target).square() + c * c) - c)).mean()
        assert loss == pytest.approx(float(expected), rel=1e-5)
        assert loss != pytest.approx(float((velocity - target).square().mean()), rel=1e-3)


def test_lr_scale_in_training(trained: Trained) -> None:
    """learning_rate 1e-3 × train_batch_size 2 × accumulation 1 × 1 process."""
    rates = [m["lr"] for m in trained.metrics if "loss" in m]
    assert len(rates) == STEPS and rates == pytest.approx([2e-3] * STEPS)


def test_ema_warmup_steps_in_training(trained: Trained) -> None:
    """The EMA export exists and, warmed up over 3 of 6 steps, sits between the start and the trained weights."""
    from safetensors.torch import load_file

    trained_weights = load_file(str(trained.result.adapter_files[0]))
    ema_file = next(p for p in trained.result.adapter_files if p.parent.name == "ema")
    ema_weights = load_file(str(ema_file))
    moved = [key for key in trained_weights if not torch.equal(trained_weights[key], ema_weights[key])]
    assert moved  # the average differs from the last weights
    # With decay 0.995 and no warm-up the average of a zero-initialised LoRA B would stay within
    # 1 − 0.995^6 ≈ 3% of the trained value; the warm-up lets it follow the weights much further.
    b_keys = [k for k in trained_weights if "lora_B" in k or "lora_up" in k]
    assert b_keys
    ratio = sum(float(ema_weights[k].abs().sum()) for k in b_keys) / sum(
        float(trained_weights[k].abs().sum()) for k in b_keys
    )
    assert ratio > 0.1


# -- disk guard --------------------------------------------------------------------------------------------


def test_disk_low_threshold_stops_before_a_checkpoint(tmp_path: Path, toy_model: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    folder = make_run(
        tmp_path,
        toy_model,
        max_train_steps=3,
        checkpoint_step_interval=1,
        validation_disable=True,
        eval_loss_disable=True,
        disk_low_threshold=str(free + 1024**3),
    )
    with pytest.raises(DiskSpaceLow, match=r"before writing checkpoint-1.*disk_low_threshold"):
        train_in(folder)
    output = folder / "output"
    assert not list(output.glob("checkpoint-*")) and not list(output.glob(".checkpoint-*"))  # nothing half-written
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1]


# -- validation_noise_scheduler (tiny FLUX) -----------------------------------------------------------------


def test_validation_noise_scheduler(tiny_flux_dir: Path) -> None:
    """Each SimpleTuner name samples with its diffusers class through the real FluxPipeline, and the
    model's own scheduler is put back after."""
    import diffusers

    from stune.family import LoadRequest, ValidationRequest
    from stune.validation import noise_scheduler, validation_scheduler

    host = PluginHost.build(["flux"])
    base = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(tiny_flux_dir),
        "tokenizer_max_length": 16,
        "mixed_precision": "no",
        "validation_num_inference_steps": 4,
    }
    config = host.config_model().model_validate(base)
    family = host.family_class("flux")(config)
    family.apply_defaults()
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    positive, negative = family.encode_prompts(components, ["a red circle", "blurry"])
    request = ValidationRequest("x", "a red circle", positive, negative, 64, 64, seed=3)
    own = components.scheduler
    expected = {
        None: diffusers.FlowMatchEulerDiscreteScheduler,
        "euler": diffusers.FlowMatchEulerDiscreteScheduler,
        "euler-a": diffusers.FlowMatchEulerDiscreteScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "dpm++": diffusers.DPMSolverMultistepScheduler,
    }
    images, used = {}, {}
    for name, cls in expected.items():
        cfg = host.config_model().model_validate({**base, "validation_noise_scheduler": name})
        with torch.no_grad(), validation_scheduler(components, cfg):
            used[name] = components.scheduler
            [image] = family.render_validation(components, components.transformer, [request])
        images[name] = np.asarray(image, dtype=np.int16)
        assert type(used[name]) is cls
        assert components.scheduler is own
    assert used["euler-a"].config.stochastic_sampling and not used["euler"].config.stochastic_sampling
    assert used["unipc"].config.use_flow_sigmas and used["unipc"].config.prediction_type == "flow_prediction"
    assert noise_scheduler("dpm++", own).config.flow_shift == own.config.shift  # before the pipeline's own mu
    assert np.array_equal(images["euler"], images[None])  # the model's own sampler
    for name in ("euler-a", "unipc", "dpm++"):
        assert not np.array_equal(images[name], images[None]), name
    # A UniPC-on-flow model (HiDream's scheduler): its flow_shift carries over; DPM++ takes the pipeline's mu.
    unipc = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    assert noise_scheduler("euler", unipc).config.shift == 3.0
    assert noise_scheduler("dpm++", unipc).config.use_dynamic_shifting
    static = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's: no dynamic shifting, none added
    assert not noise_scheduler("dpm++", static).config.use_dynamic_shifting
    assert noise_scheduler("dpm++", static).config.flow_shift == 3.0
    for refused in ("ddim", "ddpm", "perflow"):
        with pytest.raises(ValueError, match=f"validation_noise_scheduler {refused} is refused"):
            host.config_model().model_validate({**base, "validation_noise_scheduler": refused})
