"""A tiny random-weight SD3 pipeline and a generated dataset, for the demo and the tests.

The components are the real classes — SD3Transformer2DModel (dual attention and RMS q/k norm in
its first blocks, as in SD3.5 Medium), AutoencoderKL, two CLIPTextModelWithProjection encoders and
a T5EncoderModel, FlowMatchEulerDiscreteScheduler — at toy sizes, with CLIP and T5 tokenizers
trained on the fly from a small caption corpus, saved by ``StableDiffusion3Pipeline.save_pretrained``
in the standard diffusers layout, so training loads them through the same ``from_pretrained``
code as a real checkpoint.

The widths differ on purpose so that the SD3 text layout is exercised: CLIP-L (16) + CLIP-G (24)
hidden states are concatenated to 40 features and zero-padded to the T5 width (48); the pooled
embedding is 16 + 24 = 40 wide. Ten blocks leave room for the seed's skip-layer guidance layers
``[7, 8, 9]``.

The demo (:func:`build_demo`) trains a shallower, wider pipeline's VAE and transformer on shapes first;
what is the same for every family is in :mod:`stune.demo_assets`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 16, 24, 48
NUM_LAYERS = 10
#: the demo transformer: fewer blocks, more heads (8 wide each) than the tests' model, so that a
#: short pre-training on shapes shows
DEMO_LAYERS, DEMO_HEADS = 4, 8


def caption_corpus() -> list[str]:
    captions = [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if b != c]
    return [*captions, "a photo of a cat", "a painting of a house", "blurry, cropped, ugly", "a picture number 1"]


def _clip(width: int, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny_sd3(path: Path, seed: int = 0, *, num_layers: int = NUM_LAYERS, num_attention_heads: int = 2) -> Path:
    """Save a tiny SD3 pipeline (random weights) at ``path``; returns ``path``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    corpus = caption_corpus() * 4
    clip_tok = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=600, show_progress=False)
    clip_tok.model_max_length = 77
    t5_tok = T5Tokenizer(extra_ids=0).train_new_from_iterator(corpus, vocab_size=300, show_progress=False)
    t5_tok.model_max_length = 512

    torch.manual_seed(seed)
    text_encoder = _clip(CLIP_L_WIDTH, clip_tok)
    text_encoder_2 = _clip(CLIP_G_WIDTH, clip_tok)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=T5_WIDTH,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        # No attention in the mid block: the seed configs validate at 1024×1024 and 1280×768, where it
        # would attend over 16k latent pixels and dominate a CPU test run.
        mid_block_add_attention=False,
        scaling_factor=1.5305,  # SD3's VAE values
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=8 * num_attention_heads,  # the joint attention's width
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        out_channels=16,
        pos_embed_max_size=96,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_dataset(folder: Path, count: int = 12, size: int = 96, seed: int = 0) -> Path:
    """Coloured shapes with a caption .txt beside each image."""
    from stune import demo_assets

    chosen = demo_assets.random_pictures(count, list(demo_assets.PALETTE), seed)
    return demo_assets.write_pictures(folder, chosen, size=size, seed=seed)


def build_demo(workdir: Path) -> Path:
    """The demo under ``workdir``: the tiny SD3 model with a trained VAE and a base transformer
    pre-trained on shapes (built once, kept in ``workdir/model``), the concept pictures and the
    LoRA config; returns the config's path."""
    from stune import demo_assets

    model = workdir / "model"
    # Guidance 3 washes a briefly trained model out to its background colour.
    family = {"model_family": "sd3", "tokenizer_max_length": 32, "validation_guidance": 1.5}
    build = partial(build_tiny_sd3, num_layers=DEMO_LAYERS, num_attention_heads=DEMO_HEADS)
    demo_assets.build_demo_model(model, build, "sd3", family)
    return demo_assets.write_demo_run(workdir, model, family)
