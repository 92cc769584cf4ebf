"""What a model family plugin provides: :class:`ModelFamily` and the :class:`Components` it loads.

A family is declared mostly as data that the core and other plugins read (flavours, alignment,
LoRA target presets, text-encoder slots, quantization exclusions, the token layout) plus a handful
of methods the training run calls at fixed points: load, encode prompts, encode images, predict,
save the adapter, render validation images. The core never names a family; everything
family-specific lives in the plugin's single file.

This module does not import torch; the families import it inside their methods.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, cast

from typing_extensions import TypeVar

from stune.errors import ConfigError
from stune.options import Options

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from stune.config import CoreOptions
    from stune.layout import ForwardTokens, TokenLayout
    from stune.step import Prediction, StepInputs

OptionsT = TypeVar("OptionsT", bound=Options, default=Options)


@dataclass
class Components:
    """The loaded parts of a pipeline. Text encoders and the VAE may be dropped after caching.

    ``text_encoders`` and ``tokenizers`` are keyed by the slot keys (``text_encoder``,
    ``text_encoder_2``, …) the family declares in ``text_encoder_slots``.
    """

    transformer: Any
    vae: Any = None
    text_encoders: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its key (also its diffusers subfolder), what it is, and which
    of its modules a quantizer must leave in high precision. Its precision option is
    ``text_encoder_<N>_precision``, N being the slot's number (1 for ``text_encoder``)."""

    key: str
    label: str
    quantization_exclusions: tuple[str, ...] = ()

    @property
    def number(self) -> int:
        match = re.fullmatch(r"text_encoder(?:_(\d+))?", self.key)
        if match is None:
            raise ValueError(f"text-encoder slot keys are text_encoder, text_encoder_2, …; got {self.key!r}")
        return int(match.group(1) or 1)

    @property
    def precision_option(self) -> str:
        return f"text_encoder_{self.number}_precision"


@dataclass
class CaptionsCut:
    """Captions one text encoder cut at its token limit (see ModelFamily.note_truncation)."""

    max_length: int
    main: bool
    example: str
    count: int = 0


@dataclass
class LoadRequest:
    """What :meth:`ModelFamily.load` is asked to load, and how.

    ``quantization``: component (``transformer`` or a slot key) → a load-time quantization config
    from a quantizer (pass it as ``quantization_config`` to ``from_pretrained``); ``dtypes``:
    component → dtype overriding ``weight_dtype`` for it.
    """

    device: torch.device
    weight_dtype: torch.dtype
    text_encoders: bool = True
    quantization: dict[str, Any] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    def dtype(self, component: str) -> torch.dtype:
        return self.dtypes.get(component, self.weight_dtype)

    def pretrained_kwargs(self, component: str, dtype_key: str = "torch_dtype") -> dict[str, Any]:
        """The dtype (and ``quantization_config`` when there is one) for ``from_pretrained``;
        transformers models name the dtype ``dtype``, diffusers models ``torch_dtype``."""
        kwargs: dict[str, Any] = {dtype_key: self.dtype(component)}
        if self.quantization.get(component) is not None:
            kwargs["quantization_config"] = self.quantization[component]
        return kwargs


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
    #: edit models: the image the prompt is applied to
    image: Path | None = None


class ModelFamily(Generic[OptionsT]):
    """Base class of a model family. Subclass it in a plugin (``ModelFamily[MyOptions]`` types
    ``self.options``) and register it with ``register_families``.

    Class attributes (data other code reads):

    * ``name``: the ``model_family`` value selecting it.
    * ``flavours`` / ``default_flavour``: ``model_flavour`` → Hub repository.
    * ``alignment``: image sides are multiples of this (aspect buckets round to it).
    * ``maximum_canvas_pixels``: the largest width × height the model takes (buckets stay within it).
    * ``vae_scale_factor`` and ``latent_channels``: latent geometry.
    * ``text_encoder_slots``: the text encoders, in order (keys, precision options, exclusions).
    * ``lora_presets``: preset name → PEFT target module names; ``lora_preset_option`` names the
      config key choosing one (e.g. ``flux_lora_target``); ``default_lora_preset`` otherwise.
    * ``quantization_exclusions``: transformer module-name patterns a quantizer must leave in
      high precision.
    * ``config_defaults``: values for core options the user did not set (e.g. validation guidance).
    * ``lycoris_module_aliases``: class names LyCORIS configs use → the classes of this transformer.

    Methods that declare more (and may depend on the options): :meth:`token_layout` (for token
    routers), :meth:`text_cache_identity` / :meth:`latent_cache_identity`,
    :meth:`unconditional_embeds` (dropped captions).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    flavours: ClassVar[dict[str, str]] = {}
    default_flavour: ClassVar[str | None] = None
    alignment: ClassVar[int] = 64
    maximum_canvas_pixels: ClassVar[int | None] = None
    vae_scale_factor: ClassVar[int] = 8
    latent_channels: ClassVar[int] = 16
    text_encoder_slots: ClassVar[tuple[TextEncoderSlot, ...]] = ()
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {}
    lora_preset_option: ClassVar[str | None] = None
    default_lora_preset: ClassVar[str | None] = None
    quantization_exclusions: ClassVar[tuple[str, ...]] = ()
    config_defaults: ClassVar[dict[str, Any]] = {}
    #: module class names used in LyCORIS configs (SimpleTuner's ``Attention``) → this family's classes
    lycoris_module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: the diffusers pipeline class (by name) whose LoRA loader writes and reads this family's LoRA files
    lora_pipeline: ClassVar[str | None] = None

    def __init__(self, config: CoreOptions) -> None:
        self.config = config
        #: the run's configuration, typed as this family's options (it holds every plugin's keys)
        self.options = cast(OptionsT, config)
        #: text encoder label → captions longer than it reads, and one of them (see note_truncation)
        self.truncated: dict[str, CaptionsCut] = {}

    # -- captions longer than an encoder reads -------------------------------------------------------
    def note_truncation(self, tokenizer: Any, prompts: list[str], max_length: int, label: str, *, main: bool) -> None:
        """Count the ``prompts`` that ``tokenizer`` cuts at ``max_length`` tokens for the encoder ``label``.

        Families call it beside each truncating tokenizer call; the core reports the counts after the
        text cache is filled (a warning for ``main`` encoders, whose sequence the transformer reads,
        a note for the others, e.g. CLIP's 77 tokens when a T5 carries the whole caption)."""
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
        cut = [prompt for prompt, length in zip(prompts, lengths) if length > max_length]
        if not cut:
            return
        entry = self.truncated.setdefault(label, CaptionsCut(max_length, main, cut[0]))
        entry.count += len(cut)

    def slot_label(self, key: str) -> str:
        """The label of the text-encoder slot ``key`` (``text_encoder_2`` → ``T5-XXL``)."""
        return next((slot.label for slot in self.text_encoder_slots if slot.key == key), key)

    def report_truncation(self) -> None:
        """Log (then forget) how many captions each encoder cut since the last report."""
        import logging

        log = logging.getLogger("stune.text")
        for label, entry in self.truncated.items():
            example = entry.example if len(entry.example) <= 80 else entry.example[:77] + "..."
            log.log(
                logging.WARNING if entry.main else logging.INFO,
                "%d caption%s longer than %s's %d tokens: the rest is cut (e.g. %r)%s",
                entry.count,
                " is" if entry.count == 1 else "s are",
                label,
                entry.max_length,
                example,
                "; shorten them or raise tokenizer_max_length where the family allows" if entry.main else "",
            )
        self.truncated.clear()

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

    def transformer_config(self) -> dict[str, Any]:
        """The transformer's ``config.json`` (block counts, sizes), read without loading any weight."""
        from diffusers.configuration_utils import ConfigMixin

        class _TransformerConfig(ConfigMixin):
            config_name = "config.json"  # type: ignore[assignment]

        if self.config.pretrained_transformer_model_name_or_path:
            path = self.config.pretrained_transformer_model_name_or_path
            subfolder = self.config.pretrained_transformer_subfolder
        else:
            path, subfolder = self.model_path(), "transformer"
        loaded: Any = _TransformerConfig.load_config(path, subfolder=subfolder, revision=self.config.revision)
        return dict(loaded)

    def token_layout(self) -> TokenLayout | None:
        """How the transformer's blocks take their tokens (see :mod:`stune.layout`); None when the
        family does not support token routing."""
        return None

    # -- cache identities ------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        """Everything that changes cached caption embeddings: the model, the token length, each text
        encoder's precision. The text cache hashes it with every caption; change it and captions
        are encoded again (latents are not)."""
        return {
            "family": self.name,
            "model": self.model_path(),
            "revision": self.config.revision,
            "tokenizer_max_length": self.config.tokenizer_max_length,
            **{slot.key: getattr(self.config, slot.precision_option, None) for slot in self.text_encoder_slots},
        }

    def latent_cache_identity(self) -> dict[str, Any]:
        """Everything that changes cached latents: the model and the VAE (captions are not re-encoded
        when it changes)."""
        return {
            "family": self.name,
            "model": self.model_path(),
            "revision": self.config.revision,
            "vae": self.config.pretrained_vae_model_name_or_path,
            "vae_scale": self.vae_scale_factor,
        }

    # -- loading and encoding --------------------------------------------------------------------
    def load(self, request: LoadRequest) -> Components:
        """Load tokenizers, VAE, transformer, scheduler and (if ``request.text_encoders``) text
        encoders, frozen; honour ``request.pretrained_kwargs(component)`` for each component.

        Text encoders and VAE go to ``request.device``; the transformer stays on the CPU until the
        core has dropped the text encoders, so both never occupy accelerator memory at once.
        """
        raise NotImplementedError

    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Encode captions; one dict of tensors (no batch dimension, on the CPU) per caption."""
        raise NotImplementedError

    def takes_reference_images(self) -> bool:
        """Whether :meth:`predict` trains on reference images (``inputs.conditioning["reference_latents"]``,
        from datasets paired with a reference conditioning dataset): edit models such as FLUX Kontext."""
        return False

    def collate_embeds(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch cached caption entries (as :meth:`encode_prompts` made them). Default: stack each
        key. A family that caches variable-length entries pads them here (and adds the masks)."""
        import torch

        return {key: torch.stack([entry[key] for entry in entries]) for key in entries[0]}

    def unconditional_embeds(self, components: Components) -> dict[str, torch.Tensor]:
        """What a dropped caption trains on (caption dropout). Default: the encoding of ``""``."""
        return self.encode_prompts(components, [""])[0]

    def unconditional_identity(self) -> dict[str, Any]:
        """The options that change :meth:`unconditional_embeds` (hashed into its cache entry)."""
        return {}

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

    def predict(self, transformer: torch.nn.Module, inputs: StepInputs) -> Prediction:
        """Run the transformer on ``inputs.noisy_latents`` (B, C, h, w) at ``inputs.sigmas`` (B,) with
        the batched caption tensors in ``inputs.embeds``; return the velocity prediction in the
        latents' layout (``noise − latents`` is the target), with any auxiliary loss terms."""
        raise NotImplementedError

    def forward_tokens(self, inputs: StepInputs) -> ForwardTokens | None:
        """Token counts of the forward pass :meth:`predict` will run on ``inputs`` (families with a
        :meth:`token_layout` give them; routers read them through :func:`stune.step.current_forward`)."""
        return None

    # -- outputs ------------------------------------------------------------------------------------
    def save_lora(self, output_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Write a PEFT LoRA state dict (transformer keys without prefix) in diffusers format.

        ``metadata`` is the adapter's ``LoraConfig`` as a JSON-ready dict (rank, alpha, targets).
        Default: the ``save_lora_weights`` of the diffusers pipeline named by ``lora_pipeline``, so
        the file loads with that pipeline's ``load_lora_weights``.
        """
        pipeline = self._lora_pipeline()
        pipeline.save_lora_weights(
            output_dir, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata
        )
        return Path(output_dir) / "pytorch_lora_weights.safetensors"

    def load_lora(self, path: Path) -> dict[str, torch.Tensor]:
        """Read back what :meth:`save_lora` wrote, as a PEFT state dict of the transformer
        (default: ``lora_pipeline``'s ``lora_state_dict``, ``transformer.`` keys)."""
        state_dict = self._lora_pipeline().lora_state_dict(str(path))
        prefix = "transformer."
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def _lora_pipeline(self) -> Any:
        if self.lora_pipeline is None:
            raise NotImplementedError(f"The {self.name} family sets no lora_pipeline and saves no LoRA of its own.")
        import diffusers

        return getattr(diffusers, self.lora_pipeline)

    def comfyui_lora_key(self, module: str) -> str:
        """The key of a transformer module in a ``lora_format: comfyui`` file (followed by
        ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``). Default: ``transformer.<module>``,
        the diffusers module name ComfyUI's ``model_lora_keys_unet`` maps for FLUX and SD3 (through
        ``flux_to_diffusers`` / ``mmdit_to_diffusers``) and for HiDream (whose names equal diffusers').
        A family whose ComfyUI loader reads other names overrides it."""
        return f"transformer.{module}"

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
