"""Quantization backends registered by plugins (``register_quantizers``), and where they act.

A precision (``int8-quanto``, ``nf4-bnb``, …) names a :class:`Quantizer`. For every component
whose precision option is set — the transformer (``base_model_precision``) and each text-encoder
slot the family declares (``text_encoder_<N>_precision``) — the core makes a
:class:`QuantizeTarget` and asks the quantizer, in this order:

1. :meth:`Quantizer.load_dtype` / :meth:`Quantizer.load_config`: something to hand
   ``from_pretrained`` (a dtype, or a diffusers/transformers quantization config: bitsandbytes
   NF4, torchao), so the component is quantized while it loads;
2. otherwise :meth:`Quantizer.quantize` after loading, which should go block by block
   (:func:`blocks_of`) so host memory never holds a second full copy of the model.

Nothing here imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from stune.config import CoreOptions
    from stune.family import ModelFamily

#: precisions that mean "leave the weights as loaded"; they need no quantizer
NO_CHANGE = (None, "no_change")
TRANSFORMER = "transformer"


@dataclass(frozen=True)
class QuantizeTarget:
    """One component to quantize: ``transformer`` or a text-encoder slot key."""

    component: str
    option: str  # the option that asked for it, for messages
    precision: str
    exclude: tuple[str, ...]  # module-name patterns (fnmatch) to leave in high precision
    device: torch.device | None  # the run's accelerator device (None while options are checked)


class Quantizer:
    """Base class of a quantization backend; one instance per run.

    ``precisions``: the names users write in ``base_model_precision`` /
    ``text_encoder_<N>_precision``. Override :meth:`load_config` (load-time) or :meth:`quantize`
    (post-load), or both (the core prefers load time when it returns something).
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CoreOptions) -> None:
        self.config = config

    def check(self, target: QuantizeTarget, family: ModelFamily) -> None:
        """Refuse, with one :class:`stune.UserError` sentence, what cannot run here (a missing package,
        no CUDA, a precision this family cannot train with). Called before anything loads."""

    def is_quantized(self, precision: str) -> bool:
        """False for precisions that only change the dtype (full fine-tuning stays possible)."""
        return True

    def load_dtype(self, target: QuantizeTarget) -> torch.dtype | None:
        """A dtype to load the component in, or None."""
        return None

    def load_config(self, target: QuantizeTarget) -> Any | None:
        """A quantization config for ``from_pretrained(quantization_config=...)``, or None to
        quantize after loading."""
        return None

    def quantize(self, module: torch.nn.Module, target: QuantizeTarget) -> torch.nn.Module:
        """Quantize a loaded module (in place or by returning a replacement)."""
        raise NotImplementedError(f"{self.name} quantizes {target.precision} only while loading")


def plan_targets(config: CoreOptions, family: ModelFamily, device: torch.device | None) -> list[QuantizeTarget]:
    """Every component a precision option asks to change, transformer first."""
    targets = []
    precision = getattr(config, "base_model_precision", None)
    if precision not in NO_CHANGE:
        targets.append(
            QuantizeTarget(TRANSFORMER, "base_model_precision", precision, family.quantization_exclusions, device)
        )
    for slot in family.text_encoder_slots:
        precision = getattr(config, slot.precision_option, None)
        if precision not in NO_CHANGE:
            targets.append(
                QuantizeTarget(slot.key, slot.precision_option, precision, slot.quantization_exclusions, device)
            )
    return targets


def blocks_of(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(qualified name, module) pieces of ``module`` small enough to quantize one at a time: every
    member of every ``nn.ModuleList``/``nn.Sequential`` along the way, and leaf-level modules
    outside them. Together they cover every parameter once."""
    import torch

    def walk(prefix: str, current: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, child in current.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
                for index, member in child.named_children():
                    yield f"{path}.{index}", member
            elif any(True for _ in child.children()):
                yield from walk(f"{path}.", child)
            else:
                yield path, child

    yield from walk("", module)
