"""Fixtures and helpers for the rollout plugin's tests: the toy family (tests/toy_family.py, a third-party
style DiT), run folders for it and for the families' tiny pipelines, in-process training, and an
observer that checks every rolled-out batch against a one-sample-at-a-time reference."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import stune
from stune.features import TrainingFeature
from stune.testing import make_images, step_inputs, write_run
from stune_rollout.options import TRAIN_TIMESTEPS

REPO = Path(__file__).resolve().parents[3]
LORA_FILE = "pytorch_lora_weights.safetensors"


def load_toy() -> ModuleType:
    """tests/toy_family.py, imported once under the name the repository's own tests use."""
    name = "stune_test_toy_family"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "toy_family.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return load_toy().build_toy_model(tmp_path_factory.mktemp("toy-model") / "model")


def _datasets(folder: Path) -> list[dict[str, Any]]:
    return [
        {"id": "pics", "instance_data_dir": str(folder / "data"), "cache_dir_vae": str(folder / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(folder / "cache" / "text")},
    ]


def toy_run(folder: Path, model: Path, **options: Any) -> Path:
    """Four 32×32 images, batch 4, two steps on the toy DiT; nothing but the adapter is written."""
    make_images(folder / "data", 4, size=(32, 32))
    config = {
        "model_family": "toy",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "output"),
        "max_train_steps": 2,
        "train_batch_size": 4,
        "learning_rate": 1e-3,
        "mixed_precision": "no",
        "resolution": 32,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "disable_benchmark": True,
        **options,
    }
    write_run(folder, config, _datasets(folder))
    return folder


def family_run(folder: Path, family: str, model: Path, **options: Any) -> Path:
    """A run folder for a real family's tiny pipeline: four 64×64 images, batch 4, two steps."""
    make_images(folder / "data", 4, size=(64, 64))
    config = {
        "model_family": family,
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "output"),
        "max_train_steps": 2,
        "train_batch_size": 4,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "disable_benchmark": True,
        **options,
    }
    write_run(folder, config, _datasets(folder))
    return folder


def train_here(run_dir: Path, plugins: list[Any], monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Any:
    """Train in this process with exactly ``plugins`` (no entry points), from ``run_dir``."""
    from stune.plugins import PluginHost
    from stune.session import prepare
    from stune.train import train

    monkeypatch.chdir(run_dir)
    host = PluginHost.build(plugins=plugins, entry_points=False)
    return train(prepare(host=host, overrides={k: str(v) for k, v in overrides.items()}))


def metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "output" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- watching a run from outside -------------------------------------------------------------------------


def _batch(hidden: Any) -> int:
    return int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else len(hidden)


@dataclass
class Forward:
    grad: bool  # gradient enabled
    training: bool  # the transformer in train mode
    batch: int
    adapter_grads: bool  # some adapter parameter already holds a gradient


class Observer:
    """Watches a run from outside through public seams only: every transformer forward (a forward
    pre-hook), and the inputs the training forward is about to get (a feature that runs after the
    rollout feature), which it checks against a one-sample-at-a-time reference rollout through the
    family's ``predict``, from the same x₀, ε, σ and plan, with the same weights."""

    __name__ = "rollout-observer"

    def __init__(self) -> None:
        self.steps: list[list[Forward]] = []  # the forwards of each optimizer step
        self.checks: list[dict[str, Any]] = []  # one per micro-step
        self.forwards: list[Forward] = []
        self.recording = True
        observer = self

        class RolloutCheck(TrainingFeature):
            name = "rollout-check"

            @classmethod
            def enabled(cls, config: Any) -> bool:
                return True

            def prepare_inputs(self, inputs: Any, predictor: Any, state: Any) -> Any:
                observer.recording = False
                try:
                    observer.checks.append(observer.check(inputs, self.family, predictor.unwrapped))
                finally:
                    observer.recording = True
                return inputs

        self.check_feature = RolloutCheck

    @stune.hookimpl
    def register_features(self, register: Any) -> None:
        register(self.check_feature)

    @stune.hookimpl
    def route_tokens(self, transformer: torch.nn.Module, features: dict[str, Any]) -> None:
        assert list(features).index("rollout") < list(features).index("rollout-check")
        self.feature = features["rollout"]
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        transformer.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self.recording:
            self.forwards.append(
                Forward(
                    grad=torch.is_grad_enabled(),
                    training=module.training,
                    batch=_batch(kwargs.get("hidden_states", args[0] if args else None)),
                    adapter_grads=any(p.grad is not None for p in self.params),
                )
            )

    @stune.hookimpl
    def on_step_end(self) -> None:
        self.steps.append(self.forwards)
        self.forwards = []

    @torch.no_grad()
    def check(self, inputs: Any, family: Any, transformer: torch.nn.Module) -> dict[str, Any]:
        offsets = self.feature.last_offsets.tolist()
        s = inputs.sigmas.view(-1, 1, 1, 1)
        interpolated = (1 - s) * inputs.latents + s * inputs.noise
        reference = interpolated.clone()
        transformer.eval()
        try:
            for i, steps in enumerate(offsets):
                sigmas = [min(float(inputs.sigmas[i]) + (steps - j) / TRAIN_TIMESTEPS, 1.0) for j in range(steps + 1)]
                x = (1 - sigmas[0]) * inputs.latents[i : i + 1] + sigmas[0] * inputs.noise[i : i + 1]
                embeds = {key: value[i : i + 1] for key, value in inputs.embeds.items()}
                for j in range(steps):
                    one = step_inputs(x, torch.tensor([sigmas[j]]), embeds)
                    x = x + (sigmas[j + 1] - sigmas[j]) * family.predict(transformer, one).velocity
                reference[i] = x[0]
        finally:
            transformer.train()
        trained_on = inputs.noisy_latents.float()
        return {
            "offsets": offsets,
            "from_reference": (trained_on - reference).flatten(1).abs().amax(1).tolist(),
            "from_interpolated": (trained_on - interpolated).flatten(1).abs().amax(1).tolist(),
            "requires_grad": inputs.noisy_latents.requires_grad,
        }
