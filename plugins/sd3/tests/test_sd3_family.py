"""The SD3 family without training: options and their checks, text encoding against the diffusers
pipeline, dropped-caption embeddings, cache identities, the forward, the token layout and
skip-layer guidance in validation, all on the tiny random SD3 pipeline."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from stune.config import validate_config
from stune.data.cache import DROPPED_CAPTION, TextEmbedCache
from stune.errors import ConfigError, UserError
from stune.family import LoadRequest, ValidationRequest, match_modules
from stune.layout import BlockList, ForwardTokens, Selection
from stune.plugins import PluginHost
from stune.testing import step_inputs

from .helpers import family

PROMPTS = ["a red circle on a blue background", "a photo of a cat"]


@pytest.fixture(scope="module")
def loaded(tiny_sd3_dir: Path) -> tuple[Any, Any]:
    fam = family(pretrained_model_name_or_path=str(tiny_sd3_dir), mixed_precision="no", tokenizer_max_length=77)
    return fam, fam.load(LoadRequest(torch.device("cpu"), torch.float32))


def _pipeline(components: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=components.transformer,
        scheduler=components.scheduler,
        vae=components.vae,
        **components.text_encoders,
        **components.tokenizers,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- options and checks ------------------------------------------------------------------------------


def test_flavours_and_model_paths() -> None:
    assert family().model_path() == "stabilityai/stable-diffusion-3.5-medium"
    assert family(model_flavour="large").model_path() == "stabilityai/stable-diffusion-3.5-large"
    old = "stabilityai/stable-diffusion-3-medium-diffusers"
    assert family(pretrained_model_name_or_path=old).model_path() == old
    with pytest.raises(ConfigError, match="not a sd3 flavour"):
        family(model_flavour="xl").check_config()
    defaults = family().config
    assert defaults.flow_schedule_shift == 3.0 and family().alignment == 64  # SD3's static 1024 px shift


def test_t5_token_length_default_limit_and_unlock(caplog: pytest.LogCaptureFixture) -> None:
    assert family().config.tokenizer_max_length == 154
    family(tokenizer_max_length=77).check_config()  # shorter saves cache space
    with pytest.raises(ConfigError, match=r"tokenizer_max_length 256 .* at most 154.*i_know_what_i_am_doing"):
        family(tokenizer_max_length=256).check_config()
    with caplog.at_level(logging.WARNING, logger="stune.sd3"):
        family(tokenizer_max_length=256, i_know_what_i_am_doing=True).check_config()
    assert any("256" in r.getMessage() and "i_know_what_i_am_doing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae"}, "remove pretrained_vae_model_name_or_path"),
        (
            {"validation_guidance_skip_layers": "[7, 8, 9]", "validation_guidance": 1.0},
            "raise validation_guidance above 1 or remove validation_guidance_skip_layers",
        ),
    ],
)
def test_refused_combinations(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        family(**options).check_config()


def test_skip_layer_options_are_validated() -> None:
    host = PluginHost.build(["sd3"])
    model = host.config_model()
    config = validate_config({"validation_guidance_skip_layers": "[7, 8, 9]"}, model, host)
    assert config.validation_guidance_skip_layers == [7, 8, 9]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="validation_guidance_skip_layers_start"):
        validate_config(
            {
                "validation_guidance_skip_layers": [7],
                "validation_guidance_skip_layers_start": 0.5,
                "validation_guidance_skip_layers_stop": 0.2,
            },
            model,
            host,
        )
    with pytest.raises(ConfigError, match="start at 0"):
        validate_config({"validation_guidance_skip_layers": [-1]}, model, host)


def test_t5_uncond_follows_clip_unless_set() -> None:
    assert family().unconditional_identity() == {"clip": "empty_string", "t5": "empty_string"}
    assert family(sd3_clip_uncond_behaviour="zero").unconditional_identity() == {"clip": "zero", "t5": "zero"}
    mixed = family(sd3_clip_uncond_behaviour="zero", sd3_t5_uncond_behaviour="empty_string")
    assert mixed.unconditional_identity() == {"clip": "zero", "t5": "empty_string"}


def test_lora_target_presets(loaded: tuple[Any, Any]) -> None:
    _, components = loaded
    names = [n for n, m in components.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    blocks, dual = 10, 2  # the tiny model: 10 joint blocks, the first two with a second (image) attention
    expected = {
        "attention": 4 * (blocks + dual),
        "attention+context": 4 * (blocks + dual) + 4 * blocks - 1,  # the last block has no to_add_out
        "attention+ffs": 4 * (blocks + dual) + 2 * blocks + 2 * (blocks - 1),  # …nor ff_context
        "attention+context+ffs": 4 * (blocks + dual) + 4 * blocks - 1 + 2 * blocks + 2 * (blocks - 1),
    }
    for preset, count in expected.items():
        matched = match_modules(names, family(sd3_lora_target=preset).lora_target_modules())
        assert len(matched) == count, preset
    default = match_modules(names, family().lora_target_modules())
    assert {n.rsplit(".", 2)[-2] if n.endswith("to_out.0") else n.rsplit(".", 1)[-1] for n in default} == {
        "to_q",
        "to_k",
        "to_v",
        "to_out",
    }
    assert family(peft_lora_target_modules='["to_q"]').lora_target_modules() == ["to_q"]


def test_quantization_exclusions_keep_the_sensitive_layers(loaded: tuple[Any, Any]) -> None:
    import fnmatch

    fam, components = loaded
    names = [n for n, m in components.transformer.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    kept = {n for n in names if any(fnmatch.fnmatch(n, p) for p in fam.quantization_exclusions)}
    quantized = set(names) - kept
    for name in (
        "proj_out",
        "context_embedder",
        "pos_embed.proj",
        "norm_out.linear",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1_context.linear",
        "transformer_blocks.3.ff.net.0.proj",
        "transformer_blocks.3.ff_context.net.2",
    ):
        assert name in kept, name
    assert quantized and all(".attn" in n for n in quantized)  # only attention projections are quantized
    assert [slot.precision_option for slot in fam.text_encoder_slots] == [
        "text_encoder_1_precision",
        "text_encoder_2_precision",
        "text_encoder_3_precision",
    ]


# -- text ---------------------------------------------------------------------------------------------


def test_prompt_embeddings_match_the_diffusers_pipeline(loaded: tuple[Any, Any]) -> None:
    fam, components = loaded
    ours = fam.encode_prompts(components, PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = _pipeline(components).encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert ours[0]["prompt_embeds"].shape == (77 + 77, 48)  # CLIP tokens, then T5 tokens; T5 width
    assert ours[0]["pooled_prompt_embeds"].shape == (16 + 24,)  # CLIP-L pooled ++ CLIP-G pooled
    for i, entry in enumerate(ours):
        torch.testing.assert_close(entry["prompt_embeds"], embeds[i])
        torch.testing.assert_close(entry["pooled_prompt_embeds"], pooled[i])
        assert torch.all(entry["prompt_embeds"][:77, 40:] == 0)  # CLIP features zero-padded to the T5 width


def test_t5_padding_zero(loaded: tuple[Any, Any]) -> None:
    fam, components = loaded
    [plain] = fam.encode_prompts(components, ["a photo of a cat"])
    fam.options.t5_padding = "zero"
    try:
        [zeroed] = fam.encode_prompts(components, ["a photo of a cat"])
    finally:
        fam.options.t5_padding = "unmodified"
    mask = (
        components.tokenizers["tokenizer_3"](
            ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
        )
        .attention_mask[0]
        .bool()
    )
    t5_plain, t5_zero = plain["prompt_embeds"][77:], zeroed["prompt_embeds"][77:]
    assert (~mask).any() and torch.all(t5_zero[~mask] == 0) and not torch.all(t5_plain[~mask] == 0)
    torch.testing.assert_close(t5_zero[mask], t5_plain[mask])
    torch.testing.assert_close(zeroed["prompt_embeds"][:77], plain["prompt_embeds"][:77])


def test_dropped_caption_embeddings_follow_the_uncond_options(loaded: tuple[Any, Any]) -> None:
    fam, components = loaded
    [empty] = fam.encode_prompts(components, [""])
    opts = fam.options

    def uncond(clip: str, t5: str | None) -> dict[str, torch.Tensor]:
        opts.sd3_clip_uncond_behaviour, opts.sd3_t5_uncond_behaviour = clip, t5
        try:
            return fam.unconditional_embeds(components)
        finally:
            opts.sd3_clip_uncond_behaviour, opts.sd3_t5_uncond_behaviour = "empty_string", None

    default = uncond("empty_string", None)
    torch.testing.assert_close(default["prompt_embeds"], empty["prompt_embeds"])
    torch.testing.assert_close(default["pooled_prompt_embeds"], empty["pooled_prompt_embeds"])
    assert not torch.all(empty["prompt_embeds"] == 0)
    zero = uncond("zero", None)  # T5 follows CLIP
    assert torch.all(zero["prompt_embeds"] == 0) and torch.all(zero["pooled_prompt_embeds"] == 0)
    assert zero["prompt_embeds"].shape == empty["prompt_embeds"].shape
    mixed = uncond("zero", "empty_string")
    assert torch.all(mixed["prompt_embeds"][:77] == 0) and torch.all(mixed["pooled_prompt_embeds"] == 0)
    torch.testing.assert_close(mixed["prompt_embeds"][77:], empty["prompt_embeds"][77:])
    other = uncond("empty_string", "zero")
    torch.testing.assert_close(other["prompt_embeds"][:77], empty["prompt_embeds"][:77])
    assert torch.all(other["prompt_embeds"][77:] == 0)
    torch.testing.assert_close(other["pooled_prompt_embeds"], empty["pooled_prompt_embeds"])


def test_cache_identities(tmp_path: Path) -> None:
    def paths(**options: Any) -> tuple[Path, Path, Any]:
        fam = family(pretrained_model_name_or_path="/models/sd3", **options)
        cache = TextEmbedCache(tmp_path, fam.text_cache_identity(), dropped_identity=fam.unconditional_identity())
        return cache.path("a caption"), cache.path(DROPPED_CAPTION), fam.latent_cache_identity()

    base = paths()
    padded = paths(t5_padding="zero")
    zero_uncond = paths(sd3_clip_uncond_behaviour="zero")
    shorter = paths(tokenizer_max_length=77)
    assert padded[0] != base[0] and padded[2] == base[2]  # captions re-encoded, latents kept
    assert shorter[0] != base[0] and shorter[2] == base[2]
    assert zero_uncond[0] == base[0] and zero_uncond[1] != base[1]  # only the dropped caption changes
    assert paths(sd3_clip_uncond_behaviour="zero", sd3_t5_uncond_behaviour="zero")[1] == zero_uncond[1]


# -- forward ------------------------------------------------------------------------------------------


def test_predict_passes_sigma_times_1000_and_keeps_the_latent_layout(loaded: tuple[Any, Any]) -> None:
    fam, components = loaded
    transformer = components.transformer
    [embeds] = fam.encode_prompts(components, ["a photo of a cat"])
    seen: dict[str, Any] = {}

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)

    handle = transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        for h, w in ((8, 8), (8, 12)):
            inputs = step_inputs(
                torch.randn(2, 16, h, w),
                torch.tensor([0.25, 0.7]),
                {k: v[None].expand(2, *v.shape) for k, v in embeds.items()},
            )
            with torch.no_grad():
                velocity = fam.predict(transformer, inputs).velocity
            assert velocity.shape == (2, 16, h, w)
            torch.testing.assert_close(seen["timestep"], torch.tensor([250.0, 700.0]))
            tokens = fam.forward_tokens(inputs)
            assert tokens.counts == {"image": (h // 2) * (w // 2), "text": 154} and tokens.grid == (h // 2, w // 2)
    finally:
        handle.remove()


class ShuffledRouter:
    """Routes every block of the layout with all image tokens kept, in a random order."""

    def __init__(self, transformer: torch.nn.Module, layout: Any, tokens: ForwardTokens, seed: int) -> None:
        self.tokens = tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.selections: list[Selection] = []
        self.handles = []
        for _, blocks, module in layout.blocks(transformer):
            self.handles.append(module.register_forward_pre_hook(partial(self._select, blocks), with_kwargs=True))
            self.handles.append(module.register_forward_hook(partial(self._restore, blocks)))

    def _select(self, blocks: BlockList, module: Any, args: Any, kwargs: Any) -> Any:
        keep = torch.randperm(self.tokens.counts["image"], generator=self.generator)
        args, kwargs, selection = blocks.select(args, kwargs, keep, self.tokens)
        self.selections.append(selection)
        return args, kwargs

    def _restore(self, blocks: BlockList, module: Any, args: Any, output: Any) -> Any:
        return blocks.restore(output, self.selections.pop())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("latent_size", [(8, 8), (8, 12)], ids=["square", "non-square"])
def test_routing_all_tokens_shuffled_gives_the_unrouted_output_and_gradients(
    loaded: tuple[Any, Any], latent_size: tuple[int, int]
) -> None:
    fam, components = loaded
    transformer = components.transformer
    layout = fam.token_layout()
    assert layout.depth(transformer) == 10
    [embeds] = fam.encode_prompts(components, ["a photo of a cat"])
    generator = torch.Generator().manual_seed(1)
    inputs = step_inputs(
        torch.randn(2, 16, *latent_size, generator=generator),
        torch.tensor([0.3, 0.8]),
        {k: v[None].expand(2, *v.shape) for k, v in embeds.items()},
    )
    target = torch.randn(2, 16, *latent_size, generator=generator)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        transformer.zero_grad(set_to_none=True)
        velocity = fam.predict(transformer, inputs).velocity
        (velocity - target).square().mean().backward()
        return velocity.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    transformer.requires_grad_(True)
    try:
        plain, plain_grads = run()
        router = ShuffledRouter(transformer, layout, fam.forward_tokens(inputs), seed=0)
        try:
            routed, routed_grads = run()
        finally:
            router.remove()
    finally:
        transformer.requires_grad_(False)
        transformer.zero_grad(set_to_none=True)
    assert not router.selections  # every select was restored
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=1e-4)
    assert plain_grads.keys() == routed_grads.keys() and len(plain_grads) > 100
    for name, grad in plain_grads.items():
        torch.testing.assert_close(routed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# -- validation ----------------------------------------------------------------------------------------


def test_skip_layer_guidance_runs_on_the_steps_inside_the_window_only(loaded: tuple[Any, Any]) -> None:
    fam, components = loaded
    transformer = components.transformer
    cfg, opts = fam.config, fam.options
    positive, negative = fam.encode_prompts(components, ["a red circle on a blue background", "blurry, cropped, ugly"])
    request = ValidationRequest("validation", "a red circle", positive, negative, 64, 64, seed=0)
    calls: list[tuple[int, Any]] = []

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        calls.append((kwargs["hidden_states"].shape[0], kwargs.get("skip_layers")))

    steps = 10
    cfg.validation_num_inference_steps, cfg.validation_guidance = steps, 4.0
    opts.validation_guidance_skip_layers = [7, 8, 9]
    opts.validation_guidance_skip_layers_start, opts.validation_guidance_skip_layers_stop = 0.2, 0.6
    handle = transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            [with_slg] = fam.render_validation(components, transformer, [request])
            slg_calls = list(calls)
            calls.clear()
            opts.validation_guidance_skip_layers = None
            [without] = fam.render_validation(components, transformer, [request])
    finally:
        handle.remove()
    # Each step: one CFG forward (negative and positive batched), then the skip-layer forward if due.
    step, skipped_on = -1, []
    for batch, skip in slg_calls:
        if skip is None:
            assert batch == 2
            step += 1
        else:
            assert batch == 1 and skip == [7, 8, 9]
            skipped_on.append(step)
    assert step == steps - 1
    assert skipped_on == [i for i in range(steps) if 0.2 * steps < i < 0.6 * steps] == [3, 4, 5]
    assert all(skip is None for _, skip in calls) and len(calls) == steps
    assert with_slg.size == without.size == (64, 64)
    assert with_slg.tobytes() != without.tobytes()  # the guidance changes the image


def test_validation_guidance_skip_scale_is_diffusers_skip_layer_guidance_scale(loaded: tuple[Any, Any]) -> None:
    """With skip layers set, ``validation_guidance_skip_scale`` changes the validation image (same
    seed), and each image is the one StableDiffusion3Pipeline renders from the prompts with
    ``skip_layer_guidance_scale`` at that value."""
    import numpy as np

    fam, components = loaded
    cfg, opts = fam.config, fam.options
    prompt, negative_prompt = "a red circle on a blue background", "blurry, cropped, ugly"
    positive, negative = fam.encode_prompts(components, [prompt, negative_prompt])
    request = ValidationRequest("validation", prompt, positive, negative, 64, 64, seed=5)
    cfg.validation_num_inference_steps, cfg.validation_guidance = 4, 4.0
    opts.validation_guidance_skip_layers = [7, 8, 9]
    opts.validation_guidance_skip_layers_start, opts.validation_guidance_skip_layers_stop = 0.0, 1.0
    pipe = _pipeline(components)
    rendered: dict[float, np.ndarray] = {}
    try:
        for scale in (2.8, 6.0):
            opts.validation_guidance_skip_scale = scale
            with torch.no_grad():
                [image] = fam.render_validation(components, components.transformer, [request])
                [reference] = pipe(
                    prompt,
                    negative_prompt=negative_prompt,
                    width=64,
                    height=64,
                    num_inference_steps=4,
                    guidance_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(5),
                    max_sequence_length=77,
                    skip_guidance_layers=[7, 8, 9],
                    skip_layer_guidance_scale=scale,
                    skip_layer_guidance_start=0.0,
                    skip_layer_guidance_stop=1.0,
                ).images
            ours, theirs = np.asarray(image, dtype=np.int16), np.asarray(reference, dtype=np.int16)
            assert np.abs(ours - theirs).max() <= 1, scale  # 8-bit rounding of the same decoded image
            rendered[scale] = ours
    finally:
        opts.validation_guidance_skip_layers, opts.validation_guidance_skip_scale = None, 2.8
        opts.validation_guidance_skip_layers_start, opts.validation_guidance_skip_layers_stop = 0.01, 0.2
    assert np.abs(rendered[2.8] - rendered[6.0]).mean() > 1.0  # the scale changes the image


def test_validation_previews_and_images_without_cfg(loaded: tuple[Any, Any]) -> None:
    fam, components = loaded
    [positive] = fam.encode_prompts(components, ["a photo of a cat"])
    previews: list[tuple[int, Any]] = []
    request = ValidationRequest("cat", "a photo of a cat", positive, None, 128, 64, seed=3)
    request.preview, request.preview_every = (lambda step, image: previews.append((step, image))), 2
    fam.config.validation_num_inference_steps, fam.config.validation_guidance = 4, 1.0  # no CFG: no negative needed
    fam.options.validation_guidance_skip_layers = None
    with torch.no_grad():
        [image] = fam.render_validation(components, components.transformer, [request])
    assert image.size == (128, 64)
    assert [step for step, _ in previews] == [2, 4]
    assert previews[-1][1].tobytes() == image.tobytes()  # the last preview is the final image


def test_skip_layers_beyond_the_model_are_refused_when_loading(tiny_sd3_dir: Path) -> None:
    fam = family(pretrained_model_name_or_path=str(tiny_sd3_dir), validation_guidance_skip_layers="[7, 12]")
    with pytest.raises(UserError, match="names block 12, but this SD3 transformer has 10 blocks"):
        fam.load(LoadRequest(torch.device("cpu"), torch.float32, text_encoders=False))


def test_transformer_from_another_folder(tiny_sd3_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_sd3_dir / "transformer", tmp_path / "finetuned")
    fam = family(
        pretrained_model_name_or_path=str(tiny_sd3_dir),
        pretrained_transformer_model_name_or_path=str(tmp_path / "finetuned"),
        pretrained_transformer_subfolder="none",
    )
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32, text_encoders=False))
    assert components.transformer.config.num_layers == 10 and not components.text_encoders


def test_unreachable_hub_id_is_a_user_error() -> None:
    fam = family(model_flavour="large")
    with pytest.raises(UserError, match=r"Could not load the SD3 model from 'stabilityai/stable-diffusion-3\.5-large'"):
        fam.load(LoadRequest(torch.device("cpu"), torch.float32))
