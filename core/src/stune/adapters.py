"""Adding and restoring PEFT LoRA adapters on a family's transformer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stune.errors import ConfigError
from stune.family import match_modules

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily


def add_lora(transformer: torch.nn.Module, family: ModelFamily, config: CoreOptions) -> list[str]:
    """Freeze the transformer, add a LoRA on the family's targets, keep adapter weights in fp32.

    Returns the adapted module names. A target list that matches nothing is a user error (a
    preset for a larger model, a typo in peft_lora_target_modules).
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    targets = family.lora_target_modules()
    names = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    matched = match_modules(names, targets)
    if not matched:
        raise ConfigError(
            f"The LoRA targets {targets} match no linear layer of this {family.name} transformer; "
            "choose another target preset or fix peft_lora_target_modules."
        )
    transformer.requires_grad_(False)
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        init_lora_weights=True,
        target_modules=targets,
    )
    transformer.add_adapter(lora_config)  # type: ignore[operator]
    # Frozen weights may be bf16; the adapter trains in fp32 so small updates are not rounded away.
    cast_training_params(transformer, dtype=torch.float32)
    return matched


def load_lora_into(transformer: torch.nn.Module, family: ModelFamily, path: Path) -> None:
    """Restore adapter weights written by ``save_adapter`` (for resume)."""
    from peft import set_peft_model_state_dict

    state_dict = family.load_lora(path)
    result = set_peft_model_state_dict(transformer, state_dict)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(
            f"The checkpoint adapter {path} does not fit this model ({len(unexpected)} unexpected keys, "
            f"e.g. {unexpected[0]}); resume with the same LoRA options or start fresh (resume_from_checkpoint=none)."
        )


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: PEFT adapters off inside the block, on again after."""
    model.disable_adapters()  # type: ignore[operator]
    try:
        yield
    finally:
        model.enable_adapters()  # type: ignore[operator]


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
