"""A tiny random-weight FLUX pipeline and a generated dataset, for the demo and the tests.

The components are the real classes (FluxTransformer2DModel, AutoencoderKL, CLIPTextModel,
T5EncoderModel, FlowMatchEulerDiscreteScheduler) at toy sizes, with CLIP and T5 tokenizers
trained on the fly from a small caption corpus, saved in the standard diffusers folder layout,
so training loads them through the same ``from_pretrained`` code as a real checkpoint.

The demo (:func:`build_demo`) trains this pipeline's VAE and transformer on shapes first; what is
the same for every family is in :mod:`stune.demo_assets`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
#: the demo transformer's heads (16 wide each): wider than the tests' model, so that a short
#: pre-training on shapes shows
DEMO_HEADS = 8


def caption_corpus() -> list[str]:
    words = [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if b != c]
    return [*words, "a photo of a cat", "a painting of a house", "the quick brown fox jumps over the lazy dog"]


def build_tiny_flux(
    path: Path, seed: int = 0, *, num_single_layers: int = 2, guidance_embeds: bool = True, num_attention_heads: int = 2
) -> Path:
    """Save a tiny FLUX pipeline (random weights) at ``path``; returns ``path``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    corpus = caption_corpus() * 4
    clip_tok = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=600, show_progress=False)
    clip_tok.model_max_length = 77
    t5_tok = T5Tokenizer(extra_ids=0).train_new_from_iterator(corpus, vocab_size=300, show_progress=False)
    t5_tok.model_max_length = 512

    torch.manual_seed(seed)
    hidden = 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=hidden,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=hidden,
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
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=hidden,
        pooled_projection_dim=hidden,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
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
    """The demo under ``workdir``: the tiny FLUX model with a trained VAE and a base transformer
    pre-trained on shapes (built once, kept in ``workdir/model``), the concept pictures and the
    LoRA config; returns the config's path."""
    from stune import demo_assets

    model = workdir / "model"
    # The guidance embedding only ever sees flux_guidance_value (1.0) while the base trains.
    family = {"model_family": "flux", "tokenizer_max_length": 32, "validation_guidance": 1.0}
    demo_assets.build_demo_model(model, partial(build_tiny_flux, num_attention_heads=DEMO_HEADS), "flux", family)
    return demo_assets.write_demo_run(workdir, model, family)
