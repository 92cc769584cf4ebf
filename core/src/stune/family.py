"""What a model family plugin provides: :class:`ModelFamily` and the :class:`Components` it loads.

A family is declared mostly as data (class attributes the core and other plugins read: flavours,
alignment, LoRA target presets, routable blocks, quantization exclusions) plus a handful of
methods the training run calls at fixed points: load, encode prompts, encode images, predict,
save the adapter, render validation images. The core never names a family; everything
family-specific lives in the plugin's single file.

This module does not import torch; the families import it inside their methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stune.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from stune.config import CoreOptions


@dataclass
class Components:
    """The loaded parts of a pipeline. Text encoders and the VAE may be dropped after caching."""

    transformer: Any
    vae: Any = None
    text_encoders: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationRequest:
    """One validation image to render, with its prompt already encoded."""

    name: str
    prompt: str
    embeds: dict[str, torch.Tensor]
    negative_embeds: dict[str, torch.Tensor] | None
    width: int
    height: int
    seed: int
    #: with validation_preview: called with (sampling step, image) every ``preview_every`` steps
    preview: Callable[[int, Image.Image], None] | None = None
    preview_every: int = 0


class ModelFamily:
    """Base class of a model family. Subclass it in a plugin and register it with
    ``register_families``.

    Class attributes (data other code reads):

    * ``name``: the ``model_family`` value selecting it.
    * ``flavours`` / ``default_flavour``: ``model_flavour`` → Hub repository.
    * ``alignment``: image sides are multiples of this (aspect buckets round to it).
    * ``vae_scale_factor`` and ``latent_channels``: latent geometry.
    * ``lora_presets``: preset name → PEFT target module names; ``lora_preset_option`` names the
      config key choosing one (e.g. ``flux_lora_target``); ``default_lora_preset`` otherwise.
    * ``routable_blocks``: attribute names of the transformer's block lists token routing may use.
    * ``quantization_exclusions``: module-name patterns a quantizer must leave in high precision.
    * ``config_defaults``: values for core options the user did not set (e.g. validation guidance).
    * ``lycoris_module_aliases``: class names LyCORIS configs use → the classes of this transformer.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    flavours: ClassVar[dict[str, str]] = {}
    default_flavour: ClassVar[str | None] = None
    alignment: ClassVar[int] = 64
    vae_scale_factor: ClassVar[int] = 8
    latent_channels: ClassVar[int] = 16
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {}
    lora_preset_option: ClassVar[str | None] = None
    default_lora_preset: ClassVar[str | None] = None
    routable_blocks: ClassVar[tuple[str, ...]] = ()
    quantization_exclusions: ClassVar[tuple[str, ...]] = ()
    config_defaults: ClassVar[dict[str, Any]] = {}
    #: module class names used in LyCORIS configs (SimpleTuner's ``Attention``) → this family's classes
    lycoris_module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, config: CoreOptions) -> None:
        self.config = config

    # -- configuration (no heavy imports) ---------------------------------------------------------
    def apply_defaults(self) -> None:
        """Fill the family's defaults into options the user left unset."""
        for key, value in self.config_defaults.items():
            if key not in self.config.model_fields_set:
                setattr(self.config, key, value)

    def check_config(self) -> None:
        """Raise :class:`stune.ConfigError` for option values this family cannot train with."""
        flavour = self.config.model_flavour
        if flavour is not None and self.flavours and flavour not in self.flavours:
            raise ConfigError(
                f"model_flavour `{flavour}` is not a {self.name} flavour; choose one of: {', '.join(self.flavours)}."
            )

    @property
    def flavour(self) -> str | None:
        return self.config.model_flavour or self.default_flavour

    def model_path(self) -> str:
        """Where the base pipeline comes from: ``pretrained_model_name_or_path`` or the flavour's repo."""
        if self.config.pretrained_model_name_or_path:
            return self.config.pretrained_model_name_or_path
        if self.flavour and self.flavour in self.flavours:
            return self.flavours[self.flavour]
        raise ConfigError(f"Set pretrained_model_name_or_path (a local folder or Hub id) for {self.name}.")

    def lora_target_modules(self) -> list[str]:
        """PEFT target module names: ``peft_lora_target_modules`` or the chosen preset."""
        if self.config.peft_lora_target_modules:
            return list(self.config.peft_lora_target_modules)
        preset = getattr(self.config, self.lora_preset_option, None) if self.lora_preset_option else None
        preset = preset or self.default_lora_preset
        if preset is None or preset not in self.lora_presets:
            raise ConfigError(f"{self.name} has no LoRA target preset `{preset}`; set peft_lora_target_modules.")
        return list(self.lora_presets[preset])

    def cache_identity(self) -> dict[str, Any]:
        """Everything that changes cached text embeddings or latents (model, lengths, padding).

        The caches hash this together with each caption or image; change it and they re-encode.
        """
        return {
            "family": self.name,
            "model": self.model_path(),
            "revision": self.config.revision,
            "vae": self.config.pretrained_vae_model_name_or_path,
            "tokenizer_max_length": self.config.tokenizer_max_length,
        }

    # -- loading and encoding --------------------------------------------------------------------
    def load(self, device: torch.device, weight_dtype: torch.dtype, text_encoders: bool = True) -> Components:
        """Load tokenizers, VAE, transformer, scheduler and (if asked) text encoders, frozen.

        Text encoders and VAE go to ``device``; the transformer stays on the CPU until the core
        has dropped the text encoders, so both never occupy accelerator memory at once.
        """
        raise NotImplementedError

    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Encode captions; one dict of tensors (no batch dimension, on the CPU) per caption."""
        raise NotImplementedError

    def encode_images(self, components: Components, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """VAE-encode images in [-1, 1] (B, 3, H, W) to scaled latent ``mean`` and ``std`` (B, C, h, w)."""
        raise NotImplementedError

    def sequence_length(self, latent_height: int, latent_width: int) -> int:
        """Image tokens the transformer sees for one latent (for resolution-dependent shift)."""
        return (latent_height // 2) * (latent_width // 2)

    def shift_parameters(self, components: Components) -> tuple[int, int, float, float]:
        """(base_seq_len, max_seq_len, base_shift, max_shift) for ``flow_schedule_auto_shift``."""
        cfg = getattr(components.scheduler, "config", {}) or {}
        return (
            int(cfg.get("base_image_seq_len", 256)),
            int(cfg.get("max_image_seq_len", 4096)),
            float(cfg.get("base_shift", 0.5)),
            float(cfg.get("max_shift", 1.15)),
        )

    # -- training ---------------------------------------------------------------------------------
    def training_sigmas(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
        """σ for a batch when the family has its own schedule (e.g. FLUX schnell's), else None."""
        return None

    def predict(self, transformer: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Run the transformer on ``batch["noisy_latents"]`` (B, C, h, w) at ``batch["sigmas"]`` (B,)
        with the batched caption tensors in ``batch["embeds"]``; return the velocity prediction in
        the same layout as the latents (``noise - latents`` is the target)."""
        raise NotImplementedError

    # -- outputs ------------------------------------------------------------------------------------
    def save_lora(self, output_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Write a PEFT LoRA state dict (transformer keys without prefix) in diffusers format.

        ``metadata`` is the adapter's ``LoraConfig`` as a JSON-ready dict (rank, alpha, targets).
        """
        raise NotImplementedError

    def load_lora(self, path: Path) -> dict[str, torch.Tensor]:
        """Read back what :meth:`save_lora` wrote, as a PEFT state dict of the transformer."""
        raise NotImplementedError

    def render_validation(
        self, components: Components, transformer: torch.nn.Module, requests: list[ValidationRequest]
    ) -> list[Image.Image]:
        """Render one image per request with the adapter active (called under no_grad)."""
        raise NotImplementedError

    def loading_example(self, output_dir: Path) -> str:
        """A short Python snippet that loads the trained adapter for inference."""
        return ""

    @classmethod
    def build_demo(cls, workdir: Path) -> Path:
        """Create a tiny model, a small dataset and a config under ``workdir``; return the config path."""
        raise NotImplementedError(f"The {cls.name} family has no demo.")


def match_modules(names: list[str], targets: list[str]) -> list[str]:
    """Module names PEFT would adapt for a list of targets: equal to one, or ending with ``.target``."""
    return [name for name in names if any(name == t or name.endswith("." + t) for t in targets)]
