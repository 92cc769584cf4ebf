"""The HiDream family against the real diffusers classes: text encoding and the compact cache, the
forward (train and eval layouts, negation, non-square padding, masked text padding), the MoE
load-balancing loss and the token layout."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from stune.family import LoadRequest
from stune.testing import step_inputs
from stune_hidream.family import LAYERS, LLAMA, LLAMA_MASK, POOLED, T5, T5_MASK, _attach, _llama_stack
from stune_hidream.tiny import TINY_LLAMA_LAYERS

PROMPTS = ["a red circle on a blue background", "a cat", ""]


@pytest.fixture(scope="module")
def loaded(tiny_hidream_dir: Path, family: Any) -> tuple[Any, Any]:
    fam = family(pretrained_model_name_or_path=str(tiny_hidream_dir), mixed_precision="no", tokenizer_max_length=32)
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32))
    return fam, components


@pytest.fixture(scope="module")
def pipeline_embeds(tiny_hidream_dir: Path) -> tuple[torch.Tensor, ...]:
    """What HiDreamImagePipeline.encode_prompt gives for PROMPTS at 32 tokens (t5, llama, pooled)."""
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline.from_pretrained(tiny_hidream_dir)
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS, do_classifier_free_guidance=False, max_sequence_length=32
    )
    return t5, llama, pooled


def _inputs(fam: Any, entries: list[dict[str, torch.Tensor]], shape: tuple[int, int], seed: int = 0) -> Any:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(entries), 16, *shape, generator=generator)
    sigmas = torch.linspace(0.3, 0.8, len(entries))
    return step_inputs(latents, sigmas, fam.collate_embeds(entries))


def test_captions_cut_by_t5_and_llama_are_counted(loaded: Any) -> None:
    fam, components = loaded
    fam.truncated.clear()
    fam.encode_prompts(components, ["a red circle " * 40, PROMPTS[0]])
    cut = {label: (entry.count, entry.main) for label, entry in fam.truncated.items()}
    assert cut["T5-XXL"] == (1, True) and cut["Llama-3.1-8B-Instruct"] == (1, True)
    assert all(not main for label, (_, main) in cut.items() if label.startswith("CLIP"))
    fam.truncated.clear()


def test_cached_text_is_the_pipelines_encoding_without_padding(loaded: Any, pipeline_embeds: Any) -> None:
    fam, components = loaded
    t5, llama, pooled = pipeline_embeds
    layers = sorted(set(TINY_LLAMA_LAYERS))
    assert layers == [0, 2, 4] and llama.shape[0] == 5  # the Llama has 5 layers; the transformer reads 3

    trimmed = fam.encode_prompts(components, PROMPTS)
    fam.options.hidream_text_padding = "pipeline"
    padded = fam.encode_prompts(components, PROMPTS)
    fam.options.hidream_text_padding = "trim"
    for i, (short, full) in enumerate(zip(trimmed, padded, strict=True)):
        assert short[LAYERS].tolist() == layers
        # "pipeline": exactly what inference feeds the transformer (only the layers it reads)
        assert full[T5].shape == t5[i].shape and full[LLAMA].shape == (3, 32, 32)
        torch.testing.assert_close(full[T5], t5[i])
        torch.testing.assert_close(full[LLAMA], llama[layers, i])
        torch.testing.assert_close(full[POOLED], pooled[i])
        # "trim": the real tokens only, equal to the same positions of the padded encoding
        n_t5, n_llama = short[T5].shape[0], short[LLAMA].shape[1]
        assert n_t5 < 32 and n_llama < 32
        torch.testing.assert_close(short[T5], t5[i, :n_t5])
        torch.testing.assert_close(short[LLAMA], llama[layers, i, :n_llama])
        torch.testing.assert_close(short[POOLED], pooled[i])
    assert trimmed[2][T5].shape[0] == 1 and trimmed[2][LLAMA].shape[1] == 1  # "": </s> and <|begin_of_text|>


def test_cache_entries_are_in_the_training_dtype(tiny_hidream_dir: Path, loaded: Any, family: Any) -> None:
    _, components = loaded
    fam = family(pretrained_model_name_or_path=str(tiny_hidream_dir), mixed_precision="bf16")
    [entry] = fam.encode_prompts(components, PROMPTS[:1])
    assert {entry[k].dtype for k in (T5, LLAMA, POOLED)} == {torch.bfloat16}


def test_a_padded_batch_predicts_what_each_caption_predicts_alone(loaded: Any) -> None:
    fam, components = loaded
    model = components.transformer.train()
    entries = fam.encode_prompts(components, PROMPTS)
    batch = _inputs(fam, entries, (8, 8))
    assert batch.embeds[T5_MASK].sum(1).tolist() == [e[T5].shape[0] for e in entries]
    assert not batch.embeds[LLAMA_MASK].all()  # the batch pads two of its captions
    with torch.no_grad():
        together = fam.predict(model, batch).velocity
        alone = [
            fam.predict(
                model,
                step_inputs(batch.noisy_latents[i : i + 1], batch.sigmas[i : i + 1], fam.collate_embeds([e])),
            ).velocity
            for i, e in enumerate(entries)
        ]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(8, 8), (8, 16)], ids=["square", "non-square"])
def test_train_and_eval_layouts_and_the_negated_velocity(loaded: Any, shape: tuple[int, int]) -> None:
    """diffusers unpatchifies differently in train and eval mode; both come out as the velocity in
    the latent layout, which is minus the transformer's raw output (HiDream's inverted velocity)."""
    fam, components = loaded
    model = components.transformer
    entries = fam.encode_prompts(components, PROMPTS[1:2])
    inputs = _inputs(fam, entries, shape)
    with torch.no_grad():
        trained = fam.predict(model.train(), inputs).velocity
        evaluated = fam.predict(model.eval(), inputs).velocity
        _attach(model).attention.text_keep = None
        model.train()
        raw = model(
            hidden_states=inputs.noisy_latents,
            timesteps=inputs.timesteps,
            encoder_hidden_states_t5=inputs.embeds[T5],
            encoder_hidden_states_llama3=_llama_stack(inputs.embeds, model.config.llama_layers),
            pooled_embeds=inputs.embeds[POOLED],
            return_dict=False,
        )[0]
        model.eval()
        raw_eval = model(
            hidden_states=inputs.noisy_latents,
            timesteps=inputs.timesteps,
            encoder_hidden_states_t5=inputs.embeds[T5],
            encoder_hidden_states_llama3=_llama_stack(inputs.embeds, model.config.llama_layers),
            pooled_embeds=inputs.embeds[POOLED],
            return_dict=False,
        )[0]
    model.train()
    tokens = (shape[0] // 2) * (shape[1] // 2)
    padded = tokens if shape[0] == shape[1] else model.max_seq
    assert raw.shape == (1, 16, padded, 4)  # training layout: (B, C, tokens padded to max_seq, p²)
    assert raw_eval.shape == trained.shape == (1, 16, *shape)
    torch.testing.assert_close(trained, evaluated, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(evaluated, -raw_eval)


def test_forward_tokens_count_the_padded_grid(loaded: Any) -> None:
    fam, components = loaded
    entries = fam.encode_prompts(components, PROMPTS[:2])
    square = fam.forward_tokens(_inputs(fam, entries, (8, 8)))
    assert square.counts == {"image": 16, "text": 27 + 2 * 8} and square.valid is None
    wide = fam.forward_tokens(_inputs(fam, entries, (8, 16)))
    assert wide.counts["image"] == components.transformer.max_seq == 64 and wide.grid == (4, 8)
    assert wide.valid is not None and wide.valid.tolist() == [True] * 32 + [False] * 32


def test_too_many_tokens_for_the_padded_grid_is_a_user_error(loaded: Any) -> None:
    import stune

    fam, components = loaded
    inputs = _inputs(fam, fam.encode_prompts(components, PROMPTS[:1]), (16, 24))
    with pytest.raises(stune.UserError, match="96 image tokens, more than this HiDream transformer's 64"):
        fam.predict(components.transformer, inputs)


# -- MoE load balancing ------------------------------------------------------------------------------------


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_load_balancing_loss_has_its_own_gradient(tiny_hidream_dir: Path, family: Any, checkpointing: bool) -> None:
    """Full fine-tuning: the auxiliary term alone moves the gates (and nothing when it is off);
    its value is diffusers' gate losses without their alpha, summed, weighted once."""
    fam = family(
        pretrained_model_name_or_path=str(tiny_hidream_dir),
        mixed_precision="no",
        tokenizer_max_length=32,
        hidream_use_load_balancing_loss=True,
        hidream_load_balancing_loss_weight=0.3,
    )
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32))
    model = components.transformer.train().requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    gates = [m for m in model.modules() if type(m).__name__ == "MoEGate"]
    assert len(gates) == 4 and all(g.alpha == 0.01 for g in gates)
    seen: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda m, a, out: seen.append(out[2])) for g in gates]
    inputs = _inputs(fam, fam.encode_prompts(components, PROMPTS[:2]), (8, 16))
    prediction = fam.predict(model, inputs)
    for hook in hooks:
        hook.remove()
    term = prediction.aux_losses["load_balancing"]
    assert term.weight == 0.3
    assert term.value.requires_grad
    torch.testing.assert_close(term.value, torch.stack(seen[:4]).sum() / 0.01)  # seen[4:]: checkpoint recompute
    model.zero_grad()
    term.weighted.backward()
    grads = _grads(model)
    gate_grads = [n for n in grads if n.endswith("ff_i.gate.weight")]
    assert len(gate_grads) == 4  # every gate learns from the balancing term alone
    assert not any("final_layer" in n for n in grads)  # the output head does not feed any gate
    metrics = prediction.metrics
    assert metrics["moe/expert_share_min"] <= 0.25 <= metrics["moe/expert_share_max"]
    assert metrics["moe/expert_share_mean"] == pytest.approx(0.25)

    fam.options.hidream_use_load_balancing_loss = False
    model.zero_grad()
    off = fam.predict(model, inputs)
    assert off.aux_losses == {}
    off.velocity.sum().backward()
    assert "moe/expert_share_max" in off.metrics  # usage is still logged


def test_the_balancing_term_reaches_an_attention_lora(loaded: Any) -> None:
    """Under an adapter the gates are frozen; the term trains the adapted attention that feeds them."""
    from peft import LoraConfig

    fam, components = loaded
    import copy

    model = copy.deepcopy(components.transformer).train()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=fam.lora_target_modules()))
    fam.options.hidream_use_load_balancing_loss = True
    try:
        prediction = fam.predict(model, _inputs(fam, fam.encode_prompts(components, PROMPTS[:2]), (8, 8)))
    finally:
        fam.options.hidream_use_load_balancing_loss = False
    prediction.aux_losses["load_balancing"].weighted.backward()
    lora_grads = [n for n in _grads(model) if "lora_B" in n]
    assert lora_grads and all("attn1.to_" in n for n in lora_grads)


def test_no_loss_outside_a_training_forward(loaded: Any) -> None:
    fam, components = loaded
    fam.options.hidream_use_load_balancing_loss = True
    inputs = _inputs(fam, fam.encode_prompts(components, PROMPTS[:1]), (8, 8))
    try:
        with torch.no_grad():  # regularisation targets, rollouts, the eval loss
            quiet = fam.predict(components.transformer.train(), inputs)
        evaluated = fam.predict(components.transformer.eval(), inputs)
    finally:
        components.transformer.train()
        fam.options.hidream_use_load_balancing_loss = False
    assert quiet.aux_losses == evaluated.aux_losses == {} and quiet.metrics == evaluated.metrics == {}


# -- token layout -------------------------------------------------------------------------------------------


class ShuffleRouter:
    """Routes every block of the layout with a given keep list, through BlockList.select/restore."""

    def __init__(self, fam: Any, model: torch.nn.Module) -> None:
        self.keep: torch.Tensor | None = None
        self.tokens: Any = None
        self.selections: dict[int, Any] = {}
        self.calls = 0
        for _, blocks, module in fam.token_layout().blocks(model):
            module.register_forward_pre_hook(partial(self._select, blocks), with_kwargs=True)
            module.register_forward_hook(partial(self._restore, blocks))

    def _select(self, blocks: Any, module: Any, args: Any, kwargs: Any) -> Any:
        if self.keep is None:
            return None
        self.calls += 1
        args, kwargs, self.selections[id(module)] = blocks.select(args, kwargs, self.keep, self.tokens)
        return args, kwargs

    def _restore(self, blocks: Any, module: Any, args: Any, output: Any) -> Any:
        if self.keep is None:
            return None
        return blocks.restore(output, self.selections.pop(id(module)))


@pytest.mark.parametrize("shape", [(8, 8), (8, 16)], ids=["square", "non-square"])
def test_routing_every_block_with_every_real_token_kept_changes_nothing(
    tiny_hidream_dir: Path, family: Any, shape: tuple[int, int]
) -> None:
    fam = family(pretrained_model_name_or_path=str(tiny_hidream_dir), mixed_precision="no", tokenizer_max_length=32)
    components = fam.load(LoadRequest(torch.device("cpu"), torch.float32))
    model = components.transformer.train().requires_grad_(True)
    model.enable_gradient_checkpointing()  # blocks then get positional arguments
    router = ShuffleRouter(fam, model)
    inputs = _inputs(fam, fam.encode_prompts(components, PROMPTS), shape)
    tokens = fam.forward_tokens(inputs)

    def run(keep: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        router.keep, router.tokens = keep, tokens
        model.zero_grad()
        velocity = fam.predict(model, inputs).velocity
        (velocity.square().mean() + velocity[:, :, 0].sum()).backward()
        return velocity.detach(), _grads(model)

    reference, reference_grads = run(None)
    generator = torch.Generator().manual_seed(1)
    count = tokens.counts["image"]
    real = torch.arange(count) if tokens.valid is None else torch.nonzero(tokens.valid).flatten()
    padding = torch.arange(len(real), count)  # padding tokens stay: HiDream's mask zeroes their keys only
    keep = torch.cat([real[torch.randperm(len(real), generator=generator)], padding])
    routed, routed_grads = run(keep)
    assert router.calls == 8  # 4 blocks, each run again by gradient checkpointing in backward
    torch.testing.assert_close(routed, reference, atol=1e-5, rtol=1e-4)
    assert routed_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(routed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)

    if tokens.valid is not None:
        # Dropping the padding changes the result: the padded tokens still take attention weight.
        dropped, _ = run(real[torch.randperm(len(real), generator=generator)])
        assert (dropped - reference).abs().max() > 1e-3
