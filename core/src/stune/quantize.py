"""Quantization backends registered by plugins (``register_quantizers``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions


class Quantizer:
    """Base class of a quantization backend.

    ``precisions`` are the names users write in ``base_model_precision`` /
    ``text_encoder_N_precision`` (e.g. ``int8-quanto``). :meth:`quantize` converts a module in
    place, leaving modules whose names match ``exclude`` patterns untouched.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ()
    #: Python packages the backend imports; ``validate_environment`` checks them.
    required_packages: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_environment(cls, precision: str) -> None:
        """Raise :class:`stune.UserError` if the backend cannot run here (missing package, no CUDA)."""

    @classmethod
    def quantize(
        cls, module: torch.nn.Module, precision: str, exclude: tuple[str, ...], config: CoreOptions
    ) -> torch.nn.Module:
        """Quantize ``module`` to ``precision``; return it (or its replacement)."""
        raise NotImplementedError
