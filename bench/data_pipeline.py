"""Data pipeline throughput: latent caching (1 decode thread vs all cores) and batch loading
against the training step, on the tiny FLUX model, side by side in one run.

    python bench/data_pipeline.py [--images 48] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import step_overhead  # the same tiny models and run folders

from stune.data.cache import LatentCache
from stune.data.images import load_sample
from stune.data.loader import BatchLoader, BatchPlan
from stune.data.prepare import fill_caches, plan_caches, scan
from stune.family import LoadRequest
from stune.plugins import PluginHost
from stune.session import prepare


def photos(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = (size, int(size * 0.75)) if i % 2 else (int(size * 0.75), size)
        noise = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC)
        img.save(folder / f"photo_{i:04d}.jpg", quality=92)
        (folder / f"photo_{i:04d}.txt").write_text(f"photo number {i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="long side of the generated JPEGs")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stune-data-bench-"))
    model = step_overhead.build_model(work / "model", step_overhead.SIZES["tiny (dim 256, 2+4 blocks)"])
    run = step_overhead.write_bench_run(work / "run", model, args.steps)
    shutil.rmtree(run / "data")
    photos(run / "data", args.images, args.size)
    os.chdir(run)
    config_file = run / "config" / "config.json"  # train at 256² (pixel_area) buckets
    config_file.write_text(config_file.read_text().replace('"resolution": 64', '"resolution": 256'))
    session = prepare(host=PluginHost.build(["flux"]))
    config, family, host = session.config, session.family, session.host
    report = scan(config, family)
    plan = plan_caches(config, family, report, [])
    request = LoadRequest(torch.device("cpu"), torch.float32)
    components = host.hooks.load_model(family=family, config=config, request=request)
    jobs = plan.latent_jobs["pics"]

    def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return family.encode_images(components, pixels)

    def decode_only(workers: int) -> float:
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda j: load_sample(j.image, j.plan), jobs))
        return len(jobs) / (time.perf_counter() - start)

    def cache_rate(workers: int) -> float:
        shutil.rmtree(run / "cache" / "vae", ignore_errors=True)
        start = time.perf_counter()
        LatentCache.fill(jobs, lambda j: (load_sample(j.image, j.plan), None), encode, 4, 128, workers=workers)
        return len(jobs) / (time.perf_counter() - start)

    cores = os.cpu_count() or 1
    rows = [
        ("decode + resize + crop only", decode_only(1), decode_only(cores)),
        ("cache latents (decode ‖ VAE encode, write)", cache_rate(1), cache_rate(cores)),
    ]
    data = fill_caches(plan, config, family, components, host, torch.device("cpu"))

    batch_plan = BatchPlan(data.samples, {"pics": config.train_batch_size}, 0, 0.1)
    loader = BatchLoader(batch_plan, data.text_cache)
    batches = batch_plan.epoch(0)
    load_times = []
    for batch in batches:
        start = time.perf_counter()
        loader.load(batch)
        load_times.append(time.perf_counter() - start)
    load_s = statistics.median(load_times)
    step_s = step_overhead.steady(step_overhead.stune_steps(run))

    print(f"\nlatent caching, {len(jobs)} JPEGs of {args.size} px → 256² buckets, tiny FLUX VAE, CPU")
    print(f"{'stage':<46} {'1 thread':>12} {f'{cores} threads':>12}")
    for name, one, many in rows:
        print(f"{name:<46} {one:>9.1f}/s {many:>9.1f}/s")
    print(f"\nbatch loading vs training step (batch {config.train_batch_size}, 256² latents, tiny FLUX dim 256)")
    print(f"{'load one batch from the caches':<46} {load_s * 1000:>9.2f} ms")
    print(f"{'one training step':<46} {step_s * 1000:>9.2f} ms")
    print(f"{'loader / step (below 1: hidden by prefetch)':<46} {load_s / step_s:>12.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
