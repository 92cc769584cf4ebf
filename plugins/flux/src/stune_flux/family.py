"""The FLUX.1 family, top to bottom: what it is, loading, text, latents, forward, outputs.

FLUX.1 is a rectified-flow transformer (19 double-stream + 38 single-stream blocks) conditioned
on CLIP-L's pooled embedding and T5-XXL's token embeddings. Latents (16 channels, 1/8 of the
image side) are packed into 2×2 patches, so the transformer sees (h/2)·(w/2) image tokens with 3-D
position ids; dev-type models also take the guidance value as an input.

torch/diffusers/transformers are imported inside methods: registering the family stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stune.errors import ConfigError, UserError
from stune.family import Components, LoadRequest, ModelFamily, TextEncoderSlot, ValidationRequest
from stune.layout import Arg, BlockList, ForwardTokens, Segment, SideInput, TokenLayout
from stune.step import Prediction, StepInputs
from stune_flux.options import FluxOptions

if TYPE_CHECKING:
    import torch
    from PIL import Image

_ATTENTION = ("to_k", "to_q", "to_v", "to_qkv", "to_out.0")
_CONTEXT = ("add_k_proj", "add_q_proj", "add_v_proj", "add_qkv_proj", "to_add_out")
_FFS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
_ALL = (*_ATTENTION[:3], "to_qkv", "add_qkv_proj", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0", "to_add_out")


class FluxFamily(ModelFamily[FluxOptions]):
    name = "flux"
    description = "FLUX.1 (dev, krea, schnell, kontext, fluxbooru, libreflux): CLIP-L + T5-XXL, 2×2 packed latents."
    flavours: ClassVar[dict[str, str]] = {
        "dev": "black-forest-labs/FLUX.1-dev",
        "krea": "black-forest-labs/FLUX.1-Krea-dev",
        "schnell": "black-forest-labs/FLUX.1-schnell",
        "kontext": "black-forest-labs/FLUX.1-Kontext-dev",
        "fluxbooru": "terminusresearch/fluxbooru-v0.3",
        "libreflux": "jimmycarter/LibreFlux-SimpleTuner",
    }
    default_flavour = "krea"
    alignment = 64
    latent_channels = 16
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {
        "all": _ALL,
        "context": _CONTEXT,
        "context+ffs": (*_CONTEXT, "ff_context.net.0.proj", "ff_context.net.2"),
        "all+ffs": (*_ALL, *_FFS),
        "all+ffs+embedder": (*_ALL, *_FFS, "x_embedder"),
        "ai-toolkit": (*_ALL, *_FFS, "norm.linear", "norm1.linear", "norm1_context.linear"),
        "tiny": ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"),
        "nano": ("single_transformer_blocks.7.proj_out",),
    }
    lora_preset_option = "flux_lora_target"
    default_lora_preset = "all"
    lora_pipeline = "FluxPipeline"  # its save_lora_weights / lora_state_dict read and write our LoRA files
    text_encoder_slots = (TextEncoderSlot("text_encoder", "CLIP-L"), TextEncoderSlot("text_encoder_2", "T5-XXL"))
    lycoris_module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"Attention": ("FluxAttention",)}
    quantization_exclusions = (
        "*.norm",
        "*.norm1",
        "*.norm2",
        "*.norm2_context",
        "proj_out",
        "x_embedder",
        "norm_out",
        "context_embedder",
    )
    config_defaults: ClassVar[dict[str, Any]] = {
        "validation_guidance": 3.5,
        "validation_num_inference_steps": 20,
        "validation_resolution": "1024x1024",
        "validation_preview_autoencoder": "madebyollin/taef1",  # FLUX's tiny autoencoder (16 channels)
    }
    #: T5 token limit per flavour (schnell was distilled at 256).
    max_t5_tokens: ClassVar[dict[str, int]] = {"schnell": 256}

    # -- configuration --------------------------------------------------------------------------
    def apply_defaults(self) -> None:
        super().apply_defaults()
        cfg = self.config
        if cfg.tokenizer_max_length is None:
            cfg.tokenizer_max_length = self.max_t5_tokens.get(self.flavour or "", 512)
        if self.flavour == "libreflux" and "flux_attention_masked_training" not in cfg.model_fields_set:
            self.options.flux_attention_masked_training = True
        if self.flavour == "schnell" and "flux_fast_schedule" not in cfg.model_fields_set:
            self.options.flux_fast_schedule = True  # schnell was distilled on it
        if self.options.flux_lora_init is not None and "lora_init_type" not in cfg.model_fields_set:
            cfg.lora_init_type = self.options.flux_lora_init

    def check_config(self) -> None:
        super().check_config()
        opts = self.options
        if opts.flux_lora_init is not None and opts.flux_lora_init != self.config.lora_init_type:
            raise ConfigError(
                f"flux_lora_init `{opts.flux_lora_init}` contradicts lora_init_type `{self.config.lora_init_type}`; "
                "set only one of them."
            )
        if (
            opts.flux_lora_module_type != "all"
            and self.config.lora_type == "standard"
            and not self.lora_target_modules()
        ):
            raise ConfigError(
                f"flux_lora_module_type `{opts.flux_lora_module_type}` keeps no module of flux_lora_target "
                f"`{opts.flux_lora_target}`; choose another target (all+ffs has both kinds) or module type."
            )
        limit = self.max_t5_tokens.get(self.flavour or "", 512)
        if self.config.tokenizer_max_length and self.config.tokenizer_max_length > limit:
            raise ConfigError(
                f"tokenizer_max_length {self.config.tokenizer_max_length} is longer than FLUX {self.flavour} "
                f"was trained with; use at most {limit}."
            )

    def lora_target_modules(self) -> list[str]:
        """The preset's modules, kept to flux_lora_module_type's kind (attention or feed-forward)."""
        targets = super().lora_target_modules()
        kind = self.options.flux_lora_module_type
        if kind == "all" or self.config.peft_lora_target_modules:
            return targets
        kept = (*_ATTENTION, *_CONTEXT) if kind == "attention" else _FFS
        return [t for t in targets if t in kept]

    def text_cache_identity(self) -> dict[str, Any]:
        return {**super().text_cache_identity(), "t5_padding": self.options.t5_padding}

    def takes_reference_images(self) -> bool:
        """Kontext learns edits: the reference image's tokens follow the noisy ones (see :meth:`predict`)."""
        return self.flavour == "kontext"

    def token_layout(self) -> TokenLayout:
        """Both block lists take the image tokens (``hidden_states``: the noisy image, then for Kontext
        the reference image, never routed) and the text separately; the rotary embedding and the
        optional attention mask cover ``[text; image(; reference)]``."""
        image = ("image", "reference") if self.takes_reference_images() else ("image",)
        segments = (Segment("image", routable=True), *(Segment(n) for n in image[1:]))
        side = (
            SideInput(Arg("image_rotary_emb", 3), ("text", *image), token_dim=0),
            SideInput(Arg("joint_attention_kwargs", 4), ("text", *image), token_dim=3, key="attention_mask"),
        )
        blocks = [
            BlockList(name, Arg("hidden_states", 0), segments, 1, side, count_key=count)
            for name, count in (
                ("transformer_blocks", "num_layers"),
                ("single_transformer_blocks", "num_single_layers"),
            )
        ]
        return TokenLayout(tuple(blocks), patch_size=2)

    def forward_tokens(self, inputs: StepInputs) -> ForwardTokens:
        h, w = inputs.noisy_latents.shape[-2:]
        rows, cols = h // 2, w // 2
        counts = {"image": rows * cols, "text": inputs.embeds["prompt_embeds"].shape[1]}
        reference = inputs.conditioning.get("reference_latents")
        if reference is not None:
            counts["reference"] = (reference.shape[-2] // 2) * (reference.shape[-1] // 2)
        return ForwardTokens(counts, (rows, cols))

    # -- loading -----------------------------------------------------------------------------------
    def load(self, request: LoadRequest) -> Components:
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        cfg = self.config
        path = self.model_path()
        common = {"revision": cfg.revision}
        try:
            tokenizers = {
                "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
                "tokenizer_2": T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", **common),
            }
            encoders: dict[str, Any] = {}
            if request.text_encoders:
                encoders["text_encoder"] = CLIPTextModel.from_pretrained(
                    path, subfolder="text_encoder", **request.pretrained_kwargs("text_encoder", "dtype"), **common
                )
                t5_kwargs = request.pretrained_kwargs("text_encoder_2", "dtype")
                if t5_kwargs["dtype"] == torch.float16:  # T5 overflows in fp16; it runs in bf16 instead
                    t5_kwargs["dtype"] = torch.bfloat16
                encoders["text_encoder_2"] = T5EncoderModel.from_pretrained(
                    path, subfolder="text_encoder_2", **t5_kwargs, **common
                )
            vae_path = cfg.pretrained_vae_model_name_or_path or path
            vae = AutoencoderKL.from_pretrained(
                vae_path, subfolder=_subfolder(vae_path, "vae"), torch_dtype=request.dtype("vae")
            )
            if cfg.pretrained_transformer_model_name_or_path:
                t_path, t_sub = cfg.pretrained_transformer_model_name_or_path, cfg.pretrained_transformer_subfolder
            else:
                t_path, t_sub = path, "transformer"
            transformer = FluxTransformer2DModel.from_pretrained(
                t_path, subfolder=t_sub, **request.pretrained_kwargs("transformer"), **common
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **common)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Could not load the FLUX model from {path!r}: {str(exc).splitlines()[0]}; check "
                "pretrained_model_name_or_path (a local diffusers folder, or a Hub id you can access — "
                "gated repositories need `huggingface-cli login`)."
            ) from exc
        if self.options.assistant_lora_path and not self.options.disable_assistant_lora:
            self._load_assistant(transformer)
        for module in (*encoders.values(), vae, transformer):
            module.requires_grad_(False)
            module.eval()
        for encoder in encoders.values():
            encoder.to(request.device)
        vae.to(request.device)
        return Components(
            transformer=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers, scheduler=scheduler
        )

    # -- text ----------------------------------------------------------------------------------------
    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        clip, t5 = components.text_encoders["text_encoder"], components.text_encoders["text_encoder_2"]
        clip_tok, t5_tok = components.tokenizers["tokenizer"], components.tokenizers["tokenizer_2"]
        clip_ids = clip_tok(
            prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
        t5_in = t5_tok(
            prompts,
            padding="max_length",
            max_length=self.config.tokenizer_max_length,
            truncation=True,
            return_tensors="pt",
        )
        # CLIP only gives the pooled vector; the transformer reads T5's sequence, so T5 cutting matters.
        self.note_truncation(clip_tok, prompts, clip_tok.model_max_length, self.slot_label("text_encoder"), main=False)
        t5_length = self.config.tokenizer_max_length or 512
        self.note_truncation(t5_tok, prompts, t5_length, self.slot_label("text_encoder_2"), main=True)
        # The FLUX pipeline encodes without an attention mask; training must see the same embeddings.
        embeds = t5(t5_in.input_ids.to(t5.device), output_hidden_states=False)[0]
        mask = t5_in.attention_mask.to(embeds.device)
        if self.options.t5_padding == "zero":
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return [
            {
                "prompt_embeds": embeds[i].cpu(),
                "pooled_prompt_embeds": pooled[i].cpu(),
                "attention_mask": mask[i].to("cpu", dtype=embeds.dtype),
            }
            for i in range(len(prompts))
        ]

    # -- latents -------------------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        vae = components.vae
        dist = vae.encode(pixels).latent_dist
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
        return {"mean": ((dist.mean - shift) * scale).float(), "std": (dist.std * scale).float()}

    # -- forward ---------------------------------------------------------------------------------------
    #: schnell's training schedule: σ = 1 seven times in ten, else 0.75, 0.5 or 0.25 (never shifted)
    fast_schedule_sigmas: ClassVar[tuple[float, ...]] = (1.0,) * 7 + (0.75, 0.5, 0.25)

    def training_sigmas(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
        import torch

        if not self.options.flux_fast_schedule:
            return None
        table = torch.tensor(self.fast_schedule_sigmas, device=device)
        return table[torch.randint(len(table), (batch_size,), generator=generator, device=device)]

    def predict(self, transformer: torch.nn.Module, inputs: StepInputs) -> Prediction:
        import torch
        from diffusers import FluxPipeline

        latents = inputs.noisy_latents
        b, c, h, w = latents.shape
        embeds = inputs.embeds
        opts = self.options
        config = getattr(transformer, "module", transformer).config
        _weigh_assistant(getattr(transformer, "module", transformer), opts.assistant_lora_strength)
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text = embeds["prompt_embeds"]
        txt_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if config.guidance_embeds:
            if opts.flux_guidance_mode == "random-range":
                low, high = opts.flux_guidance_min, opts.flux_guidance_max
                draw = torch.rand(b, generator=inputs.generator, device=latents.device)
                guidance = low + (high - low) * draw
            else:
                guidance = torch.full((b,), opts.flux_guidance_value, device=latents.device)
        tokens = packed.shape[1]
        reference = inputs.conditioning.get("reference_latents")
        if reference is not None:
            # Kontext: the clean reference latents follow the noisy ones as more image tokens, with
            # position ids whose first coordinate is 1 (as FluxKontextPipeline builds them); only the
            # noisy tokens' prediction is kept, so the reference gets no loss.
            reference = reference.to(latents.dtype)
            rb, rc, rh, rw = reference.shape
            packed = torch.cat([packed, FluxPipeline._pack_latents(reference, rb, rc, rh, rw)], dim=1)
            ref_ids = FluxPipeline._prepare_latent_image_ids(b, rh // 2, rw // 2, latents.device, latents.dtype)
            ref_ids[..., 0] = 1
            img_ids = torch.cat([img_ids, ref_ids], dim=0)
        attention = None
        if opts.flux_attention_masked_training:
            # Text padding is masked out; every image token is attended to.
            image_mask = torch.ones(b, packed.shape[1], device=latents.device, dtype=torch.bool)
            keep = torch.cat([embeds["attention_mask"].bool(), image_mask], dim=1)
            attention = {"attention_mask": keep[:, None, None, :]}
        out = transformer(
            hidden_states=packed,
            timestep=inputs.sigmas.to(latents.dtype),  # the transformer multiplies by 1000
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"],
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            joint_attention_kwargs=attention,
            return_dict=False,
        )[0]
        velocity = FluxPipeline._unpack_latents(
            out[:, :tokens], h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor
        )
        return Prediction(velocity)

    # -- outputs -----------------------------------------------------------------------------------------
    def render_validation(
        self, components: Components, transformer: torch.nn.Module, requests: list[ValidationRequest]
    ) -> list[Image.Image]:
        """FluxPipeline on the cached embeddings. ``validation_guidance`` is the distilled guidance
        value; ``validation_guidance_real`` > 1 adds true CFG with the negative prompt, skipped for
        the first ``validation_no_cfg_until_timestep`` steps (as SimpleTuner's pipeline does)."""
        import torch
        from diffusers import FluxKontextPipeline, FluxPipeline

        cfg, opts = self.config, self.options
        kontext = self.takes_reference_images()
        pipe = (FluxKontextPipeline if kontext else FluxPipeline)(
            scheduler=components.scheduler,
            vae=components.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        device = next(transformer.parameters()).device
        dtype = components.vae.dtype
        _weigh_assistant(transformer, opts.assistant_lora_inference_strength)
        true_cfg = opts.validation_guidance_real > 1.0
        no_cfg_steps = opts.validation_no_cfg_until_timestep if true_cfg else 0

        # diffusers' true-CFG loop calls the transformer twice per step, prompt then negative. For
        # the first steps a forward hook hands back the prompt's prediction as the negative one,
        # so neg + s·(pos − neg) is the plain prediction there.
        calls, last = 0, None

        def without_cfg(module: Any, args: Any, output: Any) -> Any:
            nonlocal calls, last
            step, negative = divmod(calls, 2)
            calls += 1
            if negative and step < no_cfg_steps:
                return last
            last = output
            return output

        images = []
        for request in requests:
            extra: dict[str, Any] = {}
            source = None
            if kontext and request.image is not None:
                source = _open_rgb(request.image).resize((request.width, request.height))
                # the validation size as asked, not Kontext's preferred resolutions
                extra.update(image=source, max_area=request.width * request.height, _auto_resize=False)
            if true_cfg and request.negative_embeds is not None:
                extra = {
                    "true_cfg_scale": opts.validation_guidance_real,
                    "negative_prompt_embeds": request.negative_embeds["prompt_embeds"][None].to(device, dtype),
                    "negative_pooled_prompt_embeds": request.negative_embeds["pooled_prompt_embeds"][None].to(
                        device, dtype
                    ),
                }
            calls, last = 0, None
            hook = transformer.register_forward_hook(without_cfg) if extra and no_cfg_steps else None
            try:
                output = pipe(
                    prompt_embeds=request.embeds["prompt_embeds"][None].to(device, dtype),
                    pooled_prompt_embeds=request.embeds["pooled_prompt_embeds"][None].to(device, dtype),
                    width=request.width,
                    height=request.height,
                    num_inference_steps=cfg.validation_num_inference_steps,
                    guidance_scale=cfg.validation_guidance,
                    generator=torch.Generator("cpu").manual_seed(request.seed),
                    max_sequence_length=cfg.tokenizer_max_length or 512,
                    output_type="latent",
                    **extra,
                    **_preview_callback(pipe, request, components.extras.get("preview_autoencoder")),
                )
            finally:
                if hook is not None:
                    hook.remove()
            image = _decode(pipe, output.images, request.height, request.width)
            images.append(image if source is None else _side_by_side(source, image))
        _weigh_assistant(transformer, opts.assistant_lora_strength)
        return images

    def _load_assistant(self, transformer: Any) -> None:
        """The assistant LoRA as a second, frozen PEFT adapter (``assistant``) of the base transformer."""
        from diffusers import FluxPipeline

        path = self.options.assistant_lora_path
        try:
            state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
                path, return_alphas=True, return_lora_metadata=True
            )
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Could not read the assistant LoRA {path!r}: {str(exc).splitlines()[0]}; fix assistant_lora_path "
                "or set disable_assistant_lora."
            ) from exc
        transformer.load_lora_adapter(
            state_dict, network_alphas=alphas or None, metadata=metadata, prefix="transformer", adapter_name=ASSISTANT
        )

    def loading_example(self, output_dir: Path) -> str:
        if self.takes_reference_images():
            return (
                "    import torch\n"
                "    from diffusers import FluxKontextPipeline\n"
                "    from diffusers.utils import load_image\n"
                f"    pipe = FluxKontextPipeline.from_pretrained({self.model_path()!r})\n"
                f"    pipe.load_lora_weights({str(output_dir)!r})\n"
                '    image = pipe(image=load_image("input.png"), prompt="your edit instruction").images[0]'
            )
        return (
            "    import torch\n"
            "    from diffusers import FluxPipeline\n"
            f"    pipe = FluxPipeline.from_pretrained({self.model_path()!r})\n"
            f"    pipe.load_lora_weights({str(output_dir)!r})\n"
            '    image = pipe("your prompt", num_inference_steps=20).images[0]'
        )

    @classmethod
    def build_demo(cls, workdir: Path) -> Path:
        from stune_flux.tiny import build_demo

        return build_demo(workdir)


ASSISTANT = "assistant"


def _weigh_assistant(transformer: Any, strength: float) -> None:
    """Make the assistant LoRA active next to the trained one at ``strength``, and keep it frozen
    (PEFT marks every active adapter trainable)."""
    if ASSISTANT not in (getattr(transformer, "peft_config", None) or {}):
        return
    names = [ASSISTANT, *(n for n in transformer.peft_config if n != ASSISTANT)]
    if getattr(transformer, "_stune_assistant_weight", None) == strength and set(transformer.active_adapters()) == set(
        names
    ):
        return
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    transformer.set_adapters(names, [strength, *([1.0] * (len(names) - 1))])
    for name, param in transformer.named_parameters():
        param.requires_grad_(name in trainable and f".{ASSISTANT}." not in name)
    transformer._stune_assistant_weight = strength


def _open_rgb(path: Path) -> Image.Image:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _side_by_side(source: Image.Image, edited: Image.Image) -> Image.Image:
    """The input image on the left, the edit on the right (Kontext validation images)."""
    from PIL import Image

    joined = Image.new("RGB", (source.width + edited.width, max(source.height, edited.height)))
    joined.paste(source, (0, 0))
    joined.paste(edited, (source.width, 0))
    return joined


def _subfolder(path: str, name: str) -> str | None:
    """A local folder that is itself a component (has config.json) has no subfolder."""
    local = Path(path)
    if local.is_dir() and (local / "config.json").is_file() and not (local / name).is_dir():
        return None
    return name


def _decode(pipeline: Any, packed: torch.Tensor, height: int, width: int) -> Image.Image:
    """Packed latents → an image, decoded in the VAE's own dtype. (A transformer prepared for mixed
    precision returns fp32, which the pipeline would hand a bf16 VAE as is.)"""
    import torch

    vae = pipeline.vae
    with torch.no_grad():
        latents = pipeline._unpack_latents(packed, height, width, pipeline.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    image: Image.Image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
    return image


def _decode_tiny(pipeline: Any, tiny: Any, packed: torch.Tensor, height: int, width: int) -> Image.Image:
    """Packed latents → a preview image through the tiny autoencoder, scaled as the pipeline scales
    latents for whichever VAE it holds (taef1 is a drop-in replacement for FLUX's)."""
    import torch

    with torch.no_grad():
        latents = pipeline._unpack_latents(packed, height, width, pipeline.vae_scale_factor)
        latents = latents / tiny.config.scaling_factor + (getattr(tiny.config, "shift_factor", None) or 0.0)
        decoded = tiny.decode(latents.to(tiny.device, tiny.dtype), return_dict=False)[0]
    image: Image.Image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
    return image


def _preview_callback(pipe: Any, request: ValidationRequest, tiny: Any = None) -> dict[str, Any]:
    """``callback_on_step_end`` decoding the latents every ``request.preview_every`` steps, with the
    tiny autoencoder (``AutoencoderTiny``, taef1) when there is one, else the full VAE."""
    if request.preview is None or not request.preview_every:
        return {}

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if (step + 1) % request.preview_every == 0:
            latents = tensors["latents"]
            if tiny is None:
                image = _decode(pipeline, latents, request.height, request.width)
            else:
                image = _decode_tiny(pipeline, tiny, latents, request.height, request.width)
            request.preview(step + 1, image)  # type: ignore[misc]
        return {}

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
