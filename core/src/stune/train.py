"""The training run, top to bottom (DESIGN.md §3).

setup → scan datasets → load (+ quantize) → caches → drop text encoders → adapter (+ features)
→ optimizer → resume → loop (batch → noise, σ → family forward → loss → backward → clip → step)
→ export. Plugins take part through the hooks at phase boundaries; the step itself calls only
the family's ``predict`` and the ``compute_loss`` hook.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stune import checkpoint, optim
from stune._defaults import weight_dtype
from stune.adapters import ADAPTERS, adapter_kind, create_adapter
from stune.data.loader import BatchLoader, BatchPlan
from stune.data.prepare import fill_caches, plan_caches, scan
from stune.distributed import Processes
from stune.ema import EMA
from stune.errors import ConfigError, UserError
from stune.evaluation import make_evaluator
from stune.flow import noisy_inputs, resolution_shift, sample_sigmas
from stune.memory import enable_gradient_checkpointing
from stune.metrics import MetricsLog
from stune.publish import finish_run
from stune.session import Session
from stune.signals import StopRequest
from stune.state import TrainState
from stune.tracking import start_trackers
from stune.validation import (
    BASE_PREFIX,
    benchmark_needed,
    render,
    rendered_prompts,
    step_prefix,
    validation_prompts,
)

log = logging.getLogger("stune.train")
EMA_STATE = "ema_state.safetensors"
_SHARDED_ENGINES = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_files: list[Path]
    final_step: int
    checkpoints: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    encoded_latents: int = 0
    encoded_captions: int = 0
    interrupted: int | None = None  # the signal that stopped the run early (a checkpoint was saved)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


def _accelerator(mixed_precision: str) -> Any:
    """An Accelerator for this run. accelerate keeps its precision in a process-wide singleton;
    a second run in the same process (tests, notebooks) may ask for another precision, so that
    part is cleared first. The process-group part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # accelerate only builds a multi-process CPU (gloo) group when told the run is on the CPU.
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision, cpu=no_gpu and multi)


def train(session: Session) -> TrainResult:
    from accelerate.utils import set_seed

    config, family, host = session.config, session.family, session.host
    output_dir = Path(config.output_dir)
    started = time.perf_counter()

    # -- setup --------------------------------------------------------------------------------
    accelerator = _accelerator(config.mixed_precision)
    device = accelerator.device
    processes = Processes(accelerator.process_index, accelerator.num_processes, accelerator)
    resume_from = checkpoint.resolve_resume(output_dir, config.resume_from_checkpoint)
    resumed = checkpoint.read_state(resume_from) if resume_from else None
    # A run without a seed picks one and records it, so a resumed run replays the same batches.
    seed = int(resumed["seed"]) if resumed else (config.seed if config.seed is not None else random.randrange(2**31))
    set_seed(seed)

    # -- data scan, model, caches ------------------------------------------------------------------
    report = scan(config, family, accelerator.num_processes)  # fails fast, before any weights are read
    kind = adapter_kind(config)
    if not ADAPTERS[kind].can_disable and any(d.dataset.is_regularisation for d in report.training):
        raise ConfigError(
            "Regularisation datasets train towards the base model's prediction, which needs an adapter to switch "
            "off; use model_type=lora, or remove is_regularisation_data."
        )
    prompts = validation_prompts(config)
    cache_plan = plan_caches(config, family, report, list(prompts.values()))
    missing_captions = len(cache_plan.missing_captions)
    log.info("caches: %d latents and %d captions to encode", cache_plan.missing_latents, missing_captions)
    components = host.hook.load_model(family=family, config=config, device=device, text_encoders=missing_captions > 0)
    host.hook.quantize(components=components, family=family, config=config)
    data = fill_caches(cache_plan, config, family, components, host, device, processes)
    shares = processes.gather((data.encoded_latents, data.encoded_captions))
    log.info(
        "caches filled: %d latents and %d captions encoded%s",
        sum(s[0] for s in shares),
        sum(s[1] for s in shares),
        f" (per process: {shares})" if processes.world > 1 else "",
    )
    if accelerator.is_main_process:
        report.write(output_dir)
    for ds in report.datasets:
        for skipped in ds.skipped:
            log.warning("dataset %s: skipped %s (%s) %s", ds.dataset.id, skipped.path, skipped.reason, skipped.detail)
        for (w, h), count in ds.dropped_buckets.items():
            log.warning(
                "dataset %s: bucket %dx%d has %d samples, fewer than a batch of %d: not trained on",
                ds.dataset.id,
                w,
                h,
                count,
                ds.effective_batch,
            )
    # Text encoders are not needed once every caption is cached; free their memory now.
    components.text_encoders.clear()
    if components.vae is not None and device.type != "cpu":
        components.vae.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # -- adapter and features -------------------------------------------------------------------------
    transformer = components.transformer.to(device)
    adapter = create_adapter(transformer, family, config, optim.trainable_dtype(config))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(transformer, config.gradient_checkpointing_interval)
    host.hook.route_tokens(family=family, transformer=transformer, config=config)
    transformer.train()

    # -- optimizer, schedule --------------------------------------------------------------------------
    params = adapter.parameters()
    optimizer = optim.build_optimizer(params, config)
    ema = None
    if config.use_ema:
        ema_device = device if config.ema_device == "accelerator" else torch.device("cpu")
        ema = EMA(params, config.ema_decay, config.ema_update_interval, ema_device)

    def save_adapter(folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files: list[Path] = host.hook.save_adapter(
            family=family,
            transformer=accelerator.unwrap_model(transformer),
            adapter=adapter,
            output_dir=folder,
            config=config,
        )
        return files

    training_sets = [d.dataset for d in report.training]
    plan = BatchPlan(
        data.samples,
        {ds.id: ds.batch_size for ds in training_sets},
        seed,
        config.caption_dropout_probability,
        {ds.id: ds.entry.probability for ds in training_sets},
        processes,
    )
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = max(1, plan.batches_per_epoch // accumulation)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    if max_steps <= 0:
        raise UserError("Nothing to train: set max_train_steps or num_train_epochs above 0.")
    lr_scheduler = optim.build_lr_scheduler(optimizer, config, max_steps)
    clip = optim.clips_gradients(config)
    if accelerator.distributed_type.value in _SHARDED_ENGINES:
        # DeepSpeed/FSDP build their engine from the model and the optimizer together.
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    else:
        transformer = accelerator.prepare(transformer)
        # accelerate's optimizer wrapper is needed only to unscale fp16 gradients; otherwise it
        # costs ~0.5 ms per step (it probes installed packages on every step).
        if config.mixed_precision == "fp16":
            optimizer = accelerator.prepare(optimizer)
    # Each process draws its own noise and σ (identical noise on every process would waste the batch).
    noise_generator = torch.Generator(device=device).manual_seed(seed + 7919 * processes.rank)
    state = TrainState(max_train_steps=max_steps, output_dir=output_dir, is_main_process=accelerator.is_main_process)

    # -- resume -----------------------------------------------------------------------------------------
    if resume_from is not None and resumed is not None:
        adapter.load(resume_from)
        if ema is not None and (resume_from / EMA_STATE).is_file():
            ema.load_state_dict(load_file(str(resume_from / EMA_STATE)))
        optimizer.load_state_dict(resumed["optimizer"])
        lr_scheduler.load_state_dict(resumed["lr_scheduler"])
        own = checkpoint.read_state(resume_from, checkpoint.rng_file(processes.rank))
        if own is not None:
            checkpoint.restore_rng(own["rng"])
            noise_generator.set_state(own["noise_generator"].to(noise_generator.get_state().device))
        else:  # resumed with more processes than were saved: a fresh, still deterministic stream
            log.warning(
                "no random state for process %d in %s; noise continues from a new seed", processes.rank, resume_from
            )
            noise_generator.manual_seed(seed + 7919 * processes.rank + resumed["state"]["global_step"])
        state.restore(resumed["state"])
        log.info("resumed from %s at step %d", resume_from, state.global_step)

    def save_checkpoint() -> Path:
        def write(folder: Path) -> None:
            save_adapter(folder)
            if ema is not None:
                save_file(ema.state_dict(), str(folder / EMA_STATE))
            checkpoint.write_state(
                folder,
                {
                    "seed": seed,
                    "state": state.to_json(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                },
            )
            (folder / "training_state.json").write_text(json.dumps({"seed": seed, **state.to_json()}, indent=2))

        def write_each(folder: Path) -> None:
            own = {"rng": checkpoint.capture_rng(), "noise_generator": noise_generator.get_state()}
            checkpoint.write_state(folder, own, checkpoint.rng_file(processes.rank))

        path = checkpoint.save(
            output_dir, state.global_step, write, config.checkpoints_total_limit, processes, write_each
        )
        host.hook.on_checkpoint_saved(state=state, path=path)
        return path

    def validate(prefix: str | None = None) -> list[Path]:
        """Render the validation prompts now (``prefix``: file-name prefix instead of the step's)."""
        if not accelerator.is_main_process or not rendered_prompts(config):
            return []
        if components.vae is not None:
            components.vae.to(device)

        def draw(name: str | None) -> list[Path]:
            model = accelerator.unwrap_model(transformer)
            return render(family, components, model, config, data.text_cache, state.global_step, output_dir, name)

        with_ema = ema is not None and config.ema_validation != "none" and prefix != BASE_PREFIX
        images = [] if with_ema and config.ema_validation == "ema_only" else draw(prefix)
        if with_ema and ema is not None:
            with ema.applied():  # the EMA weights' images, named <step>-ema-…
                images += draw(f"{prefix or step_prefix(state.global_step)}-ema")
        if components.vae is not None and device.type != "cpu":
            components.vae.to("cpu")
        trackers.log_images(images, state.global_step)
        host.hook.on_validation_done(state=state, images=images)
        return images

    shift_parameters = family.shift_parameters(components)
    sigma_distribution = (
        "uniform" if config.flow_use_uniform_schedule else "beta" if config.flow_use_beta_schedule else "logit-normal"
    )
    dtype = weight_dtype(config)

    def micro_step_loss(batch: dict[str, Any]) -> torch.Tensor:
        mean = batch["latent_mean"].to(device, torch.float32, non_blocking=True)
        std = batch["latent_std"].to(device, torch.float32, non_blocking=True)
        latents = mean + std * torch.randn(mean.shape, generator=noise_generator, device=device)
        noise = torch.randn(latents.shape, generator=noise_generator, device=device)
        if config.flow_schedule_auto_shift:
            seq_len = family.sequence_length(latents.shape[-2], latents.shape[-1])
            shift = resolution_shift(seq_len, *shift_parameters)
        else:
            shift = config.flow_schedule_shift
        sigmas = family.training_sigmas(latents.shape[0], noise_generator, device)
        if sigmas is None:
            sigmas = sample_sigmas(
                latents.shape[0],
                sigmoid_scale=config.flow_sigmoid_scale,
                shift=shift,
                generator=noise_generator,
                device=device,
                distribution=sigma_distribution,
                beta=(config.flow_beta_schedule_alpha, config.flow_beta_schedule_beta),
            )
        embeds = {
            k: v.to(device, dtype if v.is_floating_point() else v.dtype, non_blocking=True)
            for k, v in batch["embeds"].items()
        }
        prepared = {
            **batch,
            "latents": latents,
            "noise": noise,
            "sigmas": sigmas,
            "noisy_latents": noisy_inputs(latents, noise, sigmas).to(dtype),
            "generator": noise_generator,  # for per-sample randomness inside predict (e.g. guidance)
            "embeds": embeds,
        }
        if "loss_weight" in batch:
            prepared["loss_weight"] = batch["loss_weight"].to(device, non_blocking=True)
        target = noise - latents
        if batch["is_regularisation"]:
            # Prior preservation: the target is what the base model (adapter off) predicts here.
            with torch.no_grad(), adapter.disabled(), accelerator.autocast():
                target = family.predict(transformer, prepared).float()
        with accelerator.autocast():
            prediction = family.predict(transformer, prepared)
        loss: torch.Tensor = host.hook.compute_loss(
            prediction=prediction, target=target, batch=prepared, config=config, state=state
        )
        return loss

    # -- loop ---------------------------------------------------------------------------------------------
    loader = BatchLoader(plan, data.text_cache)
    metrics = MetricsLog(output_dir, state.global_step) if accelerator.is_main_process else None
    result = TrainResult(
        output_dir, [], 0, encoded_latents=data.encoded_latents, encoded_captions=data.encoded_captions
    )
    log.info(
        "training %d steps from step %d (%d batches per epoch, %d accumulation, seed %d); start-up took %.1f s",
        max_steps,
        state.global_step,
        plan.batches_per_epoch,
        accumulation,
        seed,
        time.perf_counter() - started,
    )
    trackers = start_trackers(config, accelerator, output_dir)
    host.hook.on_train_start(state=state, config=config)
    if accelerator.is_main_process and benchmark_needed(config, output_dir):
        # Base-model images to compare the trained ones with: the adapter switched off (a full
        # fine-tune holds the base weights only before its first step).
        if ADAPTERS[kind].can_disable:
            with adapter.disabled():
                result.validation_images += validate(BASE_PREFIX)
        elif state.global_step == 0:
            result.validation_images += validate(BASE_PREFIX)
    # Every process builds it (a bad eval_dataset_id stops them all); only the main one evaluates.
    evaluator = make_evaluator(family, components, config, data.eval_samples, data.text_cache, device)

    def evaluate() -> None:
        if evaluator is None or metrics is None:
            return
        outcome = evaluator.evaluate(accelerator.unwrap_model(transformer), state.global_step, accelerator.autocast)
        log.info("eval loss at step %d: %.6f", outcome.step, outcome.loss)
        metrics.write(outcome.record())
        trackers.log(outcome.record(), state.global_step)

    progress = tqdm(
        total=max_steps,
        initial=state.global_step,
        desc="training",
        unit="step",
        disable=not accelerator.is_main_process or bool(os.environ.get("TQDM_DISABLE")),
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # a log file gets a line every few seconds
    )
    stop = StopRequest()
    stop_handlers = contextlib.ExitStack()
    stop_handlers.enter_context(stop.installed())
    micro = samples_in_step = 0
    loss_sum = torch.zeros((), device=device)
    last_batch_paths: list[str] = []
    step_started = time.perf_counter()
    while state.global_step < max_steps:
        for batch in loader.iterate(state.epoch, state.batches_in_epoch):
            micro += 1
            sync = micro == accumulation
            with contextlib.nullcontext() if sync else accelerator.no_sync(transformer):
                loss = micro_step_loss(batch)
                accelerator.backward(loss / accumulation)
            loss_sum += loss.detach()
            samples_in_step += len(batch["paths"]) * accelerator.num_processes
            last_batch_paths = batch["paths"]
            state.batches_in_epoch += 1
            if not sync:
                continue
            if clip and config.grad_clip_method == "norm":
                grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))  # norm before clipping
            else:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                if clip:
                    accelerator.clip_grad_value_(params, config.max_grad_norm)
            step_lr = lr_scheduler.get_last_lr()[0]  # the rate this step was taken with
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            if ema is not None:
                ema.update(state.global_step)
            # The loss of the whole step: averaged over accumulation and over processes.
            step_loss = float(accelerator.reduce(loss_sum, "mean")) / accumulation
            step_samples = samples_in_step
            micro, loss_sum, samples_in_step = 0, torch.zeros((), device=device), 0
            if not math.isfinite(step_loss):
                raise NonFiniteLoss(
                    f"The loss became {step_loss} at step {state.global_step} (batch: {', '.join(last_batch_paths)}); "
                    "lower learning_rate or check those images; the last good checkpoint is kept."
                )
            now = time.perf_counter()
            seconds, step_started = now - step_started, now
            record = {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": step_loss,
                "lr": step_lr,
                "grad_norm": grad_norm,
                "step_seconds": seconds,
                "samples_per_second": step_samples / seconds if seconds > 0 else 0.0,
            }
            if metrics is not None:
                metrics.write(record)
                trackers.log(record, state.global_step)
                host.hook.on_step_end(state=state, metrics=record)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            progress.update(1)
            at_end = state.global_step >= max_steps
            interval = config.checkpoint_step_interval
            if interval and state.global_step % interval == 0 and not at_end:
                result.checkpoints.append(save_checkpoint())
            v_interval = config.validation_step_interval
            if v_interval and state.global_step % v_interval == 0 and not at_end:
                result.validation_images += validate()
            e_interval = config.eval_steps_interval
            if e_interval and state.global_step % e_interval == 0 and not at_end:
                evaluate()
            if at_end:
                break
            stopped = stop.agreed(accelerator)
            if stopped is not None:
                result.checkpoints.append(save_checkpoint())
                result.interrupted = stopped
                break
            step_started = time.perf_counter()  # time spent saving/validating is not step time
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            continue
        break
    progress.close()
    stop_handlers.close()
    if result.interrupted is not None:
        trackers.finish()
        if metrics is not None:
            metrics.close()
        result.final_step = state.global_step
        return result

    # -- export ---------------------------------------------------------------------------------------
    if config.checkpoint_step_interval:
        result.checkpoints.append(save_checkpoint())
    result.validation_images += validate()
    evaluate()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        result.adapter_files = save_adapter(output_dir)
        if ema is not None:  # the EMA weights, in the same loadable format, beside the trained ones
            with ema.applied():
                result.adapter_files += save_adapter(output_dir / "ema")
        (output_dir / "plugins.json").write_text(json.dumps(host.listing(), indent=2))
        host.hook.on_train_end(state=state, output_dir=output_dir)
        trackers.finish()
        if metrics is not None:
            metrics.close()
    accelerator.wait_for_everyone()
    result.final_step = state.global_step
    finish_run(config, family, output_dir, result, accelerator.is_main_process)  # model card, Hub push
    log.info("done: %d steps; adapter in %s", state.global_step, output_dir)
    return result
