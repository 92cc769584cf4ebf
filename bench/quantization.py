"""Host memory, step time and loss per base_model_precision on a FLUX-width transformer, as a table.

The model: FLUX.1's real width (hidden 3072, 24 heads of 128, T5 width 4096, CLIP pooled 768) at a
reduced depth (default 1 double + 2 single blocks; `--depth real` is FLUX.1's 19 + 38), random
weights saved in bf16 safetensors, with the tiny FLUX VAE, tokenizers and one-layer text encoders
of the real widths, on the tiny shapes dataset. Every precision trains the same rank-16 LoRA
(adamw_bf16, mixed_precision bf16, as the FLUX seed) through `st-train`'s own phases, each in a
fresh process so its memory is its own:

* `load×`: peak host RSS while loading and quantizing the transformer, minus the RSS before
  loading, as a multiple of the bf16 transformer's size (the checkpoint file). Goal: ≤ 1.3×;
  SimpleTuner needs about 2× ("50 GB of system memory just to quantize FLUX").
* `held MB`: host RSS the loaded (quantized) model keeps after loading.
* `step MB`: peak host RSS during the training steps, minus the RSS before loading.
* `s/step`: median seconds per step after the first two; `loss`: mean of the last 5 steps' losses.
* on CUDA, `VRAM GB`: peak memory allocated during the steps, next to the FLUX seed's tiers for a
  rank-16 LoRA at 1024 px (30 / 18 / 13 / 9 GB unquantized / int8 / int4 / nf4 or int2).

The row `int8-quanto/pages-kept` quantizes without handing the checkpoint's pages back (what
loading then quantizing does by default) to show where SimpleTuner's 2× comes from.

    python bench/quantization.py [--steps 24] [--precisions int8-quanto,nf4-bnb] [--depth real] [--resolution 1024]

(`int8-torchao/pipeline` loads through diffusers' TorchAoConfig, quantize_via=pipeline.)
"""

from __future__ import annotations

import argparse
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

CPU_PRECISIONS = [
    "no_change",
    "int8-quanto",
    "int8-quanto/pages-kept",
    "int4-quanto",
    "int2-quanto",
    "fp8-quanto",
    "fp8uz-quanto",
    "int8-torchao",
    "int8-torchao/pipeline",
    "fp8wo-torchao",
    "int4-torchao",
    "nf4-bnb",
]
CUDA_ONLY = ["fp8-torchao", "int8dq-torchao"]
SEED_TIERS_GB = {
    "no_change": 30,
    "int8-quanto": 18,
    "int8-torchao": 18,
    "int4-quanto": 13,
    "nf4-bnb": 9,
    "int2-quanto": 9,
}
DEPTHS = {"reduced": (1, 2), "real": (19, 38)}
RANK = 16


# -- the model and the run folder --------------------------------------------------------------------------------


def build_pipeline(path: Path, double: int, single: int, device: str) -> Path:
    """The tiny FLUX pipeline with text encoders and a transformer of FLUX's real widths."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from stune_flux.tiny import build_tiny_flux

    build_tiny_flux(path)
    clip = CLIPTextConfig.from_pretrained(path / "text_encoder")
    clip.update({"hidden_size": 768, "projection_dim": 768, "intermediate_size": 256, "num_hidden_layers": 1})
    clip.num_attention_heads = 12
    CLIPTextModel(clip).save_pretrained(path / "text_encoder")
    t5 = T5Config.from_pretrained(path / "text_encoder_2")
    t5.update({"d_model": 4096, "d_ff": 256, "d_kv": 64, "num_heads": 2, "num_layers": 1})
    T5EncoderModel(t5).save_pretrained(path / "text_encoder_2")

    config = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 from the start: no second copy, no cast
    try:
        with init_empty_weights():
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    transformer.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():  # random weights, much faster than the layers' init
            if name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    transformer.to("cpu")
    shutil.rmtree(path / "transformer")
    transformer.save_pretrained(path / "transformer", max_shard_size="5GB")
    return path


def write_bench_run(folder: Path, model: Path, steps: int, resolution: int) -> Path:
    from stune.testing import write_run
    from stune_flux.tiny import build_dataset

    build_dataset(folder / "data", count=8, size=max(96, resolution))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": "output",
        "max_train_steps": steps,
        "train_batch_size": 1,
        "lora_rank": RANK,
        "lora_dropout": 0.0,
        "learning_rate": "1e-4",
        "lr_scheduler": "constant",
        "optimizer": "adamw_bf16",
        "mixed_precision": "bf16",
        "gradient_checkpointing": "true",
        "tokenizer_max_length": 16 if resolution <= 256 else 512,
        "resolution": resolution,
        "resolution_type": "pixel_area",
        "caption_strategy": "textfile",
        "caption_dropout_probability": 0.0,
        "seed": 0,
        "checkpoint_step_interval": 0,
        "validation_disable": "true",
        "disable_benchmark": "true",
        "resume_from_checkpoint": "none",
    }
    datasets = [
        {"id": "pics", "instance_data_dir": "data", "cache_dir_vae": "cache/vae", "repeats": 0},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    write_run(folder, config, datasets)
    return folder


# -- one precision, in its own process ----------------------------------------------------------------------------


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS


def measure(run: Path, row: str) -> dict[str, Any]:
    """Load + quantize, then train; the memory of each phase (runs in a child process)."""
    import gc

    # Everything the phases import, imported before the baseline: it is not the model's memory.
    import diffusers.models.modeling_utils  # noqa: F401  (imports bitsandbytes and torchao when installed)
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    import stune_quant.hostmem
    from stune.plugins import PluginHost
    from stune.resume import resume
    from stune.run import setup
    from stune.session import prepare
    from stune.train import build_model, load_data, loop

    precision, _, variant = ("no_change" if row == "warm-up" else row).partition("/")
    overrides = {"base_model_precision": precision, "output_dir": "output-" + row.replace("/", "-")}
    if variant == "pipeline":
        overrides["quantize_via"] = "pipeline"
    if variant == "pages-kept":
        stune_quant.hostmem._LIBC = None  # neither madvise nor malloc_trim: what plain load + quantize does
    if precision.endswith("quanto"):
        import optimum.quanto  # noqa: F401
    os.chdir(run)
    session = prepare(host=PluginHost.build(["flux", "quant"]), overrides=overrides)
    state = setup(session)
    if row == "warm-up":  # fills the latent and text caches once, so no measured row loads text encoders
        load_data(state)
        return {"row": row}
    gc.collect()
    cuda = torch.cuda.is_available()
    before = _status()["VmRSS"]
    _reset_peak()
    started = time.perf_counter()
    load_data(state)
    load_seconds = time.perf_counter() - started
    gc.collect()
    after_load = _status()
    load_peak, held = after_load["VmHWM"] - before, after_load["VmRSS"] - before
    build_model(state)
    resume(state)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak()
    loop(state)
    step_peak = _status()["VmHWM"] - before
    vram = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    records = [json.loads(line) for line in (state.output_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in records[2:]] or [r["step_seconds"] for r in records]
    return {
        "row": row,
        "load_peak_mb": load_peak,
        "held_mb": held,
        "step_peak_mb": step_peak,
        "load_seconds": load_seconds,
        "step_seconds": statistics.median(times),
        "loss": statistics.fmean(r["loss"] for r in records[-5:]),
        "vram_gb": vram,
    }


def child(run: Path, row: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", row, "--run", str(run)], capture_output=True, text=True, env=os.environ
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"row": row, "error": reason[:110]}


# -- the table ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--depth", choices=sorted(DEPTHS), default="reduced")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 on the CPU, 1024 on CUDA")
    parser.add_argument("--precisions", default=None, help="comma-separated rows (default: all that run here)")
    parser.add_argument("--keep", type=Path, default=None, help="build the model and run folder here and keep them")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.run, args.child)), flush=True)
        return

    from stune_quant import quiet

    quiet.install()  # the backends' import notices (see stune_quant.quiet)
    import torch

    cuda = torch.cuda.is_available()
    resolution = args.resolution or (1024 if cuda else 64)
    rows = args.precisions.split(",") if args.precisions else CPU_PRECISIONS + (CUDA_ONLY if cuda else [])
    work = args.keep or Path(tempfile.mkdtemp(prefix="stune-quant-bench-"))
    double, single = DEPTHS[args.depth]
    model = work / "model"
    if not (model / "transformer").is_dir():
        build_pipeline(model, double, single, "cuda" if cuda else "cpu")
    size_mb = sum(f.stat().st_size for f in (model / "transformer").glob("*.safetensors")) / 2**20
    run = write_bench_run(work / "run", model, args.steps, resolution)
    warm = child(run, "warm-up")
    if "error" in warm:
        raise SystemExit(f"filling the caches failed: {warm['error']}")
    results = [child(run, row) for row in rows]

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nquantization on a FLUX-width transformer (3072 wide, 24 heads; {double} double + {single} single blocks, "
        f"bf16 {size_mb:.0f} MB; LoRA rank {RANK}, batch 1, {resolution} px, {args.steps} steps; {device}; "
        f"torch {torch.__version__})"
    )
    header = f"{'precision':<26} {'load×':>6} {'held MB':>8} {'step MB':>8} {'load s':>7} {'s/step':>7} {'loss':>8}"
    print(header + (f" {'VRAM GB':>8} {'seed GB':>8}" if cuda else ""))
    for r in results:
        if "error" in r:
            print(f"{r['row']:<26} —  {r['error']}")
            continue
        line = (
            f"{r['row']:<26} {r['load_peak_mb'] / size_mb:6.2f} {r['held_mb']:8.0f} {r['step_peak_mb']:8.0f} "
            f"{r['load_seconds']:7.1f} {r['step_seconds']:7.2f} {r['loss']:8.4f}"
        )
        if cuda:
            tier = SEED_TIERS_GB.get(r["row"])
            line += f" {r['vram_gb']:8.1f} {tier if tier is not None else '—':>8}"
        print(line)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
