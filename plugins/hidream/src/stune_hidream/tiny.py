"""A tiny random-weight HiDream-I1 pipeline, for the demo and the tests.

The components are the real classes at toy sizes — ``HiDreamImageTransformer2DModel`` (2 double-
and 2 single-stream blocks, 4 routed experts with 2 active, as the real model),
``AutoencoderKL``, two ``CLIPTextModelWithProjection`` (with Long-CLIP's 248 positions, since
HiDream tokenizes CLIP at 128 tokens), a ``T5EncoderModel`` and a ``LlamaForCausalLM`` — with the
four tokenizers trained on the fly from a small caption corpus, saved by
``HiDreamImagePipeline.save_pretrained`` so training loads them through the same
``from_pretrained`` code as a real checkpoint. The Llama has 5 layers and the transformer reads
layers 0, 2 and 4 (``llama_layers``), so "store only the layers the transformer reads" is visible.

The demo (:func:`build_demo`) trains this pipeline's VAE and transformer on shapes first; what is
the same for every family is in :mod:`stune.demo_assets`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

#: Llama layers the tiny transformer reads, one per block (double blocks first), as the real
#: model's ``llama_layers`` does with 48 entries over 32 layers.
TINY_LLAMA_LAYERS = [0, 2, 4, 4]
#: the demo transformer's heads (16 wide each): more than the tests' model, so that a short
#: pre-training on shapes shows
DEMO_HEADS = 4


def _corpus() -> list[str]:
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle")
    words = [f"a {c} {s} on a {b} background" for c in colours for s in shapes for b in colours if b != c]
    extra = [
        "a picture number 0 1 2 3 4 5 6 7 8 9",
        "a photo of a cat",
        "a painting of a house",
        "the quick brown fox jumps over the lazy dog",
        "blurry, cropped, ugly",
        "the name of your subject goes here",
    ]
    return (words + extra) * 4


def _llama_tokenizer(corpus: list[str]) -> Any:
    """A byte-level BPE tokenizer shaped like Llama 3's: BOS added, EOS ``<|eot_id|>``, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, model_max_length=131072)


def build_tiny_hidream(path: Path, seed: int = 0, *, num_attention_heads: int = 2) -> Path:
    """Save a tiny HiDream-I1 pipeline (random weights) at ``path``; returns ``path``."""
    import torch
    from diffusers import AutoencoderKL, HiDreamImagePipeline, HiDreamImageTransformer2DModel, UniPCMultistepScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    corpus = _corpus()
    clip_tok = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=600, show_progress=False)
    clip_tok.model_max_length = 77
    clip_tok_2 = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=600, show_progress=False)
    clip_tok_2.model_max_length = 77
    t5_tok = T5Tokenizer(extra_ids=0).train_new_from_iterator(corpus, vocab_size=300, show_progress=False)
    t5_tok.model_max_length = 512
    llama_tok = _llama_tokenizer(corpus)

    torch.manual_seed(seed)
    hidden = 32

    def clip(tokenizer: Any, projection: int) -> Any:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=248,  # Long-CLIP: HiDream tokenizes CLIP at up to 218 tokens
                projection_dim=projection,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    text_encoder, text_encoder_2 = clip(clip_tok, 8), clip(clip_tok_2, 8)
    text_encoder_3 = T5EncoderModel(
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
    text_encoder_4 = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tok),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=llama_tok.bos_token_id,
            eos_token_id=llama_tok.eos_token_id,
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
        sample_size=256,  # tiles above 256 px (the real FLUX VAE: 1024)
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=num_attention_heads,
        caption_channels=[hidden, hidden],  # [T5, Llama] widths
        text_emb_dim=16,  # CLIP-L + CLIP-G projections
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),
        max_resolution=(16, 16),  # 64 image tokens: images up to 128×128 px
        llama_layers=TINY_LLAMA_LAYERS,
    )
    # HiDream-I1-Full samples with flow UniPC (shift 3).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    pipe = HiDreamImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
        text_encoder_4=text_encoder_4,
        tokenizer_4=llama_tok,
        transformer=transformer,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_dataset(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Coloured shapes with a caption ``.txt`` beside each image."""
    from stune import demo_assets

    chosen = demo_assets.random_pictures(count, list(demo_assets.PALETTE), seed)
    return demo_assets.write_pictures(folder, chosen, size=size, seed=seed)


def build_demo(workdir: Path) -> Path:
    """The demo under ``workdir``: the tiny HiDream model with a trained VAE and a base transformer
    pre-trained on shapes (built once, kept in ``workdir/model``), the concept pictures and a LoKr
    config; returns the config's path."""
    from stune import demo_assets

    model = workdir / "model"
    family = {
        "model_family": "hidream",
        "tokenizer_max_length": 32,
        "validation_guidance": 3.0,
        "hidream_use_load_balancing_loss": True,
    }
    demo_assets.build_demo_model(model, partial(build_tiny_hidream, num_attention_heads=DEMO_HEADS), "hidream", family)
    lycoris = workdir / "config" / "lycoris_config.json"
    lycoris.parent.mkdir(parents=True, exist_ok=True)
    lycoris.write_text(
        json.dumps(
            {
                "algo": "lokr",
                "multiplier": 1.0,
                "linear_dim": 16384,
                "linear_alpha": 1,
                "full_matrix": True,
                "use_scalar": True,
                "factor": 4,
                "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 4}}},
            },
            indent=2,
        )
    )
    # LoKr's Kronecker factors move slower than a LoRA's matrices: it gets a larger learning rate.
    lokr = {"lora_type": "lycoris", "lycoris_config": str(lycoris), "learning_rate": "1e-2"}
    return demo_assets.write_demo_run(workdir, model, {**family, **lokr})
