"""A typed facade over the lifecycle hooks (as tox 4 wraps pluggy): one method per hook.

The core calls hooks only through :class:`Hooks` (``host.hooks``): the arguments are checked by
the type checker, every call passes keywords, and a *firstresult* hook that nobody answered is
an error naming the hook instead of a ``None`` travelling on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy
    import torch

    from stune.adapters import Adapter
    from stune.config import CoreOptions
    from stune.family import Components, LoadRequest, ModelFamily
    from stune.features import TrainingFeature
    from stune.layout import TokenLayout
    from stune.quantize import QuantizeTarget
    from stune.state import TrainState
    from stune.step import Prediction, StepInputs


class Hooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def _first(self, name: str, result: Any) -> Any:
        if result is None:
            raise RuntimeError(f"no plugin answered the `{name}` hook (the core's default was removed?)")
        return result

    # -- lifecycle ----------------------------------------------------------------------------------
    def check_config(self, config: CoreOptions, family: ModelFamily) -> None:
        self._hook.check_config(config=config, family=family)

    def load_model(self, family: ModelFamily, config: CoreOptions, request: LoadRequest) -> Components:
        components: Components = self._first(
            "load_model", self._hook.load_model(family=family, config=config, request=request)
        )
        return components

    def quantize(
        self, components: Components, family: ModelFamily, config: CoreOptions, targets: list[QuantizeTarget]
    ) -> None:
        self._hook.quantize(components=components, family=family, config=config, targets=targets)

    def encode_text(
        self, family: ModelFamily, components: Components, prompts: list[str], config: CoreOptions
    ) -> list[dict[str, torch.Tensor]]:
        encoded: list[dict[str, torch.Tensor]] = self._first(
            "encode_text", self._hook.encode_text(family=family, components=components, prompts=prompts, config=config)
        )
        return encoded

    def compute_loss(
        self, prediction: Prediction, inputs: StepInputs, family: ModelFamily, config: CoreOptions, state: TrainState
    ) -> torch.Tensor:
        loss: torch.Tensor = self._first(
            "compute_loss",
            self._hook.compute_loss(prediction=prediction, inputs=inputs, family=family, config=config, state=state),
        )
        return loss

    def route_tokens(
        self,
        family: ModelFamily,
        transformer: torch.nn.Module,
        layout: TokenLayout | None,
        features: dict[str, TrainingFeature],
        config: CoreOptions,
    ) -> None:
        self._hook.route_tokens(family=family, transformer=transformer, layout=layout, features=features, config=config)

    def save_adapter(
        self, family: ModelFamily, transformer: torch.nn.Module, adapter: Adapter, output_dir: Path, config: CoreOptions
    ) -> list[Path]:
        files: list[Path] = self._first(
            "save_adapter",
            self._hook.save_adapter(
                family=family, transformer=transformer, adapter=adapter, output_dir=output_dir, config=config
            ),
        )
        return files

    # -- observers ----------------------------------------------------------------------------------
    def on_train_start(self, state: TrainState, config: CoreOptions) -> None:
        self._hook.on_train_start(state=state, config=config)

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._hook.on_step_end(state=state, metrics=metrics)

    def on_checkpoint_saved(self, state: TrainState, path: Path) -> None:
        self._hook.on_checkpoint_saved(state=state, path=path)

    def on_validation_done(self, state: TrainState, images: list[Path]) -> None:
        self._hook.on_validation_done(state=state, images=images)

    def on_train_end(self, state: TrainState, output_dir: Path) -> None:
        self._hook.on_train_end(state=state, output_dir=output_dir)
