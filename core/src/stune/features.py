"""Training features (token routing, scheduled sampling, …): registered classes that carry behaviour.

A plugin registers a :class:`TrainingFeature` subclass with ``register_features``. For a run the
core creates one instance of every feature its options enable, then:

1. at check time, refuses the run when the family lacks what the feature ``requires`` (a
   capability the family declares, e.g. ``token_layout``) and calls :meth:`~TrainingFeature.check`;
2. after the adapter is added, gives it a :class:`FeatureContext` (its own seeded generator, one
   stream per process, saved in every checkpoint) through :meth:`~TrainingFeature.bind`; a token
   router installs its module wrappers in the ``route_tokens`` hook, which receives the enabled
   features;
3. every training micro-step, :meth:`~TrainingFeature.prepare_inputs` may replace the inputs
   (it gets a :class:`stune.step.Predictor` that runs the model without gradient), and
   :meth:`~TrainingFeature.after_forward` may add loss terms to the prediction;
4. after every optimizer step, :meth:`~TrainingFeature.step_metrics` is logged;
5. :meth:`~TrainingFeature.state_dict` / :meth:`~TrainingFeature.load_state_dict` go into checkpoints.

Features act only in training forwards with gradient: validation, the eval loss, regularisation
targets and no-grad rollouts never reach them (code inside the model checks
:func:`stune.step.in_training_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, cast

from typing_extensions import TypeVar

from stune.options import Options

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions
    from stune.family import ModelFamily
    from stune.state import TrainState
    from stune.step import Prediction, Predictor, StepInputs

OptionsT = TypeVar("OptionsT", bound=Options, default=Options)


@dataclass
class FeatureContext:
    """What a feature gets once the model is ready."""

    device: torch.device
    seed: int
    rank: int
    generator: torch.Generator


class TrainingFeature(Generic[OptionsT]):
    """Base class of a training feature. ``TrainingFeature[MyOptions]`` types ``self.options``.

    ``requires`` names capabilities the model family must declare (an attribute or a method of
    the family that gives something non-empty, e.g. ``token_layout``); the run is refused before
    anything loads otherwise.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CoreOptions, family: ModelFamily) -> None:
        self.config = config
        #: the run's configuration, typed as this feature's options (it holds every plugin's keys)
        self.options = cast(OptionsT, config)
        self.family = family
        self.context: FeatureContext | None = None

    @classmethod
    def enabled(cls, config: CoreOptions) -> bool:
        """Whether the configuration turns this feature on."""
        return False

    @classmethod
    def missing_requirements(cls, family: ModelFamily) -> list[str]:
        """The capabilities in ``requires`` the family does not declare."""
        missing = []
        for capability in cls.requires:
            value = getattr(family, capability, None)
            if callable(value):
                value = value()
            if not value:
                missing.append(capability)
        return missing

    def check(self) -> None:
        """Refuse option combinations this feature cannot train with: raise :class:`stune.ConfigError`
        with one sentence naming the options and the fix."""

    # -- a run ------------------------------------------------------------------------------------
    def bind(self, context: FeatureContext) -> None:
        """Called once, after the adapter is added and before the model's first forward."""
        self.context = context

    @property
    def generator(self) -> torch.Generator:
        """The feature's own seeded generator (per process; restored on resume)."""
        if self.context is None:
            raise RuntimeError(f"the {self.name} feature is not bound to a run yet")
        return self.context.generator

    def prepare_inputs(self, inputs: StepInputs, predictor: Predictor, state: TrainState) -> StepInputs:
        """The training step's seam between "inputs built" and "forward": return the inputs to train on."""
        return inputs

    def after_forward(self, inputs: StepInputs, prediction: Prediction, state: TrainState) -> Prediction:
        """Look at the training forward's prediction; return it, possibly with extra loss terms."""
        return prediction

    def step_metrics(self) -> dict[str, float]:
        """Numbers for this optimizer step's metrics.jsonl line (then reset)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (tensors, numbers, strings, lists and dicts of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
