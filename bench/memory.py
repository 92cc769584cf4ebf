"""Memory and speed of the memory/speed options, as ratios to the plain run, in one table.

Every option trains the same FLUX-shaped model on the same cached data, each in its own process
(peak memory is per process), through the real `st-train` phases.

* On the CPU (here): the tiny model and a wider one (dim 768, 2 + 4 blocks, 256 tokens per image).
  Memory is the peak RSS of the training loop (``VmHWM``, reset when the loop starts) and how far
  it rises above the RSS the loop starts with (``Δ``: activations, gradients, optimizer state).
* On a CUDA GPU: the real FLUX.1 transformer size (19 + 38 blocks, dim 3072; random weights; tiny
  text encoders) in bf16 and int8 (``base_model_precision=int8-quanto``, needs stune-quant), at
  512 px: peak allocated VRAM and s/step per option, and the MFU of the plain bf16 LoRA step —
  FLOPs counted from the model by torch's FlopCounterMode over one forward and backward, divided
  by the step time and the GPU's dense bf16 peak (``--peak-tflops`` for GPUs not in the table).

    python bench/memory.py [--steps 8] [--sizes tiny,wide] [--rows plain,checkpointing,...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
FLUX_DEV = {"attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": {}, "resolution": 64, "batch": 2, "text": 32},
    "wide": {
        "shape": {"attention_head_dim": 64, "num_attention_heads": 12, "num_layers": 2, "num_single_layers": 4},
        "resolution": 256,
        "batch": 2,
        "text": 32,
    },
    "flux": {"shape": FLUX_DEV, "resolution": 512, "batch": 1, "text": 512},
}
PLAIN = {"gradient_checkpointing": False}
#: row → (group it is a ratio within, options); each group's first row is its reference
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("lora", PLAIN),
    "checkpointing": ("lora", {"gradient_checkpointing": True}),
    "checkpointing interval 2": ("lora", {"gradient_checkpointing": True, "gradient_checkpointing_interval": 2}),
    "compiled (regional)": ("lora", {**PLAIN, "dynamo_backend": "inductor"}),
    "compiled (whole model)": (
        "lora",
        {**PLAIN, "dynamo_backend": "inductor", "dynamo_use_regional_compilation": False},
    ),
    "chunked feed-forward": ("lora", {**PLAIN, "enable_chunked_feed_forward": True, "feed_forward_chunk_size": 64}),
    "fused qkv": ("lora", {**PLAIN, "fuse_qkv_projections": True}),
    "group offload (disk)": ("lora", {**PLAIN, "enable_group_offload": True, "group_offload_to_disk_path": "OFFLOAD"}),
    "block swap (half)": ("lora", {**PLAIN, "musubi_blocks_to_swap": "HALF"}),
    # A full fine-tune checkpoints its activations, as it would for real: the gradients are then most
    # of what the backward pass holds, which is what the fused backward pass removes.
    "full: plain": ("full", {"model_type": "full", "gradient_checkpointing": True}),
    "full: fused backward": ("full", {"model_type": "full", "gradient_checkpointing": True, "fuse_optimizer": True}),
}
CPU_ROWS = [row for row in ROWS if row != "compiled (whole model)"]  # minutes to compile on a CPU
CUDA_ROWS = [
    "plain",
    "checkpointing",
    "checkpointing interval 2",
    "compiled (regional)",
    "chunked feed-forward",
    "fused qkv",
    "group offload (disk)",
    "block swap (half)",
]
#: dense bf16 tensor-core peak (TFLOPS) by device-name fragment
PEAK_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


# -- one row, in a child process ---------------------------------------------------------------------


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(run_dir: Path, flops: bool) -> dict[str, Any]:
    import torch

    import stune
    from stune import train as phases
    from stune.plugins import PluginHost
    from stune.session import prepare

    cpu_times: list[float] = []

    class Clock:
        """The process's CPU seconds at the end of every step: on a CPU shared with other work, the
        work a step did (wall time also counts the time other processes had the cores)."""

        @stune.hookimpl
        def on_step_end(self) -> None:
            cpu_times.append(time.process_time())

    os.chdir(run_dir)
    names = ["flux", "quant"] if _has_quant() else ["flux"]
    run = phases.setup(prepare(host=PluginHost.build(names, plugins=[Clock()])))
    phases.load_data(run)
    phases.build_model(run)
    cuda = run.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_rss = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here on
    started = time.perf_counter()
    phases.loop(run)
    loop_seconds = time.perf_counter() - started
    result: dict[str, Any] = {"loop_seconds": loop_seconds}
    records = [json.loads(line) for line in (run_dir / "output" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in records]
    result["first_step"] = times[0]
    result["step"] = statistics.median(times[len(times) // 2 :])  # after warm-up (and compilation)
    steps_cpu = [b - a for a, b in itertools.pairwise(cpu_times)]
    result["cpu_step"] = statistics.median(steps_cpu[len(steps_cpu) // 2 :]) if steps_cpu else float("nan")
    if cuda:
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["start_mb"] = 0.0
    else:
        result["peak_mb"] = _rss("VmHWM")
        result["start_mb"] = start_rss
    if flops:
        result["flops"] = _step_flops(run)
    return result


def _has_quant() -> bool:
    import importlib.util

    return importlib.util.find_spec("stune_quant") is not None


def _step_flops(run: Any) -> float:
    """FLOPs of one training micro-step (forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from stune.train import micro_step

    batch = next(iter(_batches(run)))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = micro_step(run, batch)
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _batches(run: Any) -> Any:
    from stune.data.loader import BatchLoader

    loader = BatchLoader(run.plan, run.data.text_cache)
    for _, _, batch in loader.stream(0, 0):
        yield batch


# -- the parent: build models, run rows, print the table -----------------------------------------------


def build(work: Path, size: str) -> Path:
    sys.path.insert(0, str(HERE))
    import step_overhead

    model = work / f"model-{size}"
    if (model / "model_index.json").is_file():
        return model
    if size != "flux":
        return step_overhead.build_model(model, SIZES[size]["shape"])
    # FLUX.1's transformer at full size, random weights made directly in bf16 (fp32 would need 48 GB).
    import torch
    from diffusers import FluxTransformer2DModel

    from stune_flux.tiny import build_tiny_flux

    build_tiny_flux(model)
    config = dict(FluxTransformer2DModel.load_config(model / "transformer"))
    config.update(SIZES[size]["shape"], axes_dims_rope=(16, 56, 56))
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            transformer = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    shutil.rmtree(model / "transformer")
    transformer.save_pretrained(model / "transformer")
    del transformer
    torch.cuda.empty_cache()
    return model


def write_row(folder: Path, model: Path, size: str, row: str, steps: int, cache: Path) -> Path:
    from stune.testing import make_images, write_run

    spec = SIZES[size]
    options = dict(ROWS[row][1])
    if options.get("group_offload_to_disk_path") == "OFFLOAD":
        options["group_offload_to_disk_path"] = str(folder / "offload")
    if options.get("musubi_blocks_to_swap") == "HALF":
        depth = 3 if size == "tiny" else spec["shape"]["num_layers"] + spec["shape"]["num_single_layers"]
        options["musubi_blocks_to_swap"] = depth // 2
    data = cache.parent / f"data-{size}"
    if not data.is_dir():
        make_images(data, 8, size=(spec["resolution"], spec["resolution"]))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": steps,
        "train_batch_size": spec["batch"],
        "lora_rank": 16,
        "lora_dropout": 0.0,
        "learning_rate": "1e-4",
        "lr_scheduler": "constant",
        "mixed_precision": "bf16" if _cuda() else "no",
        "tokenizer_max_length": spec["text"],
        "resolution": spec["resolution"],
        "caption_strategy": "textfile",
        "caption_dropout_probability": 0.0,
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_step_interval": 0,
        "resume_from_checkpoint": "none",
        "disable_benchmark": True,
        **options,
    }
    if _cuda() and row.startswith("int8"):
        config["base_model_precision"] = "int8-quanto"
    datasets = [
        {"id": "pics", "instance_data_dir": str(data), "cache_dir_vae": str(cache / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(cache / "text")},
    ]
    write_run(folder, config, datasets)
    return folder


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_row(folder: Path, flops: bool) -> dict[str, Any] | str:
    cmd = [sys.executable, __file__, "--child", str(folder)] + (["--flops"] if flops else [])
    # One CPU thread: per-step CPU time is then the step's work, whatever else the machine runs.
    env = dict(os.environ) if _cuda() else {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # compiled cold: the first step shows it all
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        return lines[-1][:80] if lines else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_tflops(override: float | None) -> float | None:
    import torch

    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default=None, help="tiny,wide on the CPU; flux on CUDA")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all for the machine)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for the MFU")
    parser.add_argument(
        "--flux-blocks", default=None, help="DOUBLE,SINGLE blocks of the CUDA model (default FLUX.1's 19,38)"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.flops)))
        return

    cuda = _cuda()
    if args.flux_blocks:
        double, single = (int(n) for n in args.flux_blocks.split(","))
        SIZES["flux"]["shape"] = {**FLUX_DEV, "num_layers": double, "num_single_layers": single}
    sizes = (args.sizes or ("flux" if cuda else "tiny,wide")).split(",")
    rows = args.rows.split(",") if args.rows else (CUDA_ROWS if cuda else CPU_ROWS)
    if cuda:
        ROWS.update({f"int8: {name}": ROWS[name] for name in ("plain", "checkpointing", "compiled (regional)")})
        if _has_quant() and not args.rows:
            rows += ["int8: plain", "int8: checkpointing", "int8: compiled (regional)"]
    work = Path(tempfile.mkdtemp(prefix="stune-bench-memory-"))
    table: list[tuple[str, str, Any]] = []
    try:
        for size in sizes:
            model = build(work, size)
            cache = work / f"cache-{size}"
            # Fill the caches first, so that every measured run starts from the same state (the one
            # that encodes leaves the allocator with more memory to reuse).
            run_row(write_row(work / f"warm-{size}", model, size, "plain", 1, cache), False)
            for row in rows:
                folder = write_row(work / f"run-{size}-{len(table)}", model, size, row, args.steps, cache)
                flops = cuda and row == "plain"
                outcome = run_row(folder, flops)
                table.append((size, row, outcome))
                print(f"  {size:<5} {row:<28} {outcome if isinstance(outcome, str) else 'done'}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(table, cuda, args)


def report(table: list[tuple[str, str, Any]], cuda: bool, args: argparse.Namespace) -> None:
    import torch

    device = torch.cuda.get_device_name() if cuda else "CPU, one thread"
    memory = "peak VRAM allocated" if cuda else "peak RSS of the loop"
    clock = "s/step" if cuda else "cpu s/step"
    print(f"\n{memory} and s/step per option ({device}, {args.steps} steps, LoRA rank 16 unless 'full')")
    print(
        f"{'size':<5} {'option':<28} {'peak MB':>9} {'Δ MB':>8} {'mem ×':>6} {clock:>10} {'time ×':>7} {'1st step':>9}"
    )
    references: dict[tuple[str, str], dict[str, Any]] = {}
    for size, row, outcome in table:
        group = "int8" if row.startswith("int8") else ROWS[row][0]
        if isinstance(outcome, str):
            print(f"{size:<5} {row:<28} {'failed: ' + outcome}")
            continue
        ref = references.setdefault((size, group), outcome)
        delta, ref_delta = outcome["peak_mb"] - outcome["start_mb"], ref["peak_mb"] - ref["start_mb"]
        memory_ratio = delta / ref_delta if ref_delta > 0 else float("nan")
        step, ref_step = (outcome["step"], ref["step"]) if cuda else (outcome["cpu_step"], ref["cpu_step"])
        print(
            f"{size:<5} {row:<28} {outcome['peak_mb']:>9.0f} {delta:>8.0f} {memory_ratio:>6.2f} "
            f"{step:>10.3f} {step / ref_step:>7.2f} {outcome['first_step']:>9.2f}"
        )
    print("mem ×: Δ (on CUDA: the peak) over the group's first row (LoRA: plain, full: plain, int8: plain);")
    print("time ×: the same for the step time; 1st step: wall seconds of the first step (compilation included)")
    if cuda:
        plain = next((o for s, r, o in table if r == "plain" and isinstance(o, dict)), None)
        peak = peak_tflops(args.peak_tflops)
        if plain is not None and "flops" in plain:
            achieved = plain["flops"] / plain["step"] / 1e12
            mfu = f"{achieved / peak:.1%}" if peak else "unknown peak (pass --peak-tflops)"
            print(
                f"MFU of the plain bf16 LoRA step: {plain['flops'] / 1e12:.2f} TFLOP per step, {achieved:.1f} TFLOPS, {mfu}"
            )


if __name__ == "__main__":
    main()
