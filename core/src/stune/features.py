"""Training features (token routing, scheduled sampling, …) registered by plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily


class TrainingFeature:
    """Base class of a training feature. Register subclasses with ``register_features``.

    ``requires`` names class attributes the model family must make non-empty (e.g.
    ``("routable_blocks",)``); the core refuses the run before loading anything otherwise.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def enabled(cls, config: CoreOptions) -> bool:
        """Whether the configuration turns this feature on."""
        return False

    @classmethod
    def missing_requirements(cls, family: type[ModelFamily]) -> list[str]:
        return [attr for attr in cls.requires if not getattr(family, attr, None)]
