"""A toy model family written the way a third party would: one file, only public stune API.

It is deliberately *not* FLUX-shaped: a plain DiT (patchify → self-attention, cross-attention to
one CLIP encoder's tokens, MLP, adaLN timestep conditioning → unpatchify), a 4-channel VAE with a
scale factor of 2, one text encoder and no scheduler. The file is a stune plugin usable both as
``st-train --plugin /path/to/toy_family.py`` and as a module object handed to
``PluginHost.build(plugins=[module])``. :func:`build_toy_model` saves a random-weight model in a
diffusers-like folder layout (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``).
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from torch import nn
from torch.nn import functional as F

import stune
from stune.family import Components, LoadRequest, ModelFamily, TextEncoderSlot, ValidationRequest
from stune.layout import Arg, BlockList, ForwardTokens, Segment, TokenLayout
from stune.step import Prediction, StepInputs

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_PREFIX = "transformer."


# -------------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------------


def sinusoidal(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) → (N, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_embedding(grid_h: int, grid_w: int, dim: int, device: torch.device) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D sinusoidal embedding: any resolution works."""
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
    return torch.cat([sinusoidal(ys.flatten(), dim // 2), sinusoidal(xs.flatten(), dim // 2)], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(_attend(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens (keys/values)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.add_q = nn.Linear(dim, dim)
        self.add_k = nn.Linear(dim, dim)
        self.add_v = nn.Linear(dim, dim)
        self.add_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.add_out(_attend(self.add_q(x), self.add_k(context), self.add_v(context), self.heads))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, d)


class ToyBlock(nn.Module):
    """adaLN block: modulated self-attention, cross-attention, MLP (each with a gate)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift3, scale3, gate3 = self.ada(F.silu(temb))[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross(self.norm2(x), context)
        x = x + gate3 * self.mlp(self.norm3(x) * (1 + scale3) + shift3)
        return x


class ToyDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A tiny plain DiT on (B, C, H, W) latents, conditioned on sigma and text tokens."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        mlp_ratio: int = 2,
        text_dim: int = 32,
    ) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_channels * patch_size * patch_size, hidden_size)
        self.context_proj = nn.Linear(text_dim, hidden_size)
        self.time_mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.blocks = nn.ModuleList([ToyBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, in_channels * patch_size * patch_size)
        self.gradient_checkpointing = False

    def forward(
        self, hidden_states: torch.Tensor, sigmas: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        b, c, h, w = hidden_states.shape
        p = self.config.patch_size
        gh, gw = h // p, w // p
        # patchify: (B, C, H, W) → (B, gh*gw, C*p*p)
        tokens = hidden_states.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        x = self.proj_in(tokens)
        x = x + position_embedding(gh, gw, x.shape[-1], x.device).to(x.dtype)[None]
        temb = self.time_mlp(sinusoidal(sigmas.reshape(-1) * 1000, x.shape[-1]).to(x.dtype))
        context = self.context_proj(encoder_hidden_states.to(x.dtype))
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, context, temb)
            else:
                x = block(x, context, temb)
        shift, scale = self.ada_out(F.silu(temb))[:, None].chunk(2, dim=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        # unpatchify: (B, gh*gw, C*p*p) → (B, C, H, W)
        return x.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# -------------------------------------------------------------------------------------------------
# A random-weight model on disk
# -------------------------------------------------------------------------------------------------

CORPUS = [f"a picture number {i}" for i in range(10)] + [
    "a photo of a cat",
    "a painting of a house",
    "the quick brown fox jumps over the lazy dog",
]


def build_toy_model(path: Path, seed: int = 0) -> Path:
    """Save a tiny random toy model (transformer, VAE, CLIP text encoder + tokenizer) at ``path``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer().train_new_from_iterator(CORPUS * 4, vocab_size=300)
    tokenizer.model_max_length = 16
    torch.manual_seed(seed)
    hidden = 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=ToyFamily.latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    transformer = ToyDiT(
        in_channels=ToyFamily.latent_channels, hidden_size=32, num_layers=2, num_heads=2, text_dim=hidden
    )
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    return path


# -------------------------------------------------------------------------------------------------
# The family
# -------------------------------------------------------------------------------------------------


class ToyFamily(ModelFamily):
    name = "toy"
    description = "A toy DiT (tests only): one CLIP encoder, cross-attention, 4-channel latents at 1/2 scale."
    alignment = 16
    vae_scale_factor = 2
    latent_channels = 4
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {
        "attn": ("to_q", "to_k", "to_v", "to_out"),
        "cross": ("add_q", "add_k", "add_v", "add_out"),
    }
    default_lora_preset = "attn"
    text_encoder_slots = (TextEncoderSlot("text_encoder", "CLIP"),)
    quantization_exclusions = ("proj_in", "proj_out", "*.ada", "ada_out")
    #: No scheduler ships with the toy model: fixed resolution-shift parameters.
    SHIFT: ClassVar[tuple[int, int, float, float]] = (64, 1024, 0.5, 1.15)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, request: LoadRequest) -> Components:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        path = self.model_path()
        try:
            tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")}
            encoders: dict[str, Any] = {}
            if request.text_encoders:
                encoders["text_encoder"] = CLIPTextModel.from_pretrained(
                    path, subfolder="text_encoder", **request.pretrained_kwargs("text_encoder", "dtype")
                )
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=request.dtype("vae"))
            transformer = ToyDiT.from_pretrained(
                path, subfolder="transformer", **request.pretrained_kwargs("transformer")
            )
        except (OSError, ValueError) as exc:
            raise stune.UserError(
                f"Could not load the toy model from {path!r}: {str(exc).splitlines()[0]}; "
                "check pretrained_model_name_or_path."
            ) from exc
        for module in (*encoders.values(), vae, transformer):
            module.requires_grad_(False)
            module.eval()
        for encoder in encoders.values():
            encoder.to(request.device)
        vae.to(request.device)
        return Components(transformer=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers)

    # -- text and latents ------------------------------------------------------------------------
    def encode_prompts(self, components: Components, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        tokenizer = components.tokenizers["tokenizer"]
        encoder = components.text_encoders["text_encoder"]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids.to(encoder.device))
        return [
            {"tokens": out.last_hidden_state[i].cpu(), "pooled": out.pooler_output[i].cpu()}
            for i in range(len(prompts))
        ]

    def encode_images(self, components: Components, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        vae = components.vae
        dist = vae.encode(pixels).latent_dist
        scale = vae.config.scaling_factor
        return {"mean": (dist.mean * scale).float(), "std": (dist.std * scale).float()}

    def sequence_length(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // 2) * (latent_width // 2)  # patch size 2

    def shift_parameters(self, components: Components) -> tuple[int, int, float, float]:
        return self.SHIFT

    # -- training --------------------------------------------------------------------------------
    def predict(self, transformer: torch.nn.Module, inputs: StepInputs) -> Prediction:
        latents = inputs.noisy_latents
        tokens = inputs.embeds["tokens"].to(latents.dtype)
        return Prediction(transformer(latents, inputs.sigmas.to(latents.dtype), tokens))

    def token_layout(self) -> TokenLayout:
        """Every block takes the image tokens alone (``x``); the text comes in by cross-attention
        and positions are added before the blocks, so nothing else needs subsetting."""
        blocks = BlockList("blocks", Arg("x", 0), (Segment("image", routable=True),), count_key="num_layers")
        return TokenLayout((blocks,), patch_size=2)

    def forward_tokens(self, inputs: StepInputs) -> ForwardTokens:
        rows, cols = (side // 2 for side in inputs.noisy_latents.shape[-2:])
        return ForwardTokens({"image": rows * cols}, (rows, cols))

    # -- outputs ---------------------------------------------------------------------------------
    def save_lora(self, output_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        path = Path(output_dir) / LORA_FILE
        tensors = {LORA_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        # PEFT keeps target_modules as a set; write it as a sorted list (as diffusers does).
        config = json.dumps(metadata, default=lambda v: sorted(v) if isinstance(v, set) else str(v), sort_keys=True)
        save_file(tensors, str(path), metadata={"format": "pt", "lora_config": config})
        return path

    def load_lora(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / LORA_FILE
        return {k[len(LORA_PREFIX) :]: v for k, v in load_file(str(path)).items() if k.startswith(LORA_PREFIX)}

    def render_validation(
        self, components: Components, transformer: torch.nn.Module, requests: list[ValidationRequest]
    ) -> list[Any]:
        from PIL import Image

        vae = components.vae
        param = next(transformer.parameters())
        device, dtype = param.device, vae.dtype
        steps = self.config.validation_num_inference_steps
        sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        images = []
        for request in requests:
            shape = (
                1,
                self.latent_channels,
                request.height // self.vae_scale_factor,
                request.width // self.vae_scale_factor,
            )
            generator = torch.Generator("cpu").manual_seed(request.seed)
            x = torch.randn(shape, generator=generator).to(device, dtype)
            embeds = {k: v[None].to(device, dtype) for k, v in request.embeds.items()}
            for sigma, sigma_next in pairwise(sigmas):
                velocity = transformer(x, torch.full((1,), sigma, device=device, dtype=dtype), embeds["tokens"])
                x = x + (sigma_next - sigma) * velocity.to(dtype)
            decoded = vae.decode(x.to(vae.device) / vae.config.scaling_factor).sample[0]
            pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images.append(Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()))
        return images


# -------------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------------


@stune.hookimpl
def register_families(register: Any) -> None:
    register(ToyFamily)
