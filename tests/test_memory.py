"""Memory and speed options on the tiny FLUX pipeline: what moves where is observed (diffusers'
offload files and placeholders, the blocks' residency while they run, the modules' placement at
each phase), and the results are the plain run's (same weights, a LoRA that loads in diffusers)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stune.plugins import PluginHost
from stune.run import Run
from stune.testing import make_images, train_by_phases, write_run

LORA = "pytorch_lora_weights.safetensors"


def run_folder(folder: Path, model: Path, **options: Any) -> Path:
    make_images(folder / "data", 4, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 3,
        "train_batch_size": 2,
        "learning_rate": "1e-3",
        "lora_dropout": 0.0,
        "mixed_precision": "no",
        "gradient_checkpointing": "true",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        **options,
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def train_in(folder: Path, model: Path, after_build: Callable[[Run], None] | None = None, **options: Any) -> Run:
    """Train in this process, phase by phase, and hand back the run (its placement, residency, model)."""
    return train_by_phases(run_folder(folder, model, **options), PluginHost.build(["flux"]), after_build)


def assert_same_lora(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "output" / LORA)), load_file(str(b / "output" / LORA))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def plain_lora(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("plain-lora")
    train_in(folder, tiny_flux_dir)
    return folder


def test_group_offload_to_disk_trains_the_plain_lora(tmp_path: Path, tiny_flux_dir: Path, plain_lora: Path) -> None:
    """The frozen weights really leave memory between uses (diffusers writes them to files and
    leaves placeholders), so an identical LoRA proves every forward and backward had them back."""
    offload = tmp_path / "offload"
    run = train_in(
        tmp_path,
        tiny_flux_dir,
        enable_group_offload=True,
        group_offload_blocks_per_group=2,
        group_offload_to_disk_path=str(offload),
    )
    assert_same_lora(tmp_path, plain_lora)
    # one group per block list (1 double-stream block; 2 single-stream blocks) and the layers outside them
    assert len(list(offload.glob("group_*.safetensors"))) == 3
    assert run.residency is not None
    events = run.residency.events
    for phase in ("backward", "recompute", "backward done", "step"):
        assert any(e[2] == phase for e in events), phase
    assert events[0] == ("outer", "in", "backward")  # the final projection's backward comes first
    blocks = [e[0] for e in events if e[1:] == ("in", "backward")][:4]
    assert blocks == ["outer", "block2", "block1", "block0"]  # reverse execution order
    # Between steps a block's frozen weight is diffusers' placeholder, not the weight.
    original = load_file(str(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "single_transformer_blocks.1.proj_mlp.weight"
    base = run.transformer.single_transformer_blocks[1].proj_mlp.weight
    assert base.shape == original[key].shape and not torch.equal(base, original[key])


def test_leaf_level_group_offload_without_checkpointing(tmp_path: Path, tiny_flux_dir: Path, plain_lora: Path) -> None:
    run = train_in(
        tmp_path,
        tiny_flux_dir,
        enable_group_offload=True,
        group_offload_type="leaf_level",
        gradient_checkpointing=False,
    )
    assert_same_lora(tmp_path, plain_lora)
    assert run.residency is not None and not any(e[2] == "recompute" for e in run.residency.events)


def test_block_swap_runs_each_swapped_block_in_place(tmp_path: Path, tiny_flux_dir: Path, plain_lora: Path) -> None:
    seen: list[tuple[str, bool, set[str]]] = []

    def watch(run: Run) -> None:
        """As each swapped block runs: whether it is in, and where its weights are."""
        assert run.residency is not None
        for block, unit in run.residency.by_module().items():
            block.register_forward_pre_hook(
                lambda m, a, u=unit: seen.append((u.name, u.is_in, {str(p.device) for p in m.parameters()}))
            )

    run = train_in(tmp_path, tiny_flux_dir, after_build=watch, musubi_blocks_to_swap=2)
    assert_same_lora(tmp_path, plain_lora)
    assert {name for name, _, _ in seen} == {"swap0", "swap1"}
    assert all(is_in and devices == {"cpu"} for _, is_in, devices in seen)
    assert run.residency is not None and not any(unit.is_in for unit in run.residency.units)
    ways = [(name, way, phase) for name, way, phase in run.residency.events]
    for phase in ("forward", "backward"):
        assert ways.count(("swap1", "in", phase)) == 3  # once per step
    assert ways.count(("swap1", "in", "recompute")) == 0  # the checkpointed recompute finds it in already


def test_fused_backward_pass_gives_the_plain_full_finetune(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """``optimizer_release_gradients`` (SimpleTuner's name of fuse_optimizer) steps each weight inside
    the backward pass, the moment its gradient is complete, and frees that gradient; the weights are
    those of the plain full fine-tune."""
    from diffusers import FluxTransformer2DModel

    from stune.fused import FusedOptimizer

    #: per step, each trained weight as its gradient completes: (name, gradient freed, weights stepped so far)
    seen: list[list[tuple[str, bool, int]]] = []
    weights: list[int] = []

    def watch(run: Run) -> None:
        assert isinstance(run.optimizer, FusedOptimizer)
        trained = {n: p for n, p in run.transformer.named_parameters() if p.requires_grad}
        weights.append(len(trained))
        before: dict[str, torch.Tensor] = {}

        def snapshot(module: torch.nn.Module, args: Any) -> None:
            before.update({n: p.detach().clone() for n, p in trained.items()})
            seen.append([])

        def stepped(param: torch.Tensor, name: str) -> None:
            moved = sum(not torch.equal(p, before[n]) for n, p in trained.items())
            assert not torch.equal(param, before[name]), f"{name} was not stepped when its gradient completed"
            seen[-1].append((name, param.grad is None, moved))

        run.transformer.register_forward_pre_hook(snapshot)
        for name, param in trained.items():  # registered after the optimizer's own hooks: they run first
            param.register_post_accumulate_grad_hook(functools.partial(stepped, name=name))

    runs = {}
    for name, options in {
        "plain": {},
        "fused": {"optimizer_release_gradients": True},
        "fused+swap": {"fuse_optimizer": True, "musubi_blocks_to_swap": 1, "gradient_checkpointing": False},
    }.items():
        run = train_in(
            tmp_path / name,
            tiny_flux_dir,
            after_build=watch if name == "fused" else None,
            model_type="full",
            lora_dropout=0.0,
            **options,
        )
        runs[name] = FluxTransformer2DModel.from_pretrained(tmp_path / name / "output" / "transformer")
        if name == "fused":
            assert all(p.grad is None for p in run.params)
    [trained] = weights
    assert trained > 50 and len(seen) == 3 and all(len(step) == trained for step in seen)  # every weight, once per step
    for step in seen:
        # One more weight stepped as each gradient completes, during backward (before optimizer.step)
        assert [moved for _, _, moved in step] == list(range(1, trained + 1))
        assert all(freed for _, freed, _ in step)
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    plain = dict(runs["plain"].named_parameters())
    assert any(not torch.equal(p, plain[n]) for n, p in base.named_parameters())
    for name in ("fused", "fused+swap"):
        for key, param in runs[name].named_parameters():
            torch.testing.assert_close(param, plain[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_compiled_lora_trains_and_loads_in_diffusers(tmp_path: Path, tiny_flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    run = train_in(tmp_path, tiny_flux_dir, dynamo_backend="inductor", max_train_steps=2)
    blocks = [b for _, _, b in run.session.family.token_layout().blocks(run.transformer)]
    assert all(b._compiled_call_impl is not None for b in blocks)  # regional: each block compiled in place
    metrics = (tmp_path / "output" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    saved = load_file(str(tmp_path / "output" / LORA))
    assert not any("_orig_mod" in k for k in saved)
    pipe.load_lora_weights(tmp_path / "output")
    loaded = {k for k in pipe.transformer.state_dict() if "lora" in k}
    assert len(loaded) == len(saved)


def test_speed_and_placement_options_in_one_run(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """Fused projections, chunked feed-forward, an SDPA kernel, the VAE and text-encoder options and
    model CPU offload together; the LoRA trained on fused layers is the unfused LoRA diffusers loads."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.models.attention import FeedForward

    run = train_in(
        tmp_path,
        tiny_flux_dir,
        fuse_qkv_projections=True,
        enable_chunked_feed_forward=True,
        feed_forward_chunk_size=5,
        attention_mechanism="native-math",
        vae_enable_tiling=True,
        vae_enable_slicing=True,
        vae_dtype="bf16",
        enable_model_cpu_offload=True,
        offload_during_startup=True,
        fully_unload_text_encoder=False,
        offload_during_save=True,
        set_grads_to_none=False,
        torch_num_threads=1,
        max_train_steps=2,
        checkpoint_step_interval=1,
        validation_prompt="a picture number 1",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        validation_step_interval=1,
    )
    transformer = run.transformer
    assert all(p.grad is not None and not p.grad.any() for p in run.params)  # set_grads_to_none=false
    assert torch.get_num_threads() == 1
    torch.set_num_threads(os.cpu_count() or 1)
    attention = transformer.transformer_blocks[0].attn
    assert attention.fused_projections and not hasattr(attention, "to_q")
    assert attention.processor._attention_backend.value == "_native_math"
    assert all(type(m).__name__ == "ChunkedFeedForward" for m in transformer.modules() if isinstance(m, FeedForward))
    components = run.components
    assert components is not None and components.vae.use_tiling and components.vae.use_slicing
    assert components.vae.dtype == torch.bfloat16  # the VAE it cached with; validation decodes in fp32
    assert set(components.text_encoders) == {"text_encoder", "text_encoder_2"}  # kept (on the CPU)
    events = run.placement.events  # type: ignore[union-attr]
    assert events[:2] == [
        ("text_encoder", "off", "offload_during_startup"),
        ("text_encoder_2", "off", "offload_during_startup"),
    ]
    assert ("vae", "on", "encoding images") in events and ("vae", "off", "encoding images") in events
    assert ("text_encoder_2", "on", "encoding captions") in events
    assert ("vae", "on", "validation") in events and ("vae", "off", "validation done") in events
    assert events.count(("transformer", "off", "saving")) == 2  # the interval checkpoint and the last one
    assert len(list((tmp_path / "output" / "validation_images").glob("step-*.png"))) == 2

    # The saved LoRA is the unfused one: in an unfused transformer it predicts what the fused one does.
    saved = load_file(str(tmp_path / "output" / LORA))
    assert any(".to_q.lora_A" in k for k in saved) and not any("qkv" in k for k in saved)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(tmp_path / "output")
    unfused: FluxTransformer2DModel = pipe.transformer
    assert len([k for k in unfused.state_dict() if "lora" in k]) == len(saved)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(16, 3),
        "return_dict": False,
    }
    transformer.eval()
    with torch.no_grad():
        torch.testing.assert_close(unfused(**inputs)[0], transformer(**inputs)[0], rtol=1e-4, atol=1e-5)
