"""A third-party family plugin (tests/toy_family.py, not FLUX-shaped) trains through the public hooks.

One in-process training run (module-scoped, ~2 steps on a tiny model) is shared by the tests that
inspect its outputs and the hook calls recorded during it; the CLI tests load the same file with
``--plugin /path/to/toy_family.py`` in a subprocess.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import stune
from stune.plugins import PluginHost
from stune.testing import make_images, run_cli, write_run

from .conftest import TOY_PATH, load_toy

VALIDATION_PROMPT = "a picture number 1"


toy = load_toy()


# -------------------------------------------------------------------------------------------------
# Plugins the tests register next to the toy family
# -------------------------------------------------------------------------------------------------


class Recorder:
    """Observes the lifecycle hooks and wraps two firstresult hooks without replacing them."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = defaultdict(list)

    @stune.hookimpl
    def check_config(self, config: Any, family: Any) -> None:
        self.calls["check_config"].append((config.model_family, type(family).__name__))

    @stune.hookimpl
    def quantize(self, components: Any) -> None:
        self.calls["quantize"].append(components.extras.get("loaded_by"))

    @stune.hookimpl(wrapper=True)
    def encode_text(self, prompts: list[str]) -> Iterator[None]:
        result = yield
        self.calls["encode_text"].append((list(prompts), result))
        return result

    @stune.hookimpl(wrapper=True)
    def compute_loss(self, prediction: Any, inputs: Any, family: Any) -> Iterator[None]:
        loss = yield
        self.calls["compute_loss"].append(
            {
                "loss": float(loss.detach()),
                "prediction": tuple(prediction.velocity.shape),
                "target": tuple(inputs.target.shape),
                "family": family.name,
            }
        )
        return loss * 1.0

    @stune.hookimpl
    def on_train_start(self, state: Any) -> None:
        self.calls["on_train_start"].append(state.global_step)

    @stune.hookimpl
    def on_step_end(self, state: Any, metrics: dict[str, float]) -> None:
        self.calls["on_step_end"].append(dict(metrics))

    @stune.hookimpl
    def on_checkpoint_saved(self, state: Any, path: Path) -> None:
        self.calls["on_checkpoint_saved"].append(
            (state.global_step, path, (path / "checkpoint_complete.json").is_file())
        )

    @stune.hookimpl
    def on_validation_done(self, state: Any, images: list[Path]) -> None:
        self.calls["on_validation_done"].append((state.global_step, list(images), all(p.is_file() for p in images)))

    @stune.hookimpl
    def on_train_end(self, state: Any, output_dir: Path) -> None:
        self.calls["on_train_end"].append((state.global_step, output_dir))


class LoadReplacer:
    """Replaces the load phase (firstresult): delegates to the family but marks what it returned."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    @stune.hookimpl
    def load_model(self, family: Any, request: Any) -> Any:
        self.calls.append(request.text_encoders)
        components = family.load(request)
        components.extras["loaded_by"] = "replacer"
        return components


# -------------------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------------------


def toy_run(folder: Path, model: Path, **options: Any) -> Path:
    """A run folder with four 32×32 captioned images and a toy config (absolute paths)."""
    make_images(folder / "data", 4, size=(32, 32))
    config = {
        "model_family": "toy",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "output"),
        "max_train_steps": 2,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "mixed_precision": "no",
        "gradient_checkpointing": True,
        "resolution": 32,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 1,
        "validation_prompt": VALIDATION_PROMPT,
        "validation_resolution": "32x32",
        "validation_num_inference_steps": 2,
        "validation_step_interval": 1,
        "disable_benchmark": True,
        **options,
    }
    datasets = [
        {
            "id": "pics",
            "type": "local",
            "instance_data_dir": str(folder / "data"),
            "cache_dir_vae": str(folder / "cache" / "vae" / "pics"),
        },
        {
            "id": "text",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(folder / "cache" / "text"),
        },
    ]
    write_run(folder, config, datasets)
    return folder


@dataclass
class Trained:
    run_dir: Path
    output_dir: Path
    result: Any
    recorder: Recorder
    replacer: LoadReplacer
    family_loads: list[bool]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> Trained:
    """Train the toy family in-process for 2 steps with the recorder and the load replacer."""
    import stune.session
    import stune.train

    run_dir = toy_run(tmp_path_factory.mktemp("toy-run"), toy_model)
    recorder, replacer = Recorder(), LoadReplacer()
    family_loads: list[bool] = []
    original_load = toy.ToyFamily.load

    def counting_load(self: Any, request: Any) -> Any:
        family_loads.append(request.text_encoders)
        return original_load(self, request)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(toy.ToyFamily, "load", counting_load)
        host = PluginHost.build(plugins=[toy, recorder, replacer], entry_points=False)
        session = stune.session.prepare(None, None, None, host=host)
        assert isinstance(session.family, toy.ToyFamily)
        result = stune.train.train(session)
    return Trained(run_dir, run_dir / "output", result, recorder, replacer, family_loads)


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


# -------------------------------------------------------------------------------------------------
# a. the in-process run and its outputs
# -------------------------------------------------------------------------------------------------


def test_toy_family_registers_through_the_hook() -> None:
    host = PluginHost.build(plugins=[toy], entry_points=False)
    assert host.families == {"toy": toy.ToyFamily}
    assert host.infos[toy.__name__].provides["families"] == ["toy"]
    assert "register_families" in host.infos[toy.__name__].hooks


def test_training_runs_and_writes_the_adapter(trained: Trained) -> None:
    out = trained.output_dir
    assert trained.result.final_step == 2
    adapter = out / "pytorch_lora_weights.safetensors"
    assert adapter.is_file()
    assert trained.result.adapter_files == [adapter]
    tensors, metadata = read_adapter(adapter)
    assert tensors
    assert all(k.startswith("transformer.") and "lora" in k for k in tensors), sorted(tensors)[:4]
    # The "attn" preset: self-attention projections of both blocks, never the cross-attention.
    adapted = {k.split(".lora_")[0] for k in tensors}
    assert adapted == {f"transformer.blocks.{b}.attn.{n}" for b in range(2) for n in ("to_q", "to_k", "to_v", "to_out")}
    # PEFT initialises lora_B to zeros; two optimizer steps at lr 1e-3 must have moved them.
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().max() > 0) for v in lora_b)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    lora_config = json.loads(metadata["lora_config"])
    assert lora_config["r"] == 16 and sorted(lora_config["target_modules"]) == ["to_k", "to_out", "to_q", "to_v"]


def test_the_family_reads_back_what_it_saved(trained: Trained) -> None:
    family = toy.ToyFamily(None)  # load_lora does not touch the config
    state = family.load_lora(trained.output_dir / "pytorch_lora_weights.safetensors")
    tensors, _ = read_adapter(trained.output_dir / "pytorch_lora_weights.safetensors")
    assert set(state) == {k.removeprefix("transformer.") for k in tensors}
    assert not any(k.startswith("transformer.") for k in state)


def test_metrics_checkpoints_and_validation_images(trained: Trained) -> None:
    out = trained.output_dir
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "checkpoint_complete.json").is_file()
        assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    images = sorted((out / "validation_images").glob("*.png"))
    steps = {int(p.name.split("-")[1]) for p in images}
    assert steps == {1, 2}, [p.name for p in images]
    from PIL import Image

    with Image.open(images[-1]) as image:
        assert image.size == (32, 32)
    assert sorted(trained.result.validation_images) == images


# -------------------------------------------------------------------------------------------------
# b. the hooks fired, in the numbers the lifecycle promises
# -------------------------------------------------------------------------------------------------


def test_lifecycle_hooks_fire(trained: Trained) -> None:
    calls = trained.recorder.calls
    assert calls["check_config"] == [("toy", "ToyFamily")]
    assert calls["on_train_start"] == [0]
    assert [m["step"] for m in calls["on_step_end"]] == [1, 2]
    for metrics in calls["on_step_end"]:
        for key in ("loss", "lr", "grad_norm", "step_seconds", "samples_per_second"):
            assert key in metrics and math.isfinite(metrics[key]), (key, metrics)
        assert metrics["grad_norm"] > 0
    saved = calls["on_checkpoint_saved"]
    assert [(step, path.name, complete) for step, path, complete in saved] == [
        (1, "checkpoint-1", True),
        (2, "checkpoint-2", True),
    ]
    validated = calls["on_validation_done"]
    assert [step for step, _, _ in validated] == [1, 2]
    assert all(images and exists for _, images, exists in validated)
    assert calls["on_train_end"] == [(2, trained.output_dir)]


def test_compute_loss_wrapper_sees_every_micro_step(trained: Trained) -> None:
    calls = trained.recorder.calls["compute_loss"]
    assert len(calls) == 2  # 2 steps, batch 2, no accumulation
    assert all(c["prediction"] == c["target"] == (2, 4, 16, 16) and c["family"] == "toy" for c in calls)
    # What the wrapper returned is what the core logged.
    logged = [m["loss"] for m in trained.recorder.calls["on_step_end"]]
    assert logged == pytest.approx([c["loss"] for c in calls])


def test_encode_text_wrapper_sees_toy_embeddings(trained: Trained) -> None:
    encoded = trained.recorder.calls["encode_text"]
    prompts = [p for batch, _ in encoded for p in batch]
    # The dropped caption's embedding comes from family.unconditional_embeds, not from this hook.
    assert VALIDATION_PROMPT in prompts and "" not in prompts
    for _, result in encoded:
        for item in result:
            assert set(item) == {"tokens", "pooled"}
            assert item["tokens"].shape == (16, 32) and item["pooled"].shape == (32,)


def test_a_plugin_can_replace_the_load_phase(trained: Trained) -> None:
    assert trained.replacer.calls == [True]  # nothing was cached: text encoders needed
    assert trained.family_loads == [True]  # the default load_model did not run as well
    assert trained.recorder.calls["quantize"] == ["replacer"]  # the replacement's components were used


# -------------------------------------------------------------------------------------------------
# c. the same file as `st-train --plugin path/to/toy_family.py`
# -------------------------------------------------------------------------------------------------


def test_cli_trains_with_the_plugin_file(tmp_path: Path, toy_model: Path) -> None:
    run_dir = toy_run(tmp_path, toy_model, max_train_steps=1, checkpoint_step_interval=0, validation_step_interval=0)
    proc = run_cli(["--plugin", str(TOY_PATH)], cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "output"
    tensors, _ = read_adapter(out / "pytorch_lora_weights.safetensors")
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    plugins = json.loads((out / "plugins.json").read_text())
    assert [p["name"] for p in plugins] == ["toy_family"]
    assert plugins[0]["provides"] == {"families": ["toy"]}


def test_cli_names_a_misspelt_option(tmp_path: Path, toy_model: Path) -> None:
    run_dir = toy_run(tmp_path, toy_model)
    proc = run_cli(["--plugin", str(TOY_PATH), "--max_train_steps=2", "--lr_schedular=constant"], cwd=run_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lr_scheduler" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "output").exists()
