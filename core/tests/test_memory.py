"""Memory, speed and distribution options: every key is accepted, what this machine cannot run is
refused with one sentence, and the mechanisms (fused backward pass, blocks moved in for their
backward, fused-projection LoRA keys, chunked feed-forward, the relaunch command) on small models."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from stune.checks import _check_memory
from stune.config import CoreOptions, validate_config
from stune.errors import ConfigError
from stune.fused import FusedOptimizer
from stune.launch import launch_command, wants_relaunch
from stune.memory import _contexts
from stune.offload import block_swap
from stune.speed import chunk_feed_forward, fused_metadata, fused_targets, merge_fused_lora, split_fused_lora

#: every key of the issue, as a SimpleTuner config.json writes it (strings), with a value this machine runs
ACCEPTED: dict[str, Any] = {
    "attention_mechanism": "sdpa",
    "sageattention_usage": "training+inference",
    "enable_group_offload": "true",
    "group_offload_type": "leaf_level",
    "group_offload_blocks_per_group": "2",
    "group_offload_use_stream": "false",
    "group_offload_to_disk_path": "/tmp/offload",
    "enable_model_cpu_offload": "false",
    "musubi_blocks_to_swap": "0",
    "musubi_block_swap_device": "cpu",
    "vae_enable_tiling": "true",
    "vae_enable_slicing": "true",
    "vae_dtype": "bf16",
    "vae_batch_size": "2",
    "text_encoder_batch_size": "4",
    "fully_unload_text_encoder": "false",
    "keep_vae_loaded": "true",
    "offload_during_startup": "true",
    "offload_during_save": "true",
    "optimizer_release_gradients": "true",
    "optimizer_cpu_offload_method": "none",
    "optimizer_offload_gradients": "false",
    "set_grads_to_none": "false",
    "dynamo_backend": "inductor",
    "dynamo_mode": "max-autotune-no-cudagraphs",
    "dynamo_fullgraph": "false",
    "dynamo_dynamic": "true",
    "dynamo_use_regional_compilation": "true",
    "fuse_qkv_projections": "true",
    "enable_chunked_feed_forward": "true",
    "feed_forward_chunk_size": "256",
    "disable_tf32": "true",
    "torch_num_threads": "2",
    "fsdp_enable": "true",
    "fsdp_version": "2",
    "fsdp_reshard_after_forward": "false",
    "fsdp_state_dict_type": "FULL_STATE_DICT",
    "fsdp_cpu_ram_efficient_loading": "true",
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_transformer_layer_cls_to_wrap": "FluxTransformerBlock,FluxSingleTransformerBlock",
    "fsdp_activation_checkpointing": "true",
    "fsdp_cpu_offload": "false",
    "deepspeed_config": None,
    "num_processes": "2",
    "num_machines": "1",
    "machine_rank": "0",
    "main_process_ip": "127.0.0.1",
    "main_process_port": "29511",
    "accelerate_config": None,
    "accelerate_extra_args": "--gpu_ids 0,1",
}


def config(**values: Any) -> CoreOptions:
    return validate_config(dict(values), CoreOptions)


def test_every_key_of_the_issue_is_an_option() -> None:
    parsed = config(**{k: v for k, v in ACCEPTED.items() if v is not None})
    assert parsed.fuse_optimizer is True  # optimizer_release_gradients is its SimpleTuner alias
    assert parsed.fsdp_transformer_layer_cls_to_wrap == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert parsed.fsdp_version == 2 and parsed.num_processes == 2 and parsed.vae_dtype == "bf16"
    assert config(deepspeed_config={"zero_optimization": {"stage": 2}}).deepspeed_settings == {
        "zero_optimization": {"stage": 2}
    }


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"enable_group_offload": True, "enable_model_cpu_offload": True}, "enable_model_cpu_offload"),
        ({"enable_group_offload": True, "musubi_blocks_to_swap": 2}, "musubi_blocks_to_swap"),
        ({"group_offload_use_stream": True}, "needs enable_group_offload"),
        ({"optimizer_offload_gradients": True}, "optimizer_cpu_offload_method"),
        ({"fsdp_enable": True, "deepspeed_config": "{}"}, "deepspeed_config"),
        ({"num_machines": 2}, "main_process_ip"),
        ({"machine_rank": 1}, "num_machines"),
    ],
)
def test_impossible_combinations_are_one_sentence(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config(**values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are for a machine without CUDA")
@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"attention_mechanism": "flash-attn"}, "flash-attn package"),
        ({"attention_mechanism": "sageattention"}, "sageattention package"),
        ({"attention_mechanism": "xformers"}, "xformers package"),
        ({"attention_mechanism": "flash-attn-hub"}, "kernels package"),
        ({"attention_mechanism": "native-efficient"}, "CUDA GPU"),
        ({"attention_mechanism": "cudnn"}, "CUDA GPU"),
        ({"attention_mechanism": "flex"}, "no backward pass on the CPU"),
        ({"enable_group_offload": True, "group_offload_use_stream": True}, "CUDA stream"),
        ({"enable_group_offload": True, "group_offload_to_disk_path": "x", "model_type": "full"}, "copies taken once"),
        ({"musubi_blocks_to_swap": 2, "num_processes": 2}, "one process"),
        ({"musubi_blocks_to_swap": 2, "musubi_block_swap_device": "meta"}, "cannot be meta"),
        (
            {"musubi_blocks_to_swap": 2, "dynamo_backend": "inductor", "dynamo_use_regional_compilation": False},
            "regional",
        ),
        ({"fuse_optimizer": True, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps to 1"),
        ({"fuse_optimizer": True, "optimizer": "prodigy"}, "step size from all weights"),
        ({"fuse_optimizer": True, "grad_clip_method": "norm"}, "grad_clip_method=value"),
        ({"fuse_optimizer": True, "num_processes": 2}, "one process"),
        ({"optimizer_cpu_offload_method": "torchao"}, "CUDA GPU"),
        ({"fuse_qkv_projections": True, "model_type": "full"}, "PEFT LoRA"),
        ({"dynamo_backend": "cudagraphs"}, "CUDA GPU"),
        ({"fsdp_enable": True, "fsdp_version": 1}, "fsdp_version 2"),
        ({"fsdp_enable": True, "fsdp_cpu_offload": True}, "has none"),
        ({"fsdp_enable": True, "use_ema": True}, "use_ema"),
        ({"deepspeed_config": '{"zero_optimization": {"stage": 2}}'}, "deepspeed_config needs CUDA GPUs"),
        ({"deepspeed_config": '{"train_micro_batch_size_per_gpu": 1}'}, '"zero_optimization" section'),
    ],
)
def test_what_this_machine_cannot_run_is_refused(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as error:
        _check_memory(config(**values))
    assert "\n" not in str(error.value)


def test_what_this_machine_runs_passes_the_checks() -> None:
    for values in (
        {"attention_mechanism": "native-math"},
        {"attention_mechanism": "sageattention", "sageattention_usage": "inference"}
        if torch.cuda.is_available()
        else {},
        {"enable_group_offload": True, "group_offload_to_disk_path": "x"},
        {"musubi_blocks_to_swap": 3},
        {"fuse_optimizer": True, "model_type": "full"},
        {"fuse_qkv_projections": True, "dynamo_backend": "inductor"},
        {"fsdp_enable": True, "num_processes": 2},
    ):
        _check_memory(config(**values))


# -- the fused backward pass ---------------------------------------------------------------------


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))


def test_fused_backward_pass_takes_the_plain_step_and_never_holds_every_gradient() -> None:
    plain, fused = _mlp(0), _mlp(0)
    make = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=1e-2)
    plain_opt = make(list(plain.parameters()))
    fused_opt = FusedOptimizer(list(fused.parameters()), make, clip_value=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(fused_opt, lambda step: 1.0 / (step + 1))
    plain_schedule = torch.optim.lr_scheduler.LambdaLR(plain_opt, lambda step: 1.0 / (step + 1))
    alive: list[int] = []
    for param in fused.parameters():  # registered after the optimizer's: sees the gradient already freed
        param.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(p.grad is not None for p in fused.parameters()))
        )
    for step in range(4):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        plain(x).square().mean().backward()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]))
        torch.nn.utils.clip_grad_value_(list(plain.parameters()), 0.05)
        plain_opt.step()
        plain_opt.zero_grad()
        plain_schedule.step()
        fused(x).square().mean().backward()
        assert fused_opt.take_grad_norm() == pytest.approx(norm, rel=1e-5)
        fused_opt.step()
        schedule.step()
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert max(alive) == 0  # each gradient was gone before the next one arrived
    assert fused_opt.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 5)  # the schedule reached it

    restored = FusedOptimizer(list(_mlp(1).parameters()), make, clip_value=None)
    restored.load_state_dict(fused_opt.state_dict())
    assert restored.optimizers[2].state_dict()["state"][0]["step"] == 4
    assert restored.param_groups[0] is restored.optimizers[0].param_groups[0]  # a schedule still reaches them
    with pytest.raises(ConfigError, match="fuse_optimizer"):
        restored.load_state_dict({"state": {}, "param_groups": []})


# -- blocks moved in for their backward --------------------------------------------------------------


class Chain(torch.nn.Module):
    def __init__(self, checkpointed: bool, swap: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)) for _ in range(4)
        )
        self.head = torch.nn.Linear(6, 1)
        self.checkpointed = checkpointed
        self.swap = swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointed:
                recompute = self.swap.recomputing if self.swap is not None else (lambda _: torch.no_grad())
                context = functools.partial(_contexts, recompute, block)
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=context)
            else:
                x = block(x)
        return self.head(x)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_swapped_blocks_are_in_for_forward_and_backward_and_out_between_steps(checkpointed: bool) -> None:
    reference = Chain(checkpointed=False)
    model = Chain(checkpointed)
    swapped = list(model.blocks[2:])
    model.swap = block_swap(model, swapped, torch.device("cpu"), torch.device("cpu"), full=True)
    units = model.swap.by_module()
    seen: list[tuple[int, str, bool]] = []
    for i, block in enumerate(swapped):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, "forward", units[m].is_in)))
        block.register_full_backward_hook(lambda m, gi, go, i=i: seen.append((i, "backward", units[m].is_in)))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    reference(x).sum().backward()
    model(x).sum().backward()
    model.swap.settle()
    assert all(is_in for _, _, is_in in seen)  # every forward and backward of a swapped block ran with it in
    assert not any(unit.is_in for unit in model.swap.units)  # all out before the optimizer step
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    phases = [(unit, way, phase) for unit, way, phase in model.swap.events]
    assert phases[:4] == [("swap0", "in", "forward"), ("swap0", "out", "forward"), ("swap1", "in", "forward"),
                          ("swap1", "out", "forward")]  # fmt: skip
    assert ("swap1", "in", "backward") in phases and ("swap0", "out", "step") in phases
    assert phases.index(("swap1", "in", "backward")) < phases.index(("swap0", "in", "backward"))  # reverse order


# -- fused projections, chunked feed-forward -------------------------------------------------------------


def test_a_fused_projection_lora_is_saved_as_the_exact_unfused_one() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(3 * 8, 4)
    fused = {"blocks.0.attn.to_qkv.lora_A.weight": a, "blocks.0.attn.to_qkv.lora_B.weight": b}
    split = split_fused_lora(fused)
    x = torch.randn(5, 8)
    out = x @ a.T @ b.T
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        delta = x @ split[f"blocks.0.attn.{part}.lora_A.weight"].T @ split[f"blocks.0.attn.{part}.lora_B.weight"].T
        torch.testing.assert_close(delta, out[:, 8 * i : 8 * (i + 1)])
    merged = merge_fused_lora(split)
    assert merged.keys() == fused.keys() and all(torch.equal(merged[k], fused[k]) for k in fused)
    split["blocks.0.attn.to_k.lora_A.weight"] = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="not trained with fuse_qkv_projections"):
        merge_fused_lora(split)
    assert fused_targets(["to_q", "to_k", "to_v", "add_k_proj", "to_out.0"]) == ["to_qkv", "to_added_qkv", "to_out.0"]
    assert fused_metadata({"target_modules": ["to_qkv", "to_out.0"]})["target_modules"] == [
        "to_k",
        "to_out.0",
        "to_q",
        "to_v",
    ]


def test_chunked_feed_forward_gives_the_same_output_and_keeps_parameter_names() -> None:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"ff": FeedForward(16, activation_fn="gelu-approximate")})
    x = torch.randn(2, 37, 16)
    before, names = model["ff"](x), [n for n, _ in model.named_parameters()]
    assert chunk_feed_forward(model, 8) == 1
    torch.testing.assert_close(model["ff"](x), before)
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ConfigError, match="no diffusers FeedForward"):
        chunk_feed_forward(torch.nn.Linear(2, 2), 8)


# -- num_processes -------------------------------------------------------------------------------------------


def test_num_processes_relaunches_through_accelerate(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "LOCAL_RANK", "STUNE_LAUNCHED", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    two = config(
        num_processes=4,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29600,
        accelerate_config="acc.yaml",
        accelerate_extra_args="--gpu_ids 0,1",
    )
    assert wants_relaunch(two) and not wants_relaunch(config())
    cmd = launch_command(two, ["--plugin", "flux", "--config", "c.json"])
    text = " ".join(cmd)
    assert "-m accelerate.commands.launch --config_file acc.yaml --num_processes 4 --num_machines 2" in text
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29600" in text
    assert text.endswith("--gpu_ids 0,1 -m stune.cli train --plugin flux --config c.json")
    monkeypatch.setenv("WORLD_SIZE", "4")  # the relaunched processes train
    assert not wants_relaunch(two)


# -- placement, process options, FSDP units ------------------------------------------------------------


def test_placement_moves_the_vae_and_encoders_at_phase_boundaries() -> None:
    from stune.family import Components
    from stune.offload import Placement

    vae, encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    components = Components(transformer=None, vae=vae, text_encoders={"text_encoder": encoder})
    kept = Placement(torch.device("cpu"), config(keep_vae_loaded=True, fully_unload_text_encoder=False))
    kept.after_caching(components)
    with kept.vae_for_validation(vae):
        pass
    assert kept.events == [("text_encoder", "off", "caching done"), ("vae", "on", "keep_vae_loaded")]
    assert components.text_encoders == {"text_encoder": encoder}

    offload = Placement(
        torch.device("cpu"), config(enable_model_cpu_offload=True, vae_dtype="bf16", mixed_precision="no")
    )
    assert offload.load_device == torch.device("cpu") and offload.vae_dtype() == torch.bfloat16
    offload.after_load(components)
    assert vae.weight.dtype == torch.bfloat16
    with offload.vae_for_validation(vae):
        assert vae.weight.dtype == torch.float32  # decodes the transformer's latents in their precision
    assert vae.weight.dtype == torch.bfloat16
    offload.after_caching(components)
    assert components.text_encoders == {}  # fully_unload_text_encoder (the default) deletes them
    assert offload.events == [
        ("vae", "on", "validation"),
        ("vae", "off", "validation done"),
        ("vae", "off", "caching done"),
    ]


def test_tf32_and_threads() -> None:
    from stune.speed import set_process_options

    threads = torch.get_num_threads()
    try:
        set_process_options(config(disable_tf32=True, torch_num_threads=1))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.get_num_threads() == 1
        set_process_options(config())
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_num_threads(threads)


def test_fsdp_units_follow_the_wrap_policy() -> None:
    from stune.sharding import _units

    model = Chain(checkpointed=False)
    blocks = _units(model, None, config(fsdp_transformer_layer_cls_to_wrap="Sequential"))
    assert blocks == list(model.blocks)
    assert _units(model, None, config(fsdp_auto_wrap_policy="NO_WRAP")) == []
    sized = _units(model, None, config(fsdp_auto_wrap_policy="SIZE_BASED_WRAP", fsdp_min_num_params=50))
    assert sized == list(model.blocks)  # each block has 84 weights, each of its layers 42
    with pytest.raises(ConfigError, match="needs block classes"):
        _units(model, None, config())
