"""The Stable Diffusion 3 / 3.5 family, top to bottom: what it is, loading, text, latents, forward, outputs.

SD3 is an MMDiT: a list of joint blocks in which image and text tokens attend to each other while
keeping separate weights (SD3.5 Medium adds a second, image-only attention and RMS q/k norms in
its first blocks). The transformer patchifies the 16-channel latents itself (2×2 patches plus a
learned absolute position embedding, added before the blocks), so nothing is packed here and the
blocks see only token features. Text comes from three encoders: CLIP-L and CLIP-G give their
penultimate hidden states (77 tokens each, concatenated on features and zero-padded to the T5
width) and their pooled outputs (concatenated: the pooled embedding); T5-XXL gives up to 154
more tokens, appended after the CLIP ones. The timestep is σ·1000.

torch/diffusers/transformers are imported inside methods: registering the family stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stune.errors import ConfigError, UserError
from stune.family import Components, LoadRequest, ModelFamily, TextEncoderSlot, ValidationRequest
from stune.layout import Arg, BlockList, ForwardTokens, Segment, TokenLayout
from stune.step import Prediction, StepInputs
from stune_sd3.options import SD3Options

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger("stune.sd3")

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FFS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
#: T5 tokens SD3 was trained with; fewer (77) save cache space, more need i_know_what_i_am_doing
T5_TOKENS = 154


class SD3Family(ModelFamily[SD3Options]):
    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 (medium, large; 3.0 medium by path): CLIP-L + CLIP-G + T5-XXL MMDiT."
    flavours: ClassVar[dict[str, str]] = {
        "medium": "stabilityai/stable-diffusion-3.5-medium",
        "large": "stabilityai/stable-diffusion-3.5-large",
    }
    default_flavour = "medium"
    alignment = 64
    latent_channels = 16
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": _ATTENTION,
        "attention+context": (*_ATTENTION, *_CONTEXT),
        "attention+ffs": (*_ATTENTION, *_FFS),
        "attention+context+ffs": (*_ATTENTION, *_CONTEXT, *_FFS),
    }
    lora_preset_option = "sd3_lora_target"
    default_lora_preset = "attention"
    lora_pipeline = "StableDiffusion3Pipeline"  # its save_lora_weights / lora_state_dict read and write our LoRA files
    text_encoder_slots = (
        TextEncoderSlot("text_encoder", "CLIP-L"),
        TextEncoderSlot("text_encoder_2", "CLIP-G"),
        TextEncoderSlot("text_encoder_3", "T5-XXL"),
    )
    # SD3's attention modules are diffusers' own `Attention` class, the name LyCORIS configs use:
    # SimpleTuner's presets (Attention, FeedForward) match without aliases.
    lycoris_module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: kept in high precision: norms (and the adaLN modulation linears), the output projection, the
    #: patch/position embedding, the feed-forwards, the context embedder, the time/text embedders
    quantization_exclusions = (
        "*norm*",
        "proj_out",
        "pos_embed*",
        "*.ff.*",
        "*.ff_context.*",
        "context_embedder",
        "time_text_embed*",
    )

    #: validation_preview images are decoded by SD3's tiny autoencoder (AutoencoderTiny, 16 channels)
    config_defaults: ClassVar[dict[str, Any]] = {"validation_preview_autoencoder": "madebyollin/taesd3"}

    # -- configuration --------------------------------------------------------------------------
    def apply_defaults(self) -> None:
        super().apply_defaults()
        if self.config.tokenizer_max_length is None:
            self.config.tokenizer_max_length = T5_TOKENS

    def check_config(self) -> None:
        super().check_config()
        cfg, opts = self.config, self.options
        length = cfg.tokenizer_max_length or T5_TOKENS
        if length > T5_TOKENS:
            if not cfg.i_know_what_i_am_doing:
                raise ConfigError(
                    f"tokenizer_max_length {length} is longer than the {T5_TOKENS} T5 tokens SD3 was trained with; "
                    f"use at most {T5_TOKENS} (77 saves cache space), or set i_know_what_i_am_doing to unlock it."
                )
            log.warning(
                "tokenizer_max_length %d is above SD3's %d T5 tokens (unlocked by i_know_what_i_am_doing): "
                "the model never saw these positions and may collapse.",
                length,
                T5_TOKENS,
            )
        if cfg.pretrained_vae_model_name_or_path:
            raise ConfigError(
                "SD3 trains with the VAE of its own pipeline (its latent space is what the transformer knows); "
                "remove pretrained_vae_model_name_or_path."
            )
        if opts.validation_guidance_skip_layers and cfg.validation_guidance <= 1.0 and not cfg.validation_disable:
            raise ConfigError(
                "validation_guidance_skip_layers works on top of classifier-free guidance, which is off at "
                f"validation_guidance {cfg.validation_guidance:g}; raise validation_guidance above 1 or remove "
                "validation_guidance_skip_layers."
            )

    def text_cache_identity(self) -> dict[str, Any]:
        return {**super().text_cache_identity(), "t5_padding": self.options.t5_padding}

    def unconditional_identity(self) -> dict[str, Any]:
        return {"clip": self.options.sd3_clip_uncond_behaviour, "t5": self.options.t5_uncond_behaviour}

    def token_layout(self) -> TokenLayout:
        """Every joint block takes the image tokens alone (``hidden_states``) and the text separately
        (``encoder_hidden_states``) and returns ``(text, image)``. Positions are added by the patch
        embedding before the first block, so no side input has to follow the routed tokens."""
        blocks = BlockList(
            "transformer_blocks", Arg("hidden_states", 0), (Segment("image", routable=True),), 1, count_key="num_layers"
        )
        return TokenLayout((blocks,), patch_size=2)

    def forward_tokens(self, inputs: StepInputs) -> ForwardTokens:
        h, w = inputs.noisy_latents.shape[-2:]
        rows, cols = h // 2, w // 2
        return ForwardTokens({"image": rows * cols, "text": inputs.embeds["prompt_embeds"].shape[1]}, (rows, cols))

    # -- loading -----------------------------------------------------------------------------------
    def load(self, request: LoadRequest) -> Components:
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        cfg = self.config
        path = self.model_path()
        common = {"revision": cfg.revision}
        try:
            tokenizers = {
                "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
                "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
                "tokenizer_3": T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **common),
            }
            encoders: dict[str, Any] = {}
            if request.text_encoders:
                for key in ("text_encoder", "text_encoder_2"):
                    encoders[key] = CLIPTextModelWithProjection.from_pretrained(
                        path, subfolder=key, **request.pretrained_kwargs(key, "dtype"), **common
                    )
                t5_kwargs = request.pretrained_kwargs("text_encoder_3", "dtype")
                if t5_kwargs["dtype"] == torch.float16:  # T5 overflows in fp16; it runs in bf16 instead
                    t5_kwargs["dtype"] = torch.bfloat16
                encoders["text_encoder_3"] = T5EncoderModel.from_pretrained(
                    path, subfolder="text_encoder_3", **t5_kwargs, **common
                )
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=request.dtype("vae"), **common)
            if cfg.pretrained_transformer_model_name_or_path:
                t_path, t_sub = cfg.pretrained_transformer_model_name_or_path, cfg.pretrained_transformer_subfolder
            else:
                t_path, t_sub = path, "transformer"
            transformer = SD3Transformer2DModel.from_pretrained(
                t_path, subfolder=t_sub, **request.pretrained_kwargs("transformer"), **common
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **common)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Could not load the SD3 model from {path!r}: {str(exc).splitlines()[0]}; check "
                "pretrained_model_name_or_path (a local diffusers folder, or a Hub id you can access — "
                "the stabilityai repositories are gated and need `huggingface-cli login`)."
            ) from exc
        depth = transformer.config.num_layers
        skipped = [n for n in self.options.validation_guidance_skip_layers or () if n >= depth]
        if skipped:
            raise UserError(
                f"validation_guidance_skip_layers names block {skipped[0]}, but this SD3 transformer has {depth} "
                f"blocks (0–{depth - 1}); pick layers below {depth}."
            )
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
    def _encode(self, components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CLIP part padded to the T5 width, T5 part, pooled) for ``prompts``, as the pipeline builds them."""
        import torch
        import torch.nn.functional as F

        hidden, pooled = [], []
        for key, tok_key in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            encoder, tokenizer = components.text_encoders[key], components.tokenizers[tok_key]
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            # T5 reads longer captions than the CLIPs: theirs being cut is the normal case
            self.note_truncation(tokenizer, prompts, tokenizer.model_max_length, self.slot_label(key), main=False)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SD3 was trained
            pooled.append(out.text_embeds)
        t5, t5_tok = components.text_encoders["text_encoder_3"], components.tokenizers["tokenizer_3"]
        t5_in = t5_tok(
            prompts,
            padding="max_length",
            max_length=self.config.tokenizer_max_length or T5_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        length = self.config.tokenizer_max_length or T5_TOKENS
        self.note_truncation(t5_tok, prompts, length, self.slot_label("text_encoder_3"), main=True)
        # The SD3 pipeline encodes without an attention mask; training must see the same embeddings.
        t5_embeds = t5(t5_in.input_ids.to(t5.device))[0]
        if self.options.t5_padding == "zero":
            t5_embeds = t5_embeds * t5_in.attention_mask.to(t5_embeds.device, t5_embeds.dtype).unsqueeze(-1)
        dtype = t5_embeds.dtype
        clip = torch.cat([h.to(t5_embeds.device, dtype) for h in hidden], dim=-1)
        clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return clip, t5_embeds, torch.cat([p.to(t5_embeds.device, dtype) for p in pooled], dim=-1)

    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        import torch

        clip, t5, pooled = self._encode(components, prompts)
        embeds = torch.cat([clip, t5], dim=-2)
        return [
            {"prompt_embeds": embeds[i].cpu(), "pooled_prompt_embeds": pooled[i].cpu()} for i in range(len(prompts))
        ]

    def unconditional_embeds(self, components: Components) -> dict[str, torch.Tensor]:
        """A dropped caption: the encoding of "" or zeros, chosen separately for the CLIP part (with
        the pooled embedding) and the T5 part (sd3_clip_uncond_behaviour, sd3_t5_uncond_behaviour)."""
        import torch

        clip, t5, pooled = self._encode(components, [""])
        if self.options.sd3_clip_uncond_behaviour == "zero":
            clip, pooled = torch.zeros_like(clip), torch.zeros_like(pooled)
        if self.options.t5_uncond_behaviour == "zero":
            t5 = torch.zeros_like(t5)
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2)[0].cpu(), "pooled_prompt_embeds": pooled[0].cpu()}

    # -- latents -------------------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        vae = components.vae
        dist = vae.encode(pixels).latent_dist
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
        return {"mean": ((dist.mean - shift) * scale).float(), "std": (dist.std * scale).float()}

    # -- forward ---------------------------------------------------------------------------------------
    def predict(self, transformer: torch.nn.Module, inputs: StepInputs) -> Prediction:
        latents = inputs.noisy_latents
        velocity = transformer(
            hidden_states=latents,
            timestep=inputs.timesteps,  # σ·1000, kept in fp32: bf16 would round it to whole steps
            encoder_hidden_states=inputs.embeds["prompt_embeds"].to(latents.dtype),
            pooled_projections=inputs.embeds["pooled_prompt_embeds"].to(latents.dtype),
            return_dict=False,
        )[0]
        return Prediction(velocity)

    # -- outputs -----------------------------------------------------------------------------------------
    def render_validation(
        self, components: Components, transformer: torch.nn.Module, requests: list[ValidationRequest]
    ) -> list[Image.Image]:
        """StableDiffusion3Pipeline on the cached embeddings: CFG with the negative prompt at
        ``validation_guidance``, and skip-layer guidance when ``validation_guidance_skip_layers`` is
        set (the pipeline runs a third forward without those blocks on the steps i with
        start·N < i < stop·N, N sampling steps)."""
        import torch
        from diffusers import StableDiffusion3Pipeline

        cfg, opts = self.config, self.options
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=components.scheduler,
            vae=components.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        pipe.set_progress_bar_config(disable=True)
        device = next(transformer.parameters()).device
        dtype = components.vae.dtype
        cfg_on = cfg.validation_guidance > 1.0
        slg: dict[str, Any] = {}
        if opts.validation_guidance_skip_layers:
            slg = {
                "skip_guidance_layers": list(opts.validation_guidance_skip_layers),
                "skip_layer_guidance_scale": opts.validation_guidance_skip_scale,
                "skip_layer_guidance_start": opts.validation_guidance_skip_layers_start,
                "skip_layer_guidance_stop": opts.validation_guidance_skip_layers_stop,
            }
        images = []
        for request in requests:
            negative: dict[str, Any] = {}
            if cfg_on:
                # The pipeline would encode "" with its (absent) text encoders otherwise.
                source = request.negative_embeds if request.negative_embeds is not None else request.embeds
                negative = {
                    "negative_prompt_embeds": source["prompt_embeds"][None].to(device, dtype),
                    "negative_pooled_prompt_embeds": source["pooled_prompt_embeds"][None].to(device, dtype),
                }
            output = pipe(
                prompt_embeds=request.embeds["prompt_embeds"][None].to(device, dtype),
                pooled_prompt_embeds=request.embeds["pooled_prompt_embeds"][None].to(device, dtype),
                width=request.width,
                height=request.height,
                num_inference_steps=cfg.validation_num_inference_steps,
                guidance_scale=cfg.validation_guidance,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                max_sequence_length=cfg.tokenizer_max_length or T5_TOKENS,
                output_type="latent",
                **negative,
                **slg,
                **_preview_callback(pipe, request, components.extras.get("preview_autoencoder")),
            )
            images.append(_decode(pipe, output.images))
        return images

    def loading_example(self, output_dir: Path) -> str:
        """Loading snippet for the model card; ``output_dir`` is a local folder or a Hub id."""
        where = str(output_dir)
        if self.config.model_type == "full":
            load = (
                "    pipe.transformer = SD3Transformer2DModel.from_pretrained(\n"
                f"        {where!r}, subfolder='transformer', torch_dtype=torch.bfloat16\n"
                "    )\n"
            )
        elif self.config.lora_type == "lycoris":
            weights = (
                repr(str(Path(where) / "pytorch_lora_weights.safetensors"))
                if Path(where).is_dir()
                else f"hf_hub_download({where!r}, 'pytorch_lora_weights.safetensors')"
            )
            load = (
                "    from huggingface_hub import hf_hub_download\n"
                "    from lycoris import create_lycoris_from_weights\n"
                f"    network, _ = create_lycoris_from_weights(1.0, {weights}, pipe.transformer)\n"
                "    network.merge_to()\n"
            )
        else:
            load = f"    pipe.load_lora_weights({where!r})\n"
        slg = ""
        if self.options.validation_guidance_skip_layers:
            slg = f", skip_guidance_layers={list(self.options.validation_guidance_skip_layers)}"
        return (
            "    import torch\n"
            "    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline\n"
            f"    pipe = StableDiffusion3Pipeline.from_pretrained({self.model_path()!r}, torch_dtype=torch.bfloat16)\n"
            f"{load}"
            f'    image = pipe("your prompt", num_inference_steps=28, guidance_scale='
            f"{self.config.validation_guidance:g}{slg}).images[0]"
        )

    @classmethod
    def build_demo(cls, workdir: Path) -> Path:
        from stune_sd3.tiny import build_demo

        return build_demo(workdir)


def _decode(pipe: Any, latents: Any, tiny: Any = None) -> Image.Image:
    """Latents to an image in the VAE's dtype: under mixed precision the prepared transformer hands
    back fp32, which a bf16 VAE cannot take (the pipeline's own decode does not cast). ``tiny``: the
    AutoencoderTiny previews use instead (scaled by its own config, as a drop-in VAE would be)."""
    vae = tiny if tiny is not None else pipe.vae
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]  # type: ignore[no-any-return]


def _preview_callback(pipe: Any, request: ValidationRequest, tiny: Any = None) -> dict[str, Any]:
    """``callback_on_step_end`` decoding the latents every ``request.preview_every`` steps (with the
    tiny autoencoder, taesd3, when there is one)."""
    if request.preview is None or not request.preview_every:
        return {}
    import torch

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if (step + 1) % request.preview_every == 0:
            with torch.no_grad():
                request.preview(step + 1, _decode(pipeline, tensors["latents"], tiny))  # type: ignore[misc]
        return {}

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
