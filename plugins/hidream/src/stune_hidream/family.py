"""The HiDream-I1 family, top to bottom: what it is, configuration, loading, text, forward, outputs.

HiDream-I1 is a 17B-parameter rectified-flow transformer: 16 double-stream blocks (image and text
streams side by side) then 32 single-stream blocks over ``[image; T5; Llama; Llama]``, every
block's image feed-forward a mixture of experts (4 routed experts, 2 active per token, plus a
shared one) chosen by a learned gate. It reads four text encoders: CLIP-L and CLIP-G (pooled,
concatenated), T5-XXL (token embeddings), and Llama-3.1-8B-Instruct, whose hidden states of one
layer per block (``llama_layers``) join the text stream. Latents are FLUX's (16 channels, 1/8 of
the side); the transformer patchifies 2×2 itself, pads non-square grids to ``max_seq`` tokens with
a mask, and predicts the *negated* velocity.

Things diffusers' classes do that training has to meet:

* ``MoEGate`` computes a load-balancing loss in training mode and ``MOEFeedForwardSwiGLU`` drops
  it; forward hooks on the gates collect it in the graph (:class:`_Gates`) and it goes through the
  core's auxiliary-loss seam, weighted once (SimpleTuner detached it and weighted it twice).
* In training mode the transformer's unpatchify returns ``(B, C, tokens, p²)`` rather than the
  image layout; :func:`_to_latents` undoes it (eval mode, e.g. in the pipeline, gives images).
* Text is cached without its padding (a 20-word caption uses ~27 of 128 tokens, and the Llama part
  holds every layer the transformer reads); a batch pads its captions again and a masked attention
  processor (:func:`_masked_attention_class`) keeps that padding out of attention, so each sample
  sees exactly its own tokens. ``hidden_states_masks`` (the image padding) keeps diffusers'
  meaning: those keys are zeroed, not masked, so padded image tokens still take attention weight.

torch/diffusers/transformers are imported inside methods: registering the family stays light.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stune.errors import ConfigError, UserError
from stune.family import Components, LoadRequest, ModelFamily, TextEncoderSlot, ValidationRequest
from stune.layout import Arg, BlockList, ForwardTokens, Segment, SideInput, TokenLayout
from stune.quantize import NO_CHANGE
from stune.step import AuxLoss, Prediction, StepInputs
from stune_hidream.options import DEFAULT_LLAMA, HiDreamOptions

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger("stune.hidream")

_ATTENTION = ("to_q", "to_k", "to_v", "to_out")  # to_out is a bare Linear in HiDream (no .0)
_TEXT_ATTENTION = ("to_q_t", "to_k_t", "to_v_t", "to_out_t")
_SHARED_EXPERTS = ("shared_experts.w1", "shared_experts.w2", "shared_experts.w3")
_TEXT_FF = ("ff_t.w1", "ff_t.w2", "ff_t.w3")
#: T5 token limit: HiDream was trained with 128 tokens
MAX_T5_TOKENS = 128
#: cache-entry keys
T5, LLAMA, LAYERS, POOLED = "t5_prompt_embeds", "llama_prompt_embeds", "llama_layers", "pooled_prompt_embeds"
T5_MASK, LLAMA_MASK = "t5_mask", "llama_mask"


class HiDreamFamily(ModelFamily[HiDreamOptions]):
    name = "hidream"
    description = "HiDream-I1 (full, dev, fast): CLIP-L + CLIP-G + T5-XXL + Llama-3.1-8B, MoE transformer."
    flavours: ClassVar[dict[str, str]] = {
        "full": "HiDream-ai/HiDream-I1-Full",
        "dev": "HiDream-ai/HiDream-I1-Dev",
        "fast": "HiDream-ai/HiDream-I1-Fast",
    }
    default_flavour = "full"
    alignment = 64
    maximum_canvas_pixels = 1024 * 1024  # max_seq 4096 image tokens of 2×2 latent patches
    latent_channels = 16
    lora_pipeline = "HiDreamImagePipeline"  # its save_lora_weights / lora_state_dict read and write our LoRA files
    text_encoder_slots = (
        TextEncoderSlot("text_encoder", "CLIP-L"),
        TextEncoderSlot("text_encoder_2", "CLIP-G"),
        TextEncoderSlot("text_encoder_3", "T5-XXL"),
        # Only the hidden states are read: lm_head (0.5B parameters) may be quantized like the rest.
        TextEncoderSlot("text_encoder_4", "Llama-3.1-8B-Instruct"),
    )
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": _ATTENTION,
        "attention+text": (*_ATTENTION, *_TEXT_ATTENTION),
        "attention+text+shared_experts": (*_ATTENTION, *_TEXT_ATTENTION, *_SHARED_EXPERTS),
        "attention+text+ffs": (*_ATTENTION, *_TEXT_ATTENTION, *_TEXT_FF, *_SHARED_EXPERTS),
    }
    lora_preset_option = "hidream_lora_target"
    default_lora_preset = "attention"
    lycoris_module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "Attention": ("HiDreamAttention",),
        "FeedForward": ("MOEFeedForwardSwiGLU", "HiDreamImageFeedForwardSwiGLU"),
    }
    # Embedders, the output layer and the caption projections stay in high precision; the gates
    # are not Linear layers (a raw weight) and stay as they are.
    quantization_exclusions = ("x_embedder*", "t_embedder*", "p_embedder*", "caption_projection*", "final_layer*")
    #: sampling defaults per flavour: (guidance, steps); dev and fast are guidance-distilled
    #: validation_preview images are decoded by FLUX's tiny autoencoder: HiDream uses FLUX's VAE
    config_defaults: ClassVar[dict[str, Any]] = {"validation_preview_autoencoder": "madebyollin/taef1"}
    validation_defaults: ClassVar[dict[str, tuple[float, int]]] = {
        "full": (5.0, 50),
        "dev": (0.0, 28),
        "fast": (0.0, 16),
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        #: image tokens of a non-square latent (the transformer's max_seq), known once loaded
        self.max_image_tokens: int | None = None

    # -- configuration --------------------------------------------------------------------------
    def apply_defaults(self) -> None:
        super().apply_defaults()
        cfg = self.config
        if cfg.tokenizer_max_length is None:
            cfg.tokenizer_max_length = MAX_T5_TOKENS
        guidance, steps = self.validation_defaults.get(self.flavour or "", (5.0, 50))
        for key, value in (
            ("validation_guidance", guidance),
            ("validation_num_inference_steps", steps),
            ("validation_resolution", "1024x1024"),
        ):
            if key not in cfg.model_fields_set:
                setattr(cfg, key, value)

    def check_config(self) -> None:
        super().check_config()
        cfg, opts = self.config, self.options
        if cfg.tokenizer_max_length and cfg.tokenizer_max_length > MAX_T5_TOKENS:
            if not cfg.i_know_what_i_am_doing:
                raise ConfigError(
                    f"tokenizer_max_length {cfg.tokenizer_max_length} is longer than the {MAX_T5_TOKENS} tokens "
                    f"HiDream was trained with; use at most {MAX_T5_TOKENS} (or set i_know_what_i_am_doing)."
                )
            log.warning(
                "tokenizer_max_length %d is beyond HiDream's %d tokens", cfg.tokenizer_max_length, MAX_T5_TOKENS
            )
        # The precision options belong to the quantization plugin; read them by name.
        base_precision = getattr(cfg, "base_model_precision", None)
        llama_precision = getattr(cfg, "text_encoder_4_precision", None)
        base, llama = _backend(base_precision), _backend(llama_precision)
        if base and llama and base != llama:
            raise ConfigError(
                f"base_model_precision {base_precision} and text_encoder_4_precision {llama_precision} use two "
                f"quantization backends ({base} and {llama}), which HiDream cannot mix; give the Llama a {base} "
                "precision or no_change."
            )
        if opts.hidream_use_load_balancing_loss and opts.hidream_load_balancing_loss_weight == 0:
            raise ConfigError(
                "hidream_use_load_balancing_loss is on with hidream_load_balancing_loss_weight 0; "
                "give the weight a value above 0 (0.01 is the gates' own) or turn the loss off."
            )
        if opts.hidream_use_load_balancing_loss and cfg.model_type != "full":
            log.warning(
                "the MoE gates are frozen under an adapter: the load-balancing loss trains the adapted layers "
                "that feed them (the gates themselves only train with model_type=full)"
            )

    def text_cache_identity(self) -> dict[str, Any]:
        from stune._defaults import weight_dtype

        return {
            **super().text_cache_identity(),
            "llama": self.llama_location(),
            "transformer": self.config.pretrained_transformer_model_name_or_path,  # its llama_layers
            "padding": self.options.hidream_text_padding,
            "dtype": str(weight_dtype(self.config)),
        }

    def llama_location(self) -> tuple[str, str | None]:
        """(path, subfolder) of text_encoder_4: the option, else the base model's folder, else the default Llama."""
        chosen = self.options.pretrained_text_encoder_4_model_name_or_path
        if chosen:
            return chosen, "text_encoder_4" if (Path(chosen) / "text_encoder_4" / "config.json").is_file() else None
        base = self.model_path()
        if (Path(base) / "text_encoder_4" / "config.json").is_file():
            return base, "text_encoder_4"
        return DEFAULT_LLAMA, None

    # -- token layout (for routers) --------------------------------------------------------------
    def token_layout(self) -> TokenLayout:
        """Double-stream blocks take the image tokens alone (text separately); single-stream blocks
        take ``[image; text]`` and return it. The rotary embedding (with a batch dimension) covers
        ``[image; text]`` in both; ``hidden_states_masks`` (non-square images) covers the image
        tokens in double blocks and the whole sequence in single ones."""
        rotary = SideInput(Arg("image_rotary_emb", 4), ("image", "text"), token_dim=1)
        double = BlockList(
            "double_stream_blocks",
            Arg("hidden_states", 0),
            (Segment("image", routable=True),),
            output=0,
            side_inputs=(rotary, SideInput(Arg("hidden_states_masks", 1), ("image",), token_dim=1)),
            count_key="num_layers",
        )
        single = BlockList(
            "single_stream_blocks",
            Arg("hidden_states", 0),
            (Segment("image", routable=True), Segment("text")),
            output=None,
            side_inputs=(rotary, SideInput(Arg("hidden_states_masks", 1), ("image", "text"), token_dim=1)),
            count_key="num_single_layers",
        )
        return TokenLayout((double, single), patch_size=2)

    def forward_tokens(self, inputs: StepInputs) -> ForwardTokens:
        import torch

        h, w = inputs.noisy_latents.shape[-2:]
        rows, cols = h // 2, w // 2
        text = inputs.embeds[T5].shape[1] + 2 * inputs.embeds[LLAMA].shape[2]
        if h == w:
            return ForwardTokens({"image": rows * cols, "text": text}, (rows, cols))
        count = self._max_image_tokens()
        valid = torch.arange(count, device=inputs.noisy_latents.device) < rows * cols
        return ForwardTokens({"image": count, "text": text}, (rows, cols), valid)

    def _max_image_tokens(self) -> int:
        if self.max_image_tokens is None:
            raise RuntimeError("the HiDream transformer is not loaded yet (family.load sets its max_seq)")
        return self.max_image_tokens

    # -- loading -----------------------------------------------------------------------------------
    def load(self, request: LoadRequest) -> Components:
        import diffusers
        import torch
        from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel
        from transformers import (
            AutoTokenizer,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            LlamaForCausalLM,
            T5EncoderModel,
            T5Tokenizer,
        )

        cfg = self.config
        path = self.model_path()
        common = {"revision": cfg.revision}
        tokenizers: dict[str, Any] = {}
        encoders: dict[str, Any] = {}
        try:
            if request.text_encoders:
                llama_path, llama_sub = self.llama_location()
                tokenizers = {
                    "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
                    "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
                    "tokenizer_3": T5Tokenizer.from_pretrained(path, subfolder="tokenizer_3", **common),
                    "tokenizer_4": AutoTokenizer.from_pretrained(
                        llama_path, subfolder=llama_sub.replace("text_encoder", "tokenizer") if llama_sub else ""
                    ),
                }
                tokenizers["tokenizer_4"].pad_token = tokenizers["tokenizer_4"].eos_token  # as the pipeline does
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
                encoders["text_encoder_4"] = LlamaForCausalLM.from_pretrained(
                    llama_path, subfolder=llama_sub or "", **request.pretrained_kwargs("text_encoder_4", "dtype")
                )
            vae_path = cfg.pretrained_vae_model_name_or_path or path
            vae = AutoencoderKL.from_pretrained(
                vae_path, subfolder=_subfolder(vae_path, "vae"), torch_dtype=request.dtype("vae")
            )
            if cfg.pretrained_transformer_model_name_or_path:
                t_path, t_sub = cfg.pretrained_transformer_model_name_or_path, cfg.pretrained_transformer_subfolder
            else:
                t_path, t_sub = path, "transformer"
            transformer = HiDreamImageTransformer2DModel.from_pretrained(
                t_path, subfolder=t_sub, **request.pretrained_kwargs("transformer"), **common
            )
            scheduler_config = diffusers.UniPCMultistepScheduler.load_config(path, subfolder="scheduler", **common)
            scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Could not load the HiDream model from {path!r}: {str(exc).splitlines()[0]}; check "
                "pretrained_model_name_or_path and pretrained_text_encoder_4_model_name_or_path (local folders, "
                "or Hub ids you can access — gated repositories need `huggingface-cli login`)."
            ) from exc
        # HiDream's quickstart: VAE tiling and slicing keep 1024² encodes within 24 GB.
        vae.enable_tiling()
        vae.enable_slicing()
        for module in (*encoders.values(), vae, transformer):
            module.requires_grad_(False)
            module.eval()
        for encoder in encoders.values():
            encoder.to(request.device)
        vae.to(request.device)
        self.max_image_tokens = int(transformer.max_seq)
        return Components(
            transformer=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers, scheduler=scheduler
        )

    # -- text ----------------------------------------------------------------------------------------
    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption: pooled CLIP-L ⊕ CLIP-G, T5's token embeddings, and the hidden states of the
        Llama layers the transformer reads (``llama_layers``), in the training dtype. Under
        ``hidream_text_padding=trim`` only the real tokens are kept (Llama padded on the right, so
        its real tokens are exactly the unpadded encoding's); ``pipeline`` keeps the padded
        sequences ``HiDreamImagePipeline.encode_prompt`` gives."""
        import torch

        from stune._defaults import weight_dtype

        encoders, tokenizers = components.text_encoders, components.tokenizers
        length = self.config.tokenizer_max_length or MAX_T5_TOKENS
        trim = self.options.hidream_text_padding == "trim"
        dtype = weight_dtype(self.config)
        pooled = torch.cat(
            [
                _clip_pooled(tokenizers[t], encoders[e], prompts, length)
                for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
            ],
            dim=-1,
        )
        t5_tok, t5 = tokenizers["tokenizer_3"], encoders["text_encoder_3"]
        t5_in = t5_tok(
            prompts,
            padding="max_length",
            max_length=min(length, t5_tok.model_max_length),
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        t5_embeds = t5(t5_in.input_ids.to(t5.device), attention_mask=t5_in.attention_mask.to(t5.device))[0]
        llama_tok, llama = tokenizers["tokenizer_4"], encoders["text_encoder_4"]
        # The transformer reads T5's and Llama's sequences; the CLIPs give only pooled vectors.
        for key, tokenizer, limit, main in (
            ("text_encoder", tokenizers["tokenizer"], min(length, 218), False),
            ("text_encoder_2", tokenizers["tokenizer_2"], min(length, 218), False),
            ("text_encoder_3", t5_tok, min(length, t5_tok.model_max_length), True),
            ("text_encoder_4", llama_tok, min(length, llama_tok.model_max_length), True),
        ):
            self.note_truncation(tokenizer, prompts, limit, self.slot_label(key), main=main)
        llama_in = llama_tok(
            prompts,
            padding="max_length",
            max_length=min(length, llama_tok.model_max_length),
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
            **({"padding_side": "right"} if trim else {}),
        )
        # The base model gives the same hidden states as the causal-LM wrapper without computing logits.
        states = llama.base_model(
            llama_in.input_ids.to(llama.device),
            attention_mask=llama_in.attention_mask.to(llama.device),
            output_hidden_states=True,
        ).hidden_states[1:]
        layers = self._llama_layers_read(components)
        stacked = torch.stack([states[k] for k in layers], dim=1)  # (B, layers, tokens, dim)
        out = []
        for i in range(len(prompts)):
            t5_keep = t5_in.attention_mask[i].bool() if trim else slice(None)
            llama_keep = llama_in.attention_mask[i].bool() if trim else slice(None)
            out.append(
                {
                    POOLED: pooled[i].to("cpu", dtype),
                    T5: t5_embeds[i].cpu()[t5_keep].to(dtype),
                    LLAMA: stacked[i].cpu()[:, llama_keep].to(dtype),
                    LAYERS: torch.tensor(layers, dtype=torch.int64),
                }
            )
        return out

    def _llama_layers_read(self, components: Components) -> list[int]:
        config = getattr(components.transformer, "config", None)
        layers = getattr(config, "llama_layers", None)
        if not layers:
            raise UserError("The HiDream transformer's config has no llama_layers; it is not a HiDream-I1 transformer.")
        return sorted(set(int(k) for k in layers))

    def collate_embeds(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad the captions of a batch to its longest T5 and Llama sequences and mark the real
        tokens in ``t5_mask`` / ``llama_mask`` (what the masked attention processor reads)."""
        import torch

        layers = entries[0][LAYERS]
        if any(not torch.equal(e[LAYERS], layers) for e in entries):
            raise UserError("Cached HiDream captions hold different Llama layers; delete the text cache and run again.")
        batch: dict[str, torch.Tensor] = {
            POOLED: torch.stack([e[POOLED] for e in entries]),
            LAYERS: torch.stack([e[LAYERS] for e in entries]),
        }
        for key, mask_key, token_dim in ((T5, T5_MASK, 0), (LLAMA, LLAMA_MASK, 1)):
            lengths = [e[key].shape[token_dim] for e in entries]
            longest = max(lengths)
            padded, masks = [], []
            for entry, count in zip(entries, lengths, strict=True):
                value = entry[key]
                pad = [0, 0] * (value.dim() - token_dim - 1) + [0, longest - count]
                padded.append(torch.nn.functional.pad(value, pad))
                masks.append(torch.arange(longest) < count)
            batch[key] = torch.stack(padded)
            batch[mask_key] = torch.stack(masks)
        return batch

    # -- latents -------------------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        vae = components.vae
        dist = vae.encode(pixels).latent_dist
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
        return {"mean": ((dist.mean - shift) * scale).float(), "std": (dist.std * scale).float()}

    # -- forward ---------------------------------------------------------------------------------------
    def predict(self, transformer: torch.nn.Module, inputs: StepInputs) -> Prediction:
        import torch

        model = _unwrap(transformer)
        state = _attach(model)
        latents = inputs.noisy_latents
        h, w = latents.shape[-2:]
        image_tokens = (h // 2) * (w // 2)
        if h != w and image_tokens > model.max_seq:  # non-square grids are padded to max_seq
            raise UserError(
                f"A {w * 8}×{h * 8} bucket has {image_tokens} image tokens, more than this HiDream transformer's "
                f"{model.max_seq}; lower the resolution (HiDream's canvas is at most 1024² pixels)."
            )
        embeds = inputs.embeds
        state.attention.text_keep = _text_keep(embeds)
        training = model.training and not model.config.force_inference_output
        collect = training and torch.is_grad_enabled()
        with state.gates.collecting(collect, self.options.hidream_use_load_balancing_loss):
            out = transformer(
                hidden_states=latents,
                timesteps=inputs.timesteps,  # fp32: bf16 rounds timesteps near 1000 to multiples of 4
                encoder_hidden_states_t5=embeds[T5],
                encoder_hidden_states_llama3=_llama_stack(embeds, model.config.llama_layers),
                pooled_embeds=embeds[POOLED],
                return_dict=False,
            )[0]
        # HiDream predicts the inverted velocity (its pipeline negates the output too).
        velocity = -_to_latents(out, h, w, model.config.patch_size, training)
        prediction = Prediction(velocity)
        if collect:
            prediction.metrics.update(state.gates.usage())
            balance = state.gates.loss()
            if balance is not None:
                weight = self.options.hidream_load_balancing_loss_weight
                prediction.aux_losses["load_balancing"] = AuxLoss(balance, weight)
        return prediction

    # -- outputs -----------------------------------------------------------------------------------------
    def render_validation(
        self, components: Components, transformer: torch.nn.Module, requests: list[ValidationRequest]
    ) -> list[Image.Image]:
        """HiDreamImagePipeline on the cached embeddings, with CFG against the negative prompt when
        ``validation_guidance`` > 1 (the pipeline's rule). The pipeline would rescale every image to
        a 1024² area; the images are rendered at the size asked for, as their file names say."""
        import torch
        from diffusers import HiDreamImagePipeline

        cfg = self.config
        model = _unwrap(transformer)
        state = _attach(model)
        pipe = HiDreamImagePipeline(
            scheduler=components.scheduler,
            vae=components.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
            text_encoder_4=None,
            tokenizer_4=None,
            transformer=transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        device = next(transformer.parameters()).device
        dtype = components.vae.dtype
        cfg_on = cfg.validation_guidance > 1.0
        images = []
        for request in requests:
            entries = [request.embeds]
            if cfg_on:
                if request.negative_embeds is None:
                    raise UserError("HiDream validation with validation_guidance above 1 needs a negative prompt.")
                entries = [request.negative_embeds, request.embeds]  # the pipeline batches [negative; prompt]
            batch = {k: v.to(device) for k, v in self.collate_embeds(entries).items()}
            state.attention.text_keep = _text_keep(batch)
            llama = _llama_stack(batch, model.config.llama_layers).to(dtype)
            t5, pooled = batch[T5].to(dtype), batch[POOLED].to(dtype)
            kwargs: dict[str, Any] = {
                "prompt_embeds_t5": t5[-1:],
                "prompt_embeds_llama3": llama[:, -1:],
                "pooled_prompt_embeds": pooled[-1:],
            }
            if cfg_on:
                kwargs |= {
                    "negative_prompt_embeds_t5": t5[:1],
                    "negative_prompt_embeds_llama3": llama[:, :1],
                    "negative_pooled_prompt_embeds": pooled[:1],
                }
            pipe.default_sample_size = _sample_size_for(request.width, request.height, pipe.vae_scale_factor)
            output = pipe(
                **kwargs,
                width=request.width,
                height=request.height,
                num_inference_steps=cfg.validation_num_inference_steps,
                guidance_scale=cfg.validation_guidance,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                max_sequence_length=cfg.tokenizer_max_length or MAX_T5_TOKENS,
                **_preview_callback(pipe, request, components.extras.get("preview_autoencoder")),
            )
            images.append(output.images[0])
        return images

    def loading_example(self, output_dir: Path) -> str:
        llama, sub = self.llama_location()
        lines = ["    import torch", "    from diffusers import HiDreamImagePipeline"]
        extra = ""
        if self.config.model_type == "full":
            lines += [
                "    from diffusers import HiDreamImageTransformer2DModel",
                "    transformer = HiDreamImageTransformer2DModel.from_pretrained(",
                f"        {str(output_dir / 'transformer')!r}, torch_dtype=torch.bfloat16",
                "    )",
            ]
            extra = " transformer=transformer,"
        if llama == self.model_path():  # the base folder holds text_encoder_4/ and tokenizer_4/ itself
            lines.append(
                f"    pipe = HiDreamImagePipeline.from_pretrained({llama!r},{extra} torch_dtype=torch.bfloat16)"
            )
        else:
            tok_sub, enc_sub = (", subfolder='tokenizer_4'", ", subfolder='text_encoder_4'") if sub else ("", "")
            lines += [
                "    from transformers import AutoTokenizer, LlamaForCausalLM",
                f"    llama = {llama!r}",
                "    pipe = HiDreamImagePipeline.from_pretrained(",
                f"        {self.model_path()!r},{extra} torch_dtype=torch.bfloat16,",
                f"        tokenizer_4=AutoTokenizer.from_pretrained(llama{tok_sub}),",
                f"        text_encoder_4=LlamaForCausalLM.from_pretrained(llama{enc_sub}, torch_dtype=torch.bfloat16),",
                "    )",
            ]
        weights = str(output_dir / "pytorch_lora_weights.safetensors")
        if self.config.model_type == "lora" and self.config.lora_type == "lycoris":
            lines += [
                "    from lycoris import create_lycoris_from_weights",
                f"    wrapper, _ = create_lycoris_from_weights(1.0, {weights!r}, pipe.transformer)",
                "    wrapper.merge_to()",
            ]
        elif self.config.model_type == "lora":
            lines.append(f"    pipe.load_lora_weights({str(output_dir)!r})")
        lines.append('    image = pipe("your prompt", num_inference_steps=50, guidance_scale=5.0).images[0]')
        return "\n".join(lines)

    @classmethod
    def build_demo(cls, workdir: Path) -> Path:
        from stune_hidream.tiny import build_demo

        return build_demo(workdir)


# -- pieces of the forward ------------------------------------------------------------------------------


def _backend(precision: str | None) -> str | None:
    """The quantization backend of a precision name (``int8-quanto`` → ``quanto``, ``fp8wo-torchao`` →
    ``torchao``); None for no_change and plain dtypes (``bf16``)."""
    if precision in NO_CHANGE or "-" not in str(precision):
        return None
    return str(precision).split("-", 1)[1]


def _subfolder(path: str, name: str) -> str | None:
    """A local folder that is itself a component (has config.json) has no subfolder."""
    local = Path(path)
    if local.is_dir() and (local / "config.json").is_file() and not (local / name).is_dir():
        return None
    return name


def _clip_pooled(tokenizer: Any, encoder: Any, prompts: list[str], length: int) -> torch.Tensor:
    """CLIP's projected pooled embedding, tokenized as HiDreamImagePipeline does (up to 218 tokens)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=min(length, 218), truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids.to(encoder.device), output_hidden_states=True)[0]


def _text_keep(embeds: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which text tokens of the transformer's text sequence ``[T5; Llama; Llama]`` are real, per
    sample; None when none is padding (then attention is diffusers' own)."""
    import torch

    t5, llama = embeds.get(T5_MASK), embeds.get(LLAMA_MASK)
    if t5 is None or llama is None:
        return None
    keep = torch.cat([t5, llama, llama], dim=1).bool()
    return None if bool(keep.all()) else keep


def _llama_stack(embeds: dict[str, torch.Tensor], llama_layers: list[int]) -> torch.Tensor:
    """The ``(layers, B, tokens, dim)`` stack the transformer indexes by ``llama_layers``, from the
    cached ``(B, stored layers, tokens, dim)`` (only the layers read are stored)."""
    stored = [int(k) for k in embeds[LAYERS][0].tolist()]
    states = embeds[LLAMA].transpose(0, 1)
    if stored == list(range(len(stored))) and max(llama_layers) < len(stored):
        return states
    missing = sorted(set(llama_layers) - set(stored))
    if missing:
        raise UserError(
            f"The cached Llama states lack layers {missing} this transformer reads; delete the text cache and run again."
        )
    full = states.new_zeros((max(llama_layers) + 1, *states.shape[1:]))
    full[stored] = states
    return full


def _to_latents(out: torch.Tensor, h: int, w: int, patch: int, training: bool) -> torch.Tensor:
    """The transformer's output in the latent layout ``(B, C, h, w)``. In eval mode diffusers
    already returns that; in training mode it returns ``(B, C, tokens, p·p)`` with the tokens
    row-major over the patch grid (padded to max_seq for non-square grids) and each patch's p×p
    pixels row-major."""
    if not training:
        return out
    b, c = out.shape[:2]
    rows, cols = h // patch, w // patch
    grid = out[:, :, : rows * cols].reshape(b, c, rows, cols, patch, patch)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, rows * patch, cols * patch)


def _sample_size_for(width: int, height: int, vae_scale_factor: int) -> float:
    """A ``default_sample_size`` for which HiDreamImagePipeline keeps ``width`` × ``height``: it
    scales every request to the area of ``(default_sample_size · vae_scale_factor)²`` and rounds
    down to 16 px, so the area is the request's, a hair above to survive the rounding."""
    return math.sqrt(width * height) / vae_scale_factor * (1 + 1e-6)


def _preview_callback(pipe: Any, request: ValidationRequest, tiny: Any = None) -> dict[str, Any]:
    """``callback_on_step_end`` decoding the latents every ``request.preview_every`` steps, with the
    tiny autoencoder (taef1, scaled by its own config as a drop-in VAE) when there is one."""
    if request.preview is None or not request.preview_every:
        return {}
    import torch

    vae = tiny if tiny is not None else pipe.vae

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if (step + 1) % request.preview_every == 0:
            with torch.no_grad():
                latents = tensors["latents"] / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
                decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
                request.preview(step + 1, pipeline.image_processor.postprocess(decoded, output_type="pil")[0])  # type: ignore[misc]
        return {}

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


# -- what the family installs into a transformer, once ------------------------------------------------


class _Gates:
    """Forward hooks on every ``MoEGate``: while :meth:`collecting`, keep each gate's
    load-balancing loss (in the graph) and how many routed assignments each expert got.

    diffusers' gate returns ``α · Σ_e P_e · f_e`` (α = its ``alpha``, 0.01) and the feed-forward
    drops it; the hooks keep ``Σ_e P_e · f_e`` so the family's weight is the only one applied.
    Gradient checkpointing re-runs the gates in backward; the hooks ignore those runs (collection
    is off by then).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from diffusers.models.transformers.transformer_hidream_image import MoEGate

        self.active = False
        self.want_loss = False
        self.losses: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.gates = [m for m in model.modules() if isinstance(m, MoEGate)]
        for gate in self.gates:
            gate.register_forward_hook(self._record)

    def _record(self, gate: Any, args: Any, output: Any) -> None:
        if not self.active:
            return
        import torch

        chosen, _weights, loss = output
        if self.want_loss and loss is not None and gate.alpha > 0:
            self.losses.append(loss / gate.alpha)
        self.counts.append(torch.bincount(chosen.reshape(-1), minlength=gate.n_routed_experts))

    @contextlib.contextmanager
    def collecting(self, active: bool, want_loss: bool) -> Iterator[None]:
        self.active, self.want_loss = active, want_loss
        self.losses, self.counts = [], []
        try:
            yield
        finally:
            self.active = False

    def loss(self) -> torch.Tensor | None:
        import torch

        if not self.losses:
            return None
        return torch.stack([loss.float() for loss in self.losses]).sum()

    def usage(self) -> dict[str, float]:
        """Share of the routed assignments each expert got, per MoE layer: min, max and mean over
        every (layer, expert) pair (1 / experts when perfectly balanced)."""
        import torch

        if not self.counts:
            return {}
        counts = torch.stack(self.counts).float()
        shares = counts / counts.sum(dim=1, keepdim=True)
        low, high, mean = torch.stack([shares.min(), shares.max(), shares.mean()]).tolist()
        return {"moe/expert_share_min": low, "moe/expert_share_max": high, "moe/expert_share_mean": mean}


@functools.cache
def _masked_attention_class() -> type:
    from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor, apply_rope

    class MaskedAttention(HiDreamAttnProcessor):  # type: ignore[misc]
        """HiDream's attention with a batch's text padding masked out of the keys.

        ``text_keep`` (B, text tokens) is set before every forward; the text is the separate
        stream in double-stream blocks and the sequence's tail in single-stream ones (routers
        drop image tokens only, so that stays true). Without padding it is diffusers' own
        processor. It stays set until the next forward, so gradient checkpointing's recompute in
        backward sees the same mask.
        """

        def __init__(self) -> None:
            super().__init__()
            self.text_keep: torch.Tensor | None = None

        def __call__(
            self,
            attn: Any,
            hidden_states: torch.Tensor,
            hidden_states_masks: torch.Tensor | None = None,
            encoder_hidden_states: torch.Tensor | None = None,
            image_rotary_emb: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            keep = self.text_keep
            if keep is None:
                return super().__call__(
                    attn, hidden_states, hidden_states_masks, encoder_hidden_states, image_rotary_emb, *args, **kwargs
                )
            import torch
            import torch.nn.functional as F

            dtype, batch = hidden_states.dtype, hidden_states.shape[0]

            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads)

            query = heads(attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype))
            key = heads(attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype))
            value = heads(attn.to_v(hidden_states))
            if hidden_states_masks is not None:  # image padding: diffusers zeroes those keys
                key = key * hidden_states_masks.view(batch, -1, 1, 1)
            image_tokens = query.shape[1]
            if not attn.single:
                query = torch.cat([query, heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype))], 1)
                key = torch.cat([key, heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype))], 1)
                value = torch.cat([value, heads(attn.to_v_t(encoder_hidden_states))], 1)
            total = query.shape[1]
            if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
                query, key = apply_rope(query, key, image_rotary_emb)
            else:
                q1, q2 = query.chunk(2, dim=-1)
                k1, k2 = key.chunk(2, dim=-1)
                q1, k1 = apply_rope(q1, k1, image_rotary_emb)
                query, key = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
            attend = torch.cat([keep.new_ones(batch, total - keep.shape[1]), keep], dim=1)[:, None, None, :]
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attend
            )
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
            if attn.single:
                return attn.to_out(out)
            return attn.to_out(out[:, :image_tokens]), attn.to_out_t(out[:, image_tokens:])

    return MaskedAttention


class _Installed:
    """What :func:`_attach` put into one transformer."""

    def __init__(self, model: torch.nn.Module) -> None:
        from diffusers.models.transformers.transformer_hidream_image import HiDreamAttention

        self.gates = _Gates(model)
        self.attention = _masked_attention_class()()
        for module in model.modules():
            if isinstance(module, HiDreamAttention):
                module.set_processor(self.attention)


_INSTALLED: weakref.WeakKeyDictionary[Any, _Installed] = weakref.WeakKeyDictionary()


def _unwrap(transformer: torch.nn.Module) -> Any:
    """The transformer itself, out of a distributed wrapper (``.module``) or torch.compile (``._orig_mod``)."""
    model: Any = transformer
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _attach(model: torch.nn.Module) -> _Installed:
    """The gate hooks and the masked attention processor of ``model`` (unwrapped), installed on
    first use: module hooks and a processor, never a copy of the transformer."""
    if model not in _INSTALLED:
        _INSTALLED[model] = _Installed(model)
    return _INSTALLED[model]
