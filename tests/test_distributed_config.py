"""Several processes from config.json alone: `num_processes: 2` makes `st-train` relaunch itself
through accelerate (no launcher typed), and `fsdp_enable` shards the transformer with FSDP2 over
two CPU processes (gloo); its checkpoints resume under FSDP and in a single process. FSDP 1 and
DeepSpeed need CUDA: what they hand to accelerate, and their refusal on this machine."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stune.testing import make_images, run_cli, write_run


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_folder(folder: Path, model: Path, **options: Any) -> Path:
    if not (folder / "data").is_dir():
        make_images(folder / "data", 8, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": 4,
        "train_batch_size": 1,
        "learning_rate": "1e-3",
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 5,
        "checkpoint_step_interval": 2,
        "validation_step_interval": 0,
        "num_processes": 2,
        "main_process_port": _port(),
        **options,
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


def _train(run: Path, *plugins: str) -> str:
    proc = run_cli(["--plugin", "flux", *[arg for p in plugins for arg in ("--plugin", p)]], cwd=run, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]


def _optimizer_steps(checkpoint: Path) -> set[float]:
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    return {float(s["step"]) for s in state["optimizer"]["state"].values()}


def test_num_processes_in_the_config_runs_two_processes(tmp_path: Path, tiny_flux_dir: Path) -> None:
    log = _train(_run_folder(tmp_path, tiny_flux_dir))
    assert "relaunching with accelerate" in log and "--num_processes 2" in log
    shares = re.search(r"caches filled: 8 latents and \d+ captions encoded \(per process: (.*)\)", log)
    assert shares and len(eval(shares.group(1))) == 2, log[-3000:]  # each process encoded its share
    assert "4 batches per epoch" in log  # 8 samples, batch 1, two processes
    assert _steps(tmp_path) == [1, 2, 3, 4] and log.count("done: 4 steps") == 1


#: a plugin file for the training processes: once sharded, each writes which of its modules are FSDP2 modules
FSDP_PROBE = """
import json, os
from stune.hookspecs import hookimpl


@hookimpl
def route_tokens(family, transformer, layout, features, config):
    def probe(module, args, kwargs):
        from torch.distributed.fsdp import FSDPModule

        blocks = [type(block).__name__ for _, _, block in layout.blocks(module) if isinstance(block, FSDPModule)]
        record = {"transformer": isinstance(module, FSDPModule), "fsdp_blocks": blocks}
        with open(f"fsdp-probe-{os.environ['RANK']}.json", "w") as file:
            json.dump(record, file)

    transformer.register_forward_pre_hook(probe, with_kwargs=True)
"""


def test_fsdp_trains_and_resumes_sharded_and_in_one_process(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """fsdp_version 2 shards with torch's fully_shard: the training processes see their transformer
    and each of its blocks as FSDP2 modules (``torch.distributed.fsdp.FSDPModule``)."""
    from diffusers import FluxPipeline

    first = _run_folder(
        tmp_path / "fsdp",
        tiny_flux_dir,
        fsdp_enable=True,
        fsdp_version=2,
        fsdp_cpu_ram_efficient_loading=True,
        fsdp_activation_checkpointing=True,
        validation_prompt="a picture number 2",
        validation_resolution="64x64",
        validation_num_inference_steps=2,
        validation_step_interval=2,
    )
    probe = tmp_path / "fsdp_probe.py"
    probe.write_text(FSDP_PROBE)
    log = _train(first, str(probe))
    assert "FSDP2: 3 sharded units over 2 processes" in log
    # The tiny FLUX has one double-stream block and two single-stream ones; fully_shard gives each
    # sharded module a class FSDP<its class> deriving from FSDPModule.
    blocks = ["FSDPFluxTransformerBlock", "FSDPFluxSingleTransformerBlock", "FSDPFluxSingleTransformerBlock"]
    for rank in (0, 1):
        assert json.loads((first / f"fsdp-probe-{rank}.json").read_text()) == {
            "transformer": True,
            "fsdp_blocks": blocks,
        }
    out = first / "output"
    assert {p.name for p in (out / "checkpoint-4" / "optimizer").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    assert len(list((out / "validation_images").glob("step-*.png"))) == 2  # rendered by both, saved once
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(out)
    assert len([k for k in pipe.transformer.state_dict() if "lora" in k]) == len(saved)

    single = tmp_path / "single"
    shutil.copytree(first, single, ignore=shutil.ignore_patterns("cache"))

    # Resumed under FSDP (sharded optimizer state), writing the gathered one this time.
    _run_folder(first, tiny_flux_dir, fsdp_enable=True, max_train_steps=6, fsdp_state_dict_type="FULL_STATE_DICT")
    log = _train(first)
    assert "resumed from output/checkpoint-4 at step 4" in log
    assert _steps(first) == [1, 2, 3, 4, 5, 6]
    assert _optimizer_steps(out / "checkpoint-6") == {6.0}  # the state went on from step 4

    # The same FSDP checkpoint resumed by one process.
    _run_folder(single, tiny_flux_dir, fsdp_enable=True, max_train_steps=6, num_processes=1)
    log = _train(single)
    assert "resumed from output/checkpoint-4 at step 4" in log and "relaunching" not in log
    assert _optimizer_steps(single / "output" / "checkpoint-6") == {6.0}


def _refused(run: Path, message: str) -> None:
    """`st-train` stops at the configuration check: exit 2, one sentence, before any model loads."""
    proc = run_cli(["--plugin", "flux"], cwd=run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "relaunching" not in proc.stderr
    assert not (run / "output").exists() and not (run / "cache").exists()  # nothing loaded, encoded or written


def test_fsdp_version_1_goes_to_accelerate_and_needs_cuda(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """fsdp_version 1 is accelerate's FSDP plugin (version 2 is stune's own fully_shard, so accelerate
    gets no plugin); on a machine without CUDA st-train stops at the check. The FSDP 1 run itself is
    not run here."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from stune.config import CoreOptions
    from stune.sharding import accelerate_plugins

    blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    config = CoreOptions.model_validate({"fsdp_enable": True, "fsdp_version": 1})
    [(name, plugin)] = accelerate_plugins(config, blocks).items()
    assert name == "fsdp_plugin" and isinstance(plugin, FullyShardedDataParallelPlugin)
    assert plugin.fsdp_version == 1 and plugin.transformer_cls_names_to_wrap == blocks
    assert accelerate_plugins(config.model_copy(update={"fsdp_version": 2}), blocks) == {}
    if not torch.cuda.is_available():
        _refused(
            _run_folder(tmp_path, tiny_flux_dir, fsdp_enable=True, fsdp_version=1),
            "fsdp_version 1 runs through accelerate on CUDA GPUs only, which this machine lacks; use fsdp_version 2.",
        )


def test_deepspeed_config_becomes_accelerates_deepspeed_plugin(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """The DeepSpeed JSON (a file, inline text or an object in config.json) becomes accelerate's
    DeepSpeedPlugin with the values given; "auto" sizes and clipping come from the run's options.
    ``stune.run.setup`` hands this plugin to ``Accelerator``. Without CUDA, st-train stops at the
    check. The sharded DeepSpeed run itself needs CUDA GPUs and the deepspeed package and is not
    run here."""
    from accelerate.utils import DeepSpeedPlugin

    from stune.config import CoreOptions
    from stune.sharding import accelerate_plugins

    zero = {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    given = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(given))
    options = {"train_batch_size": 3, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5}
    for value in (str(path), json.dumps(given), given):
        config = CoreOptions.model_validate({**options, "deepspeed_config": value})
        [(name, plugin)] = accelerate_plugins(config, []).items()
        assert name == "deepspeed_plugin" and isinstance(plugin, DeepSpeedPlugin)
        assert plugin.deepspeed_config == {
            **given,
            "train_micro_batch_size_per_gpu": 3,
            "gradient_accumulation_steps": 2,
            "gradient_clipping": 0.5,
            "steps_per_print": float("inf"),  # accelerate's own: it silences DeepSpeed's step logging
        }
        assert (plugin.zero_stage, plugin.offload_optimizer_device, plugin.offload_param_device) == (3, "cpu", "cpu")
        assert plugin.zero3_save_16bit_model
        assert (plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (2, 0.5)
    fixed = {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 8,
        "gradient_clipping": 2.0,
    }
    config = CoreOptions.model_validate({**options, "deepspeed_config": fixed})
    plugin = accelerate_plugins(config, [])["deepspeed_plugin"]
    assert plugin.deepspeed_config == {**fixed, "steps_per_print": float("inf")}  # numbers given are kept
    unclipped = CoreOptions.model_validate({"max_grad_norm": 0, "deepspeed_config": {"zero_optimization": {}}})
    assert accelerate_plugins(unclipped, [])["deepspeed_plugin"].deepspeed_config["gradient_clipping"] == 0.0

    if not torch.cuda.is_available():
        run = _run_folder(tmp_path / "run", tiny_flux_dir, deepspeed_config=str(path))
        _refused(run, "deepspeed_config needs CUDA GPUs, which this machine lacks; use fsdp_enable instead.")
