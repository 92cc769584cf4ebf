"""The training run, read top to bottom (DESIGN.md §3).

:func:`train` is the whole run in five phases — setup, data (scan, load, quantize, caches),
model (adapter, features, optimizer, resume), loop, export — each a function below, in that
order. The loop is written out: an optimizer step is ``gradient_accumulation_steps``
micro-steps, each one batch → :class:`~stune.step.StepInputs` → features → forward → loss →
backward. Plugins take part through the typed hooks at phase boundaries and through the
objects they registered (family, quantizers, features); nothing in the step goes through pluggy
except the ``compute_loss`` hook, once per micro-step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stune import optim
from stune._defaults import weight_dtype
from stune.checks import check_datasets
from stune.data.loader import BatchLoader, BatchPlan
from stune.data.prepare import fill_caches, plan_caches, scan
from stune.ema import EMA
from stune.errors import ConfigError, UserError
from stune.evaluation import Evaluator, make_evaluator
from stune.family import LoadRequest
from stune.features import FeatureContext
from stune.fused import FusedOptimizer
from stune.metrics import MetricsLog
from stune.preparation import finish_transformer, prepare_transformer
from stune.publish import checkpoint_uploads, finish_run
from stune.quantize import QuantizeTarget, plan_targets
from stune.report import write_report, write_run_file
from stune.resume import gather_weights, resume, save_adapter, save_checkpoint, saving_from
from stune.run import Run, TrainResult, peak_memory_mb, run_summary, setup
from stune.session import Session
from stune.signals import StopRequest
from stune.state import TrainState
from stune.step import FlowStep, Predictor
from stune.tracking import start_trackers
from stune.validation import validate, validate_base_model, validation_prompts
from stune.webhooks import reporting

log = logging.getLogger("stune.train")
_SHARDED_ENGINES = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


def train(session: Session) -> TrainResult:
    # webhook_config: progress, validation, errors and the end, off this thread; push_checkpoints_to_hub
    with reporting(session) as webhook, checkpoint_uploads(session):
        run = setup(session)
        load_data(run)
        build_model(run)
        continue_init_lora(run)
        resume(run)
        loop(run)
        if run.result.interrupted is None:
            export(run)
        elif webhook is not None:
            webhook.interrupted(run.state, run.result.interrupted, run.result.checkpoints[-1:])
    return run.result


# -- data: scan, load (+ quantize), caches ------------------------------------------------------------


def load_data(run: Run) -> None:
    session, config, family = run.session, run.session.config, run.session.family
    device = run.accelerator.device
    report = scan(config, family, run.processes.world)  # fails fast, before any weights are read
    check_datasets(config, family, report)
    cache_plan = plan_caches(config, family, report, list(validation_prompts(config).values()))
    missing_captions = len(cache_plan.missing_captions)
    log.info("caches: %d latents and %d captions to encode", cache_plan.missing_latents, missing_captions)

    placement = run.placement
    assert placement is not None
    request = LoadRequest(placement.load_device, weight_dtype(config), text_encoders=missing_captions > 0)
    if placement.vae_dtype() is not None:
        request.dtypes["vae"] = placement.vae_dtype()  # type: ignore[assignment]
    after_load = _quantize_while_loading(run, request, plan_targets(config, family, device))
    components = session.host.hooks.load_model(family=family, config=config, request=request)
    session.host.hooks.quantize(components=components, family=family, config=config, targets=after_load)
    placement.after_load(components)

    data = fill_caches(cache_plan, config, family, components, session.host, device, run.processes, placement)
    shares = run.processes.gather((data.encoded_latents, data.encoded_captions))
    log.info(
        "caches filled: %d latents and %d captions encoded%s",
        sum(s[0] for s in shares),
        sum(s[1] for s in shares),
        f" (per process: {shares})" if run.processes.world > 1 else "",
    )
    if run.accelerator.is_main_process:
        report.write(run.output_dir)
    report.log_problems()
    placement.after_caching(components)  # text encoders freed, the VAE off the accelerator
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run.components, run.data = components, data
    run.result.encoded_latents, run.result.encoded_captions = data.encoded_latents, data.encoded_captions


def _quantize_while_loading(run: Run, request: LoadRequest, targets: list[QuantizeTarget]) -> list[QuantizeTarget]:
    """Put the quantizers' load-time dtypes and configs into ``request``; return what is left for after loading."""
    after_load = []
    for target in targets:
        quantizer = run.session.host.quantizers[target.precision](run.session.config)
        dtype = quantizer.load_dtype(target)
        if dtype is not None:
            request.dtypes[target.component] = dtype
        load_config = quantizer.load_config(target)
        if load_config is not None:
            request.quantization[target.component] = load_config
        else:
            after_load.append(target)
    return after_load


# -- model: adapter, features, optimizer ------------------------------------------------------------


def _feature_seed(seed: int, name: str, rank: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * rank) % 2**63


def build_model(run: Run) -> None:
    session, config, family, accelerator = run.session, run.session.config, run.session.family, run.accelerator
    device = accelerator.device
    assert run.components is not None and run.data is not None
    transformer, adapter = prepare_transformer(run)  # kernels, offloading, adapter, checkpointing
    for feature in session.features:
        generator = torch.Generator(device).manual_seed(_feature_seed(run.seed, feature.name, run.processes.rank))
        feature.bind(FeatureContext(device=device, seed=run.seed, rank=run.processes.rank, generator=generator))
    session.host.hooks.route_tokens(
        family=family,
        transformer=transformer,
        layout=family.token_layout(),
        features={f.name: f for f in session.features},
        config=config,
    )
    transformer.train()
    finish_transformer(run, transformer, adapter)  # sharding, compilation

    params = adapter.parameters()
    optimizer = optim.build_optimizer(params, config, run.processes.world)
    if config.lr_scale:
        log.info("lr_scale: learning rate %g", optim.scaled_learning_rate(config, run.processes.world))
    elif config.lr_scale_sqrt:
        log.warning("lr_scale_sqrt acts only together with lr_scale (as in SimpleTuner); the rate is not scaled")
    if config.use_ema:
        ema_device = device if config.ema_device == "accelerator" else torch.device("cpu")
        run.ema = EMA(params, config.ema_decay, config.ema_update_interval, ema_device, config.ema_warmup_steps)
    training_sets = [d.dataset for d in run.data.report.training]
    run.plan = BatchPlan(
        run.data.samples,
        {ds.id: ds.batch_size for ds in training_sets},
        run.seed,
        config.caption_dropout_probability,
        {ds.id: ds.entry.probability for ds in training_sets},
        run.processes,
        fill_partial=config.disable_bucket_pruning,
    )
    steps_per_epoch = max(1, run.plan.batches_per_epoch // config.gradient_accumulation_steps)
    run.max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    if run.max_steps <= 0:
        raise UserError("Nothing to train: set max_train_steps or num_train_epochs above 0.")
    lr_scheduler = optim.build_lr_scheduler(optimizer, config, run.max_steps)
    unwrapped = transformer
    if run.sharded == "fsdp2":
        pass  # sharded in place by stune.sharding; no data-parallel wrapper on top
    elif accelerator.distributed_type.value in _SHARDED_ENGINES:
        # DeepSpeed/FSDP build their engine from the model and the optimizer together.
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    else:
        # Offloaded blocks stay where they are: accelerate would move the whole model to the device.
        transformer = accelerator.prepare(transformer, device_placement=[run.residency is None])
        # accelerate's optimizer wrapper is needed only to unscale fp16 gradients; otherwise it
        # costs ~0.5 ms per step (it probes installed packages on every step).
        if config.mixed_precision == "fp16":
            optimizer = accelerator.prepare(optimizer)
    run.transformer, run.adapter, run.params = transformer, adapter, params
    run.optimizer, run.lr_scheduler = optimizer, lr_scheduler
    # Each process draws its own noise and σ (identical noise on every process would waste the batch).
    run.noise_generator = torch.Generator(device=device).manual_seed(run.seed + 7919 * run.processes.rank)
    run.state = TrainState(
        max_train_steps=run.max_steps, output_dir=run.output_dir, is_main_process=accelerator.is_main_process
    )
    run.flow = FlowStep(family, config, run.components, device, weight_dtype(config))
    # No-grad forwards (regularisation targets, rollouts, the eval loss) use the unwrapped model:
    # a distributed wrapper's forward may start collective operations that other processes never join.
    run.predictor = Predictor(family, transformer, adapter, accelerator.autocast, unwrapped=unwrapped)


def continue_init_lora(run: Run) -> None:
    """init_lora_step / init_lora_ema: an adapter-only file continues a run's step count (and so its
    learning-rate schedule and EMA warmup) and its EMA. A checkpoint being resumed restores both itself."""
    config = run.session.config
    if run.resumed is not None or not config.init_lora:
        return
    assert run.adapter is not None and run.lr_scheduler is not None
    if config.init_lora_step:
        if config.init_lora_step >= run.max_steps:
            raise UserError(
                f"init_lora_step {config.init_lora_step} leaves nothing to train (the run ends at step "
                f"{run.max_steps}); raise max_train_steps or lower init_lora_step."
            )
        run.state.global_step = config.init_lora_step
        with warnings.catch_warnings():  # stepping the schedule ahead, before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(config.init_lora_step):
                run.lr_scheduler.step()
        log.info("init_lora_step: continuing from step %d", config.init_lora_step)
    if config.init_lora_ema and run.ema is not None:
        path = Path(config.init_lora_ema)
        if not path.exists():
            raise ConfigError(f"init_lora_ema {path} does not exist; fix the path.")
        trained = [p.detach().clone() for p in run.params]
        run.adapter.load(path)  # into the model, then copied into the EMA shadow
        with torch.no_grad():
            for shadow, param, kept in zip(run.ema.shadow, run.params, trained, strict=True):
                shadow.copy_(param.detach().to(shadow.device, torch.float32))
                param.copy_(kept)
        log.info("init_lora_ema: EMA copy starts from %s", path)


# -- checkpoints, validation, eval loss ---------------------------------------------------------------


def evaluate(run: Run, evaluator: Evaluator | None, metrics: MetricsLog | None) -> None:
    # Sharded weights are gathered by every process together: all of them evaluate, the main one logs.
    if evaluator is None or run.predictor is None or (metrics is None and run.sharded is None):
        return
    outcome = evaluator.evaluate(run.predictor, run.state.global_step)
    if metrics is None:
        return
    log.info("eval loss at step %d: %.6f", outcome.step, outcome.loss)
    metrics.write(outcome.record())
    run.trackers.log(outcome.record(), run.state.global_step)  # type: ignore[union-attr]


# -- the loop ------------------------------------------------------------------------------------------


def batch_stream(loader: BatchLoader, state: TrainState) -> Iterator[dict[str, Any]]:
    """Batches across epochs from where ``state`` stands; counts them in ``state`` as they are taken."""
    for epoch, position, batch in loader.stream(state.epoch, state.batches_in_epoch):
        state.epoch, state.batches_in_epoch = epoch, position + 1
        yield batch


def micro_step(run: Run, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """One micro-batch: inputs → features → forward → loss. Returns the loss to back-propagate,
    the terms to log (detached) and the prediction's metrics."""
    session, state, predictor, flow = run.session, run.state, run.predictor, run.flow
    assert predictor is not None and flow is not None and run.noise_generator is not None
    inputs = flow.inputs(batch, run.noise_generator)
    for feature in session.features:
        inputs = feature.prepare_inputs(inputs, predictor, state)
    if inputs.is_regularisation:
        # Prior preservation: the target is what the base model (adapter off) predicts here.
        inputs = inputs.replace(target=predictor(inputs, adapter=False).velocity.float())
    prediction = predictor(inputs, grad=True)
    for feature in session.features:
        prediction = feature.after_forward(inputs, prediction, state)
    loss = session.host.hooks.compute_loss(
        prediction=prediction, inputs=inputs, family=session.family, config=session.config, state=state
    )
    terms = {"diffusion_loss": loss.detach()} if prediction.aux_losses else {}
    for name, aux in prediction.aux_losses.items():
        term = aux.weighted
        terms[f"aux_loss/{name}"] = term.detach()
        loss = loss + term
    return loss, terms, prediction.metrics


def _clip_and_measure(run: Run) -> float:
    """Clip the gradients as configured; return their norm before clipping."""
    config, accelerator, params = run.session.config, run.accelerator, run.params
    if isinstance(run.optimizer, FusedOptimizer):  # clipped and stepped during backward
        return run.optimizer.take_grad_norm()
    if accelerator.distributed_type.value == "DEEPSPEED":  # the engine clipped (gradient_clipping) and stepped
        return float(run.transformer.get_global_grad_norm() or 0.0)
    clip = optim.clips_gradients(config)
    # accelerate's clipping unscales fp16 gradients and knows sharded engines; otherwise torch's
    # own does the same work without accelerate's per-call state lookups (~0.5 ms a step).
    plain = config.mixed_precision != "fp16" and (accelerator.distributed_type.value == "NO" or run.sharded == "fsdp2")
    if clip and config.grad_clip_method == "norm":
        clip_norm = torch.nn.utils.clip_grad_norm_ if plain else accelerator.clip_grad_norm_
        return _number(clip_norm(params, config.max_grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    norm = _number(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if clip:
        clip_value = torch.nn.utils.clip_grad_value_ if plain else accelerator.clip_grad_value_
        clip_value(params, config.max_grad_norm)
    return norm


def _number(value: torch.Tensor) -> float:
    full = getattr(value, "full_tensor", None)  # an FSDP2 norm is a distributed tensor
    return float(full() if full is not None else value)


def loop(run: Run) -> None:
    session, config, accelerator, state = run.session, run.session.config, run.accelerator, run.state
    hooks, device = session.host.hooks, accelerator.device
    assert run.plan is not None and run.data is not None and run.components is not None and run.flow is not None
    accumulation = config.gradient_accumulation_steps
    loader = BatchLoader(run.plan, run.data.text_cache)
    metrics = MetricsLog(run.output_dir, state.global_step) if accelerator.is_main_process else None
    log.info(
        "training %d steps from step %d (%d batches per epoch, %d accumulation, seed %d); start-up took %.1f s",
        run.max_steps,
        state.global_step,
        run.plan.batches_per_epoch,
        accumulation,
        run.seed,
        time.perf_counter() - run.started,
    )
    run.trackers = start_trackers(config, accelerator, run.output_dir)
    if accelerator.is_main_process:
        write_run_file(run.output_dir, run_summary(run))
    hooks.on_train_start(state=state, config=config)
    validate_base_model(run)
    if config.validation_on_startup:  # the model as it starts (after a resume: as it was saved)
        run.result.validation_images += validate(run)
    # Every process builds it (a bad eval_dataset_id stops them all); only the main one evaluates.
    evaluator = make_evaluator(run.flow, run.components, config, run.data.eval_samples, run.data.text_cache)
    progress = tqdm(
        total=run.max_steps,
        initial=state.global_step,
        desc="training",
        unit="step",
        disable=not accelerator.is_main_process or bool(os.environ.get("TQDM_DISABLE")),
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # a log file gets a line every few seconds
    )
    stop = StopRequest()
    batches = batch_stream(loader, state)
    step_started = time.perf_counter()
    with stop.installed(), contextlib.closing(batches):  # type: ignore[type-var]
        while state.global_step < run.max_steps:
            # -- one optimizer step: accumulate, clip, step ----------------------------------------
            epochs_before = _epochs_done(run)
            loss_sum = torch.zeros((), device=device)
            term_sums: dict[str, torch.Tensor] = {}
            metric_sums: dict[str, float] = {}
            samples, paths = 0, []
            for micro in range(accumulation):
                batch = next(batches)
                last = micro == accumulation - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(run.transformer):
                    loss, terms, prediction_metrics = micro_step(run, batch)
                    accelerator.backward(loss / accumulation)
                loss_sum += loss.detach()
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value
                for name, number in prediction_metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0.0) + number
                samples += len(batch["paths"]) * accelerator.num_processes
                paths = batch["paths"]
            if run.residency is not None:
                run.residency.settle()  # offloaded blocks back out before the step
            grad_norm = _clip_and_measure(run)
            step_lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step was taken with
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=config.set_grads_to_none)
            state.global_step += 1
            if run.ema is not None:
                run.ema.update(state.global_step)

            # -- what the step did -------------------------------------------------------------------
            # The loss of the whole step: averaged over accumulation and over processes.
            if accelerator.num_processes > 1:
                loss_sum = accelerator.reduce(loss_sum, "mean")
            step_loss = float(loss_sum) / accumulation
            if not math.isfinite(step_loss):
                raise NonFiniteLoss(
                    f"The loss became {step_loss} at step {state.global_step} (batch: {', '.join(paths)}); "
                    "lower learning_rate or check those images; the last good checkpoint is kept."
                )
            now = time.perf_counter()
            seconds, step_started = now - step_started, now
            record: dict[str, float] = {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": step_loss,
                "lr": step_lr,
                "grad_norm": grad_norm,
                "step_seconds": seconds,
                "samples_per_second": samples / seconds if seconds > 0 else 0.0,
                "peak_memory_mb": peak_memory_mb(device),
            }
            record.update({name: float(value) / accumulation for name, value in term_sums.items()})
            record.update({name: number / accumulation for name, number in metric_sums.items()})
            for feature in session.features:
                record.update(feature.step_metrics())
            if metrics is not None:
                metrics.write(record)
                run.trackers.log(record, state.global_step)
                hooks.on_step_end(state=state, metrics=record)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}", refresh=False)
            progress.update(1)

            # -- checkpoints, validation, eval loss, stopping ----------------------------------------
            if state.global_step >= run.max_steps:
                break
            epochs = (epochs_before, _epochs_done(run))
            saved = True
            if _due(config.checkpoint_step_interval, state.global_step) or _epoch_due(
                config.checkpoint_epoch_interval, *epochs
            ):
                run.result.checkpoints.append(save_checkpoint(run))
            elif _due(config.checkpointing_rolling_steps, state.global_step):
                run.result.checkpoints.append(save_checkpoint(run, rolling=True))
            else:
                saved = False
            if (
                _due(config.validation_step_interval, state.global_step)
                or _epoch_due(config.validation_epoch_interval, *epochs)
            ) and _validation_started(config, state.global_step, epochs[1]):
                run.result.validation_images += validate(run)
            if _due(config.eval_steps_interval, state.global_step) or _epoch_due(config.eval_epoch_interval, *epochs):
                evaluate(run, evaluator, metrics)
            stopped = stop.agreed(accelerator)
            if stopped is not None:
                if not saved:  # a checkpoint of this very step is already on disk otherwise
                    run.result.checkpoints.append(save_checkpoint(run))
                run.result.interrupted = stopped
                break
            step_started = time.perf_counter()  # time spent saving/validating is not step time
    progress.close()
    run.result.final_step = state.global_step
    if run.result.interrupted is not None:
        run.trackers.finish()
        if metrics is not None:
            metrics.close()
            write_run_file(run.output_dir, {**run_summary(run), "interrupted": True})
            write_report(run.output_dir)
        return
    if config.checkpoint_step_interval or config.checkpoint_epoch_interval:
        run.result.checkpoints.append(save_checkpoint(run))
    elif config.checkpointing_rolling_steps:
        run.result.checkpoints.append(save_checkpoint(run, rolling=True))
    run.result.validation_images += validate(run)
    evaluate(run, evaluator, metrics)
    if metrics is not None:
        metrics.close()


def _due(interval: int | None, step: int) -> bool:
    return bool(interval) and step % interval == 0  # type: ignore[operator]


def _validation_started(config: Any, step: int, epochs: float) -> bool:
    """validate_after_step / validate_after_epoch: no scheduled validation before them."""
    after_step, after_epoch = config.validate_after_step, config.validate_after_epoch
    return (after_step is None or step >= after_step) and (after_epoch is None or epochs + 1e-9 >= after_epoch)


def _epochs_done(run: Run) -> float:
    """Epochs completed so far, fractions included (batches of this process's epoch consumed)."""
    assert run.plan is not None
    return run.state.epoch + run.state.batches_in_epoch / run.plan.batches_per_epoch


def _epoch_due(interval: float | None, before: float, after: float) -> bool:
    """Whether a multiple of ``interval`` epochs (the *_epoch_interval options) was crossed by this step."""
    if not interval:
        return False
    return math.floor(after / interval + 1e-9) > math.floor(before / interval + 1e-9)


# -- export ----------------------------------------------------------------------------------------------


def export(run: Run) -> None:
    session, accelerator, result, output_dir = run.session, run.accelerator, run.result, run.output_dir
    gathered = gather_weights(run)  # sharded runs: every process takes part
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with saving_from(run, gathered):
            result.adapter_files = save_adapter(run, output_dir)
        if run.ema is not None:  # the EMA weights, in the same loadable format, beside the trained ones
            with run.ema.applied():
                result.adapter_files += save_adapter(run, output_dir / "ema")
        (output_dir / "plugins.json").write_text(json.dumps(session.host.listing(), indent=2))
        session.host.hooks.on_train_end(state=run.state, output_dir=output_dir)
        run.trackers.finish()  # type: ignore[union-attr]
    accelerator.wait_for_everyone()
    # card, Hub push, publishing_config providers
    finish_run(session.config, session.family, output_dir, result, accelerator.is_main_process, session.host)
    from stune.scripts import wait_all

    wait_all()  # post_checkpoint_script / post_upload_script started during the run
    log.info("done: %d steps; adapter in %s", run.state.global_step, output_dir)
