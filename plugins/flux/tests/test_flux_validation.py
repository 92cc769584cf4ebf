"""Validation images and the eval loss, end to end on the tiny FLUX pipeline.

Images for every prompt-library nickname at the scheduled steps and at the end, several images per
prompt, base-model images once (and not again on resume), validation switched off, true CFG; the
eval loss: fixed noise (same weights → same number), logged at its interval, eval images never
trained on, and training itself undisturbed by validation and evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import stune
from stune.data.prepare import fill_caches, plan_caches, scan
from stune.evaluation import make_evaluator
from stune.family import LoadRequest, ValidationRequest
from stune.plugins import PluginHost
from stune.session import prepare
from stune.step import FlowStep, Predictor, StepInputs
from stune.testing import make_images
from stune.train import TrainResult, train

from .test_flux import flux_run

LIBRARY = {"red_circle": "a red circle", "blue square": {"prompt": "a blue square"}}
NICKNAMES = ("validation", "red_circle", "blue_square")  # validation_prompt's, then the library's (slugged)
VALIDATION = {
    "validation_prompt": "a picture number 1",
    "user_prompt_library": "config/user_prompt_library.json",
    "validation_resolution": "64x64,128x64",
    "validation_num_inference_steps": 2,
}


class PathRecorder:
    """Records the images of every batch the loss is computed on (a compute_loss wrapper)."""

    __name__ = "path-recorder"

    def __init__(self) -> None:
        self.paths: list[str] = []

    @stune.hookimpl(wrapper=True)
    def compute_loss(self, inputs: StepInputs) -> Any:
        self.paths += inputs.batch["paths"]
        return (yield)


def validation_run(folder: Path, model: Path, eval_images: int = 0, **options: Any) -> Path:
    run = flux_run(folder, model, **options)
    (run / "config" / "user_prompt_library.json").write_text(json.dumps(LIBRARY))
    if eval_images:
        make_images(run / "held_out", eval_images, size=(64, 64))
        datasets_file = run / "config" / "multidatabackend.json"
        datasets = json.loads(datasets_file.read_text())
        datasets.insert(
            1,
            {
                "id": "held",
                "type": "local",
                "dataset_type": "eval",
                "instance_data_dir": "held_out",
                "cache_dir_vae": "cache/vae/held",
            },
        )
        datasets_file.write_text(json.dumps(datasets))
    return run


def run_train(run: Path, *plugins: Any, **overrides: Any) -> TrainResult:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run)
        session = prepare(
            overrides={k: str(v) for k, v in overrides.items()}, host=PluginHost.build(["flux"], plugins=list(plugins))
        )
        return train(session)


def metrics(run: Path, output: str = "output") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / output / "metrics.jsonl").read_text().splitlines()]


def image_names(run: Path, output: str = "output") -> set[str]:
    folder = run / output / "validation_images"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@dataclass
class Trained:
    run: Path
    result: TrainResult
    recorder: PathRecorder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> Trained:
    """4 steps; validation every 2 steps, 2 images per prompt and size; eval loss every 2 steps."""
    run = validation_run(
        tmp_path_factory.mktemp("validation"),
        tiny_flux_dir,
        eval_images=3,
        max_train_steps=4,
        validation_step_interval=2,
        num_validation_images=2,
        validation_negative_prompt="a picture number 3",
        eval_steps_interval=2,
        eval_timesteps=3,
        num_eval_images=2,
        **VALIDATION,
    )
    recorder = PathRecorder()
    result = run_train(run, recorder)
    return Trained(run, result, recorder)


def test_images_for_every_nickname_at_every_scheduled_step(trained: Trained) -> None:
    sizes = ("64x64", "128x64")
    expected = {
        f"{prefix}-{nickname}-{size}-{i}.png"
        for prefix in ("base", "step-000002", "step-000004")
        for nickname in NICKNAMES
        for size in sizes
        for i in range(2)
    }
    assert image_names(trained.run) == expected
    assert {p.name for p in trained.result.validation_images} == expected
    folder = trained.run / "output" / "validation_images"
    with Image.open(folder / "step-000004-red_circle-128x64-1.png") as image:
        assert image.size == (128, 64)
    # image i of a prompt uses seed + i: the two images differ; the same seed and weights repeat
    first, second = (np.asarray(Image.open(folder / f"base-validation-64x64-{i}.png")) for i in range(2))
    assert not np.array_equal(first, second)


def test_eval_loss_in_metrics_at_its_interval(trained: Trained) -> None:
    records = metrics(trained.run)
    evals = [r for r in records if "eval_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert math.isfinite(record["eval_loss"])
        per_sigma = [record[f"eval_loss/sigma_{k:02d}"] for k in range(3)]
        assert record["eval_loss"] == pytest.approx(sum(per_sigma) / 3)
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]  # two steps of training changed it


def test_eval_images_are_never_trained_on(trained: Trained) -> None:
    trained_on = {Path(p).parent.name for p in trained.recorder.paths}
    assert len(trained.recorder.paths) == 4 * 2  # every step's batch, and nothing else
    assert trained_on == {"data"}


def test_validation_and_eval_leave_training_unchanged(trained: Trained, tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = validation_run(tmp_path, tiny_flux_dir, eval_images=3, max_train_steps=4, eval_loss_disable=True)
    run_train(run, validation_disable=True)
    assert not image_names(run)
    assert not any("eval_loss" in r for r in metrics(run))
    losses = [r["loss"] for r in metrics(trained.run) if "loss" in r]
    assert [r["loss"] for r in metrics(run)] == losses  # same noise, same σ, same batches


def test_same_weights_give_the_same_eval_loss(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = validation_run(tmp_path, tiny_flux_dir, eval_images=3, num_eval_images=2, eval_timesteps=4)
    monkeypatch.chdir(run)  # the dataset and cache paths are relative to the run folder
    session = prepare(host=PluginHost.build(["flux"]))
    config, family, host = session.config, session.family, session.host
    device = torch.device("cpu")
    report = scan(config, family)
    components = host.hooks.load_model(family=family, config=config, request=LoadRequest(device, torch.float32))
    data = fill_caches(plan_caches(config, family, report, []), config, family, components, host, device)
    flow = FlowStep(family, config, components, device, torch.float32)
    evaluator = make_evaluator(flow, components, config, data.eval_samples, data.text_cache)
    assert evaluator is not None
    assert [s.image.name for s in evaluator.samples] == ["image_000.png", "image_001.png"]
    transformer = components.transformer
    transformer.train()
    predictor = Predictor(family, transformer)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    first = evaluator.evaluate(predictor, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is left alone
    assert transformer.training  # and the mode it was in
    torch.randn(100)  # whatever the global stream does in between
    second = evaluator.evaluate(predictor, 0)
    assert (first.loss, first.per_sigma) == (second.loss, second.per_sigma)
    assert len(first.per_sigma) == 4 and first.per_sigma[0] != first.per_sigma[-1]
    with torch.no_grad():
        transformer.proj_out.weight.mul_(1.5)
    assert evaluator.evaluate(predictor, 0).loss != first.loss

    assert make_evaluator(flow, components, config, [], data.text_cache) is None  # no eval dataset
    config.eval_loss_disable = True
    assert make_evaluator(flow, components, config, data.eval_samples, data.text_cache) is None


def test_base_images_once_and_kept_on_resume(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = validation_run(tmp_path, tiny_flux_dir, checkpoint_step_interval=2, **VALIDATION)
    run_train(run)
    base = {p: p.stat().st_mtime_ns for p in (run / "output" / "validation_images").glob("base-*.png")}
    assert {p.name for p in base} == {f"base-{n}-{s}.png" for n in NICKNAMES for s in ("64x64", "128x64")}
    resumed = run_train(run, max_train_steps=4)
    assert resumed.final_step == 4
    assert not any(p.name.startswith("base-") for p in resumed.validation_images)
    assert {p: p.stat().st_mtime_ns for p in (run / "output" / "validation_images").glob("base-*.png")} == base
    assert "step-000004-red_circle-64x64.png" in image_names(run)


def test_disable_benchmark_and_validation_disable(tmp_path: Path, tiny_flux_dir: Path) -> None:
    run = validation_run(tmp_path, tiny_flux_dir, disable_benchmark=True, **VALIDATION)
    result = run_train(run)
    names = {f"step-000002-{n}-{s}.png" for n in NICKNAMES for s in ("64x64", "128x64")}
    assert image_names(run) == names  # the end of training only, no base images
    # 4 captions, "", the library's 2 prompts (validation_prompt is caption 1) and the negative prompt
    assert result.encoded_captions == 4 + 1 + 2 + 1

    off = run_train(run, output_dir="off", validation_disable=True)
    assert off.validation_images == [] and not (run / "off" / "validation_images").exists()


def _validation_setup(model: Path, steps: int) -> tuple[Any, Any, Any, ValidationRequest]:
    """The tiny FLUX family loaded in this process, and one validation request (a red circle, seed 3)."""
    host = PluginHost.build(["flux"])
    config = host.config_model().model_validate(
        {
            "model_family": "flux",
            "pretrained_model_name_or_path": str(model),
            "tokenizer_max_length": 16,
            "mixed_precision": "no",
            "validation_num_inference_steps": steps,
        }
    )
    family = host.family_class("flux")(config)
    family.apply_defaults()
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    positive, negative = family.encode_prompts(components, ["a red circle", "blurry, cropped, ugly"])
    return config, family, components, ValidationRequest("x", "a red circle", positive, negative, 64, 64, seed=3)


def test_validation_guidance_is_the_guidance_flux_renders_with(tiny_flux_dir: Path) -> None:
    """FLUX dev takes validation_guidance as its distilled guidance input (the transformer's
    ``guidance`` argument); another value gives another image from the same seed."""
    config, family, components, request = _validation_setup(tiny_flux_dir, steps=2)
    seen: list[float] = []
    components.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(kwargs["guidance"].tolist()), with_kwargs=True
    )
    images = {}
    for guidance in (1.0, 4.0):
        config.validation_guidance = guidance
        seen.clear()
        with torch.no_grad():
            [image] = family.render_validation(components, components.transformer, [request])
        images[guidance] = np.asarray(image, dtype=np.int16)
        assert seen == [guidance, guidance]  # both sampling steps
    assert not np.array_equal(images[1.0], images[4.0])


def test_true_cfg(tiny_flux_dir: Path) -> None:
    config, family, components, request = _validation_setup(tiny_flux_dir, steps=3)
    transformer = components.transformer

    def render(guidance_real: float, no_cfg_until: int) -> np.ndarray:
        config.validation_guidance_real = guidance_real  # type: ignore[attr-defined]
        config.validation_no_cfg_until_timestep = no_cfg_until  # type: ignore[attr-defined]
        with torch.no_grad():
            [image] = family.render_validation(components, transformer, [request])
        return np.asarray(image, dtype=np.int16)

    plain = render(1.0, 0)
    cfg = render(4.0, 0)
    assert np.abs(cfg - plain).max() > 0  # true CFG changes the image
    assert np.array_equal(render(4.0, 3), plain)  # CFG held off for all 3 steps: the plain image
    late = render(4.0, 1)
    assert not np.array_equal(late, plain) and not np.array_equal(late, cfg)
    assert not transformer._forward_hooks  # the model is left as it was
    assert np.array_equal(render(1.0, 0), plain)
