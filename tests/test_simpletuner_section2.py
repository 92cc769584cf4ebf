"""SimpleTuner options of reference §2 that stune once refused and now implements (issue 15):
modelspec_comment, init_lora_step / init_lora_ema, validation_prompt_library, the validation_adapter_*
options, flow_cubic_schedule_weights, max_upscale_threshold and disable_bucket_pruning.

Two toy runs (tests/toy_family.py) are shared: the first trains an adapter; the second starts from it
with most of these options at once. Each test is named after the option it covers (``test_<option>…``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import stune
from stune.config import CoreOptions
from stune.data.config import DatasetConfig, ResolvedDataset
from stune.data.loader import BatchPlan, Sample
from stune.data.metadata import scan_dataset
from stune.errors import UserError
from stune.plugins import PluginHost
from stune.testing import make_images

from .conftest import load_toy
from .test_toy_family import toy_run

toy = load_toy()
LORA = "pytorch_lora_weights.safetensors"
COMMENT = "step {current_step} of {model_family} by {env:STUNE_MODELSPEC_USER}"


def _train(run_dir: Path) -> Any:
    import stune.session
    import stune.train

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("STUNE_MODELSPEC_USER", "ada")
        host = PluginHost.build(plugins=[toy], entry_points=False)
        return stune.train.train(stune.session.prepare(None, None, None, host=host))


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@dataclass
class Runs:
    first: Path  # output of the plain run
    extra: Path  # its adapter with lora_B × 500: the extra validation adapter and the EMA start
    second: Path  # output of the run that continues from the first
    log: list[str]  # what the second run logged


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> Runs:
    root = tmp_path_factory.mktemp("section2")
    first = toy_run(root / "first", toy_model, validation_step_interval=0, checkpoint_step_interval=0)
    _train(first)
    trained = first / "output" / LORA
    extra = root / "strong.safetensors"
    tensors = load_file(str(trained))
    save_file({k: v * 500 if ".lora_B." in k else v for k, v in tensors.items()}, str(extra), _metadata(trained))
    second = toy_run(
        root / "second",
        toy_model,
        max_train_steps=3,
        init_lora=str(trained),
        init_lora_step=1,
        lr_scheduler="linear",
        use_ema=True,
        ema_decay=0.999,
        ema_validation="none",
        init_lora_ema=str(extra),
        validation_adapter_path=str(extra),
        validation_adapter_name="strong one",
        validation_adapter_mode="comparison",
        validation_prompt_library=True,
        modelspec_comment=COMMENT,
        validation_step_interval=0,  # at the end only
        gradient_checkpointing_interval=2,
        gradient_checkpointing_offload_attention=True,
    )
    handler, logger = _Collect(), logging.getLogger("stune.train")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        _train(second)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return Runs(first / "output", extra, second / "output", handler.messages)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# -- modelspec_comment -------------------------------------------------------------------------------------


def test_modelspec_comment_is_in_every_saved_adapter(runs: Runs) -> None:
    assert _metadata(runs.second / LORA)["modelspec.comment"] == "step 3 of toy by ada"
    assert _metadata(runs.second / "ema" / LORA)["modelspec.comment"] == "step 3 of toy by ada"
    checkpoint = runs.second / "checkpoint-2" / LORA
    assert _metadata(checkpoint)["modelspec.comment"] == "step 2 of toy by ada"
    assert "lora_config" in _metadata(checkpoint)  # the family's own metadata is kept
    assert "modelspec.comment" not in _metadata(runs.first / LORA)  # only when asked for


def test_modelspec_comment_placeholders_and_the_rewritten_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stune.resume import add_metadata, modelspec_text

    monkeypatch.delenv("STUNE_UNSET_VARIABLE", raising=False)
    text = modelspec_text("{model_family} at {current_step}: {env:STUNE_UNSET_VARIABLE}.", step=7, model_family="sd3")
    assert text == "sd3 at 7: ."
    path = tmp_path / "a.safetensors"
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(path), {"format": "pt", "kept": "yes"})
    add_metadata(path, {"modelspec.comment": "hello"})
    assert _metadata(path) == {"format": "pt", "kept": "yes", "modelspec.comment": "hello"}
    assert torch.equal(load_file(str(path))["w"], tensors["w"])


# -- init_lora_step / init_lora_ema ------------------------------------------------------------------------


def test_init_lora_step_continues_the_step_count_and_the_schedule(runs: Runs) -> None:
    records = [json.loads(line) for line in (runs.second / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [2, 3]  # starts after step 1, ends at max_train_steps
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lr[2] == pytest.approx(1e-3 * 2 / 3) and lr[3] == pytest.approx(1e-3 * 1 / 3)  # linear decay over 3
    assert sorted(p.name for p in runs.second.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_init_lora_step_leaving_nothing_to_train_is_a_user_error(runs: Runs, tmp_path: Path, toy_model: Path) -> None:
    run_dir = toy_run(tmp_path, toy_model, init_lora=str(runs.first / LORA), init_lora_step=2, max_train_steps=2)
    with pytest.raises(UserError, match="init_lora_step 2 leaves nothing to train"):
        _train(run_dir)
    with pytest.raises(Exception, match="`init_lora_step` continues an init_lora run"):
        CoreOptions.model_validate({"init_lora_step": 3})


def test_init_lora_ema_starts_the_ema_from_its_file(runs: Runs) -> None:
    extra, ema, trained = (
        load_file(str(runs.extra)),
        load_file(str(runs.second / "ema" / LORA)),
        load_file(str(runs.second / LORA)),
    )
    for key, value in extra.items():
        # two updates at decay 0.999 keep 99.8% of the starting EMA copy
        assert float((ema[key] - value).norm() / value.norm().clamp_min(1e-12)) < 0.01, key
    b = next(k for k in extra if ".lora_B." in k and extra[k].abs().max() > 0)
    assert not torch.allclose(trained[b], extra[b], rtol=0.1)  # the trained weights started from init_lora
    with pytest.raises(Exception, match="`init_lora_ema` starts the EMA copy; set use_ema=true"):
        CoreOptions.model_validate({"init_lora": "a.safetensors", "init_lora_ema": "b.safetensors", "use_ema": False})


# -- validation_prompt_library / validation_adapter_* -----------------------------------------------------


def test_validation_prompt_library_renders_the_builtin_prompts(runs: Runs) -> None:
    from stune.opts.validation import BUILTIN_PROMPT_LIBRARY
    from stune.validation import rendered_prompts

    assert len(BUILTIN_PROMPT_LIBRARY) >= 8
    config = CoreOptions.model_validate({"validation_prompt": "a cat", "validation_prompt_library": True})
    assert list(rendered_prompts(config)) == ["validation", *BUILTIN_PROMPT_LIBRARY]
    names = {p.name for p in (runs.second / "validation_images").iterdir()}
    for nickname in BUILTIN_PROMPT_LIBRARY:
        assert f"step-000003-{nickname}-32x32.png" in names
    assert not any("library_" in p.name for p in (runs.first / "validation_images").glob("*"))


def test_validation_adapter_path_name_and_mode_comparison_render_both_sets(runs: Runs) -> None:
    folder = runs.second / "validation_images"
    plain = Image.open(folder / "step-000003-validation-32x32.png")
    strong = Image.open(folder / "step-000003-strong_one-validation-32x32.png")
    assert plain.size == strong.size == (32, 32)
    assert list(plain.getdata()) != list(strong.getdata())  # the extra adapter changes the image


def _toy_transformer(toy_model: Path) -> torch.nn.Module:
    from peft import LoraConfig

    transformer = toy.ToyDiT.from_pretrained(toy_model, subfolder="transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["proj_in", "context_proj"]))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return transformer  # type: ignore[no-any-return]


def test_validation_adapter_strength_and_the_trained_adapter_afterwards(tmp_path: Path, toy_model: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    from stune.opts.validation import ValidationAdapter
    from stune.validation import extra_adapter

    transformer = _toy_transformer(toy_model)
    family = toy.ToyFamily(CoreOptions.model_validate({}))
    path = tmp_path / LORA
    state = {k: v * 3 if "lora_B" in k else v for k, v in get_peft_model_state_dict(transformer).items()}
    family.save_lora(tmp_path, state, {"r": 4, "lora_alpha": 4})
    inputs = (torch.randn(1, 4, 8, 8), torch.full((1,), 0.5), torch.randn(1, 3, 32))

    def output() -> torch.Tensor:
        with torch.no_grad():
            return transformer(*inputs)  # type: ignore[no-any-return]

    before, trainable = output(), {n for n, p in transformer.named_parameters() if p.requires_grad}
    outputs = {}
    for strength in (0.0, 1.0, 2.0):
        with extra_adapter(family, transformer, ValidationAdapter(path, "extra", strength)):
            outputs[strength] = output()
            assert set(transformer.peft_config) == {"default", "validation_extra"}  # type: ignore[arg-type]
    assert torch.allclose(outputs[0.0], before, atol=1e-6)  # strength 0: the trained adapter alone
    assert not torch.allclose(outputs[1.0], before, atol=1e-3)
    assert not torch.allclose(outputs[2.0], outputs[1.0], atol=1e-3)
    assert torch.equal(output(), before)  # removed: the trained adapter as it was, and trainable as before
    assert set(transformer.peft_config) == {"default"}  # type: ignore[arg-type]
    assert {n for n, p in transformer.named_parameters() if p.requires_grad} == trainable


def test_validation_adapter_config_lists_several_and_mode_none_loads_none(tmp_path: Path) -> None:
    from stune.validation import extra_validation_adapters

    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(b"")
    listing = tmp_path / "adapters.json"
    listing.write_text(json.dumps([{"path": str(tmp_path / "a.safetensors"), "name": "A", "strength": 0.5},
                                   {"path": str(tmp_path / "b.safetensors")}]))  # fmt: skip
    config = CoreOptions.model_validate({"validation_adapter_config": str(listing)})
    assert [(a.name, a.strength) for a in extra_validation_adapters(config)] == [("A", 0.5), ("b", 1.0)]
    none = CoreOptions.model_validate({"validation_adapter_config": str(listing), "validation_adapter_mode": "none"})
    assert extra_validation_adapters(none) == []
    with pytest.raises(Exception, match=r"The validation adapter .*missing.safetensors does not exist"):
        CoreOptions.model_validate({"validation_adapter_path": str(tmp_path / "missing.safetensors")})
    listing.write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(Exception, match="entry 0 needs a `path`"):
        CoreOptions.model_validate({"validation_adapter_config": str(listing)})


# -- flow_cubic_schedule_weights ---------------------------------------------------------------------------


def _sigmas(**options: Any) -> torch.Tensor:
    from stune.step import FlowStep

    config = CoreOptions.model_validate({"flow_schedule_shift": 1.0, **options})
    step = FlowStep(toy.ToyFamily(config), config, None, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    return step.draw_sigmas(torch.zeros(40000, 4, 8, 8), torch.Generator().manual_seed(0))


def test_flow_cubic_schedule_weights_draws_from_the_density() -> None:
    flat = _sigmas(flow_cubic_schedule_weights=[1, 1, 1])
    assert (flat < 0.1).float().mean() == pytest.approx(0.1, abs=0.01)  # constant weights: uniform
    rising = _sigmas(flow_cubic_schedule_weights="[0, 1]")  # density 2σ: P(σ < 0.5) = 1/4, mean 2/3
    assert (rising < 0.5).float().mean() == pytest.approx(0.25, abs=0.01)
    assert rising.mean() == pytest.approx(2 / 3, abs=0.01)
    peaked = _sigmas(flow_cubic_schedule_weights=[0, 0, 5, 0, 0])  # all mass between 0.25 and 0.75
    assert peaked.min() >= 0.25 - 1e-3 and peaked.max() <= 0.75 + 1e-3
    assert peaked.mean() == pytest.approx(0.5, abs=0.01)
    shifted = _sigmas(flow_cubic_schedule_weights=[1, 1], flow_schedule_shift=3.0)  # then shifted
    assert (shifted < 0.25).float().mean() == pytest.approx(1 / 10, abs=0.01)  # σ < 1/4 ⇔ u < 1/10 at shift 3


def test_flow_cubic_schedule_weights_pchip_never_overshoots() -> None:
    from stune.flow import pchip

    knots = torch.linspace(0, 1, 6, dtype=torch.float64)
    values = torch.tensor([0, 0, 4, 4, 0, 1], dtype=torch.float64)
    at = torch.linspace(0, 1, 1001, dtype=torch.float64)
    curve = pchip(knots, values, at)
    assert curve.min() >= 0 and curve.max() <= 4 + 1e-12
    assert torch.allclose(pchip(knots, values, knots), values)
    for bad in ([1], [1, -1], [0, 0], [1, float("nan")], "1,x"):
        with pytest.raises(Exception, match="at least two finite weights"):
            CoreOptions.model_validate({"flow_cubic_schedule_weights": bad})
    with pytest.raises(Exception, match="replaces the uniform or beta schedule"):
        CoreOptions.model_validate({"flow_cubic_schedule_weights": [1, 2], "flow_use_beta_schedule": True})


# -- max_upscale_threshold ---------------------------------------------------------------------------------


def _scan(tmp_path: Path, entry: dict[str, Any], **options: Any) -> Any:
    make_images(tmp_path / "small", 2, size=(16, 16))
    make_images(tmp_path / "mid", 2, size=(24, 24))
    make_images(tmp_path / "big", 2, size=(40, 40))
    folder = tmp_path / "all"
    folder.mkdir(exist_ok=True)
    for sub in ("small", "mid", "big"):
        for path in (tmp_path / sub).iterdir():
            path.rename(folder / f"{sub}_{path.name}")
    dataset = DatasetConfig.model_validate({"id": "d", "instance_data_dir": str(folder), **entry})
    config = CoreOptions.model_validate({"resolution": 32, "resolution_type": "pixel", **options})
    return scan_dataset(ResolvedDataset(dataset, config, tmp_path / "text"), 16, 2)


def test_max_upscale_threshold_skips_and_counts_images_upscaled_beyond_it(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "a", {"max_upscale_threshold": 0.5})  # 16 px needs ×2: skipped; 24 px ×1.33: kept
    kept = sorted(r.path.name.split("_")[0] for r in scan.records)
    assert kept == ["big", "big", "mid", "mid"]
    assert [s.reason for s in scan.skipped] == ["upscaled beyond max_upscale_threshold"] * 2
    assert "16x16 needs ×2.00 for 32x32" in scan.skipped[0].detail
    none = _scan(tmp_path / "b", {}, max_upscale_threshold=0)  # the global option: no upscaling at all
    assert sorted(r.path.name.split("_")[0] for r in none.records) == ["big", "big"]
    own = _scan(tmp_path / "c", {"max_upscale_threshold": 1.0}, max_upscale_threshold=0)  # the dataset's wins
    assert len(own.records) == 6 and not own.skipped


# -- disable_bucket_pruning --------------------------------------------------------------------------------


def _samples() -> list[Sample]:
    sizes = [(32, 32)] * 5 + [(48, 16)]
    return [Sample("d", Path(f"{i}.png"), Path(f"{i}.pt"), [f"c{i}"], size) for i, size in enumerate(sizes)]


def test_disable_bucket_pruning_fills_small_buckets_with_repeats() -> None:
    samples = _samples()
    pruned = BatchPlan(samples, {"d": 2}, 0, 0.0)
    assert pruned.batches_per_epoch == 2 and pruned.dropped_buckets == {("d", (48, 16)): 1}
    kept = BatchPlan(samples, {"d": 2}, 0, 0.0, fill_partial=True)
    assert kept.batches_per_epoch == 4 and kept.dropped_buckets == {}
    for epoch in range(3):
        batches = kept.epoch(epoch)
        assert len(batches) == 4 and all(len(b.indices) == 2 for b in batches)
        assert {i for b in batches for i in b.indices} == set(range(6))  # every sample trains every epoch
        for b in batches:
            assert len({samples[i].size for i in b.indices}) == 1  # a batch never mixes sizes
        assert [5, 5] in [b.indices for b in batches]  # the one-image bucket, repeated to a whole batch
    assert math.isclose(sum(len(b.indices) for b in kept.epoch(0)), 8)


def test_disable_bucket_pruning_keeps_the_bucket_in_the_dataset_report(tmp_path: Path) -> None:
    from stune.data.report import DatasetReport

    make_images(tmp_path / "d", 1, size=(32, 32))
    dataset = ResolvedDataset(
        DatasetConfig.model_validate({"id": "d", "instance_data_dir": str(tmp_path / "d")}),
        CoreOptions.model_validate({"resolution": 32, "resolution_type": "pixel"}),
        tmp_path / "text",
    )
    scan = scan_dataset(dataset, 16, 2)
    assert DatasetReport(dataset, scan, effective_batch=2).dropped_buckets == {(32, 32): 1}
    report = DatasetReport(dataset, scan, effective_batch=2, pruning=False)
    assert report.dropped_buckets == {} and report.kept_buckets == {(32, 32): 1}
    assert stune  # the package imports without torch side effects here


# -- gradient_checkpointing_offload_attention --------------------------------------------------------------


def _saved_and_grads(toy_model: Path, offload: bool, interval: int | None) -> tuple[int, dict[str, torch.Tensor]]:
    """Tensors saved for backward outside the offload's own hooks, and the gradients, of one step."""
    from stune.memory import enable_gradient_checkpointing, offload_attention

    transformer = toy.ToyDiT.from_pretrained(toy_model, subfolder="transformer")
    if interval is not None:
        enable_gradient_checkpointing(transformer, interval)
    if offload:
        assert offload_attention(transformer, pin_memory=False) == 4  # self- and cross-attention of 2 blocks
    gen = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.rand(2, generator=gen),
        torch.randn(2, 3, 32, generator=gen),
    )
    count = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = transformer(*inputs).square().mean()
    loss.backward()
    return count[0], {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_offload_attention_moves_what_attention_saves(toy_model: Path) -> None:
    kept, grads = _saved_and_grads(toy_model, offload=False, interval=None)
    offloaded, offloaded_grads = _saved_and_grads(toy_model, offload=True, interval=None)
    assert offloaded < kept  # the attention modules' saved tensors go through the CPU offload hooks
    assert grads.keys() == offloaded_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, offloaded_grads[name]), name  # the same step, exactly
    # gradient_checkpointing_interval 2: the second block keeps its activations, and its attention offloads
    every_other, _ = _saved_and_grads(toy_model, offload=False, interval=2)
    every_other_offloaded, _ = _saved_and_grads(toy_model, offload=True, interval=2)
    assert every_other_offloaded < every_other
    # every block checkpointed: nothing is kept to offload, and the checkpoint's own hooks stay in charge
    all_checkpointed, checkpointed_grads = _saved_and_grads(toy_model, offload=False, interval=1)
    with_offload, with_offload_grads = _saved_and_grads(toy_model, offload=True, interval=1)
    assert with_offload == all_checkpointed
    for name, grad in checkpointed_grads.items():
        assert torch.allclose(grad, with_offload_grads[name], atol=1e-6), name


def test_gradient_checkpointing_offload_attention_in_a_run(runs: Runs) -> None:
    assert "gradient_checkpointing_offload_attention: 4 attention modules save to CPU memory" in runs.log
    with pytest.raises(Exception, match="does not combine with fsdp_activation_checkpointing"):
        CoreOptions.model_validate(
            {
                "gradient_checkpointing_offload_attention": True,
                "fsdp_enable": True,
                "fsdp_activation_checkpointing": True,
            }
        )


# -- gradient_checkpointing_segment_stride (differently) ---------------------------------------------------


def test_gradient_checkpointing_segment_stride_becomes_the_interval() -> None:
    from stune.config import validate_config

    host = PluginHost.build(plugins=[toy], entry_points=False)
    config = validate_config({"gradient_checkpointing_segment_stride": 3}, host.config_model(), host)
    assert config.gradient_checkpointing_interval == 3
    config = validate_config(
        {"gradient_checkpointing_segment_stride": 3, "gradient_checkpointing_interval": 2}, host.config_model(), host
    )
    assert config.gradient_checkpointing_interval == 2  # an explicit stune value wins


# -- validation adapters on a real diffusers transformer (tiny FLUX) ----------------------------------------


def test_validation_adapter_strength_on_flux_matches_diffusers_own_loading(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """The extra adapter is applied exactly as diffusers' own ``load_lora_adapter`` applies the file (its
    alpha ≠ rank included), at the given strength, beside the trained adapter."""
    pytest.importorskip("stune_flux")
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from stune.opts.validation import ValidationAdapter
    from stune.validation import extra_adapter
    from stune_flux.family import FluxFamily

    def transformer_with(seed: int, alpha: int) -> Any:
        model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
        model.requires_grad_(False)
        torch.manual_seed(seed)  # lora_A is drawn from the global generator
        model.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v"]))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        return model

    family = FluxFamily(CoreOptions.model_validate({"model_family": "flux"}))
    source = transformer_with(1, alpha=8)
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in source.peft_config["default"].to_dict().items()}
    path = family.save_lora(tmp_path, get_peft_model_state_dict(source), metadata)
    config = source.config
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }

    def output(model: Any) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).sample  # type: ignore[no-any-return]

    trained = transformer_with(2, alpha=4)
    before = output(trained)
    with extra_adapter(family, trained, ValidationAdapter(path, "extra", 0.5)):
        ours = output(trained)
    # the reference: what FluxPipeline.load_lora_weights does (the model-level load_lora_adapter given only the
    # path ignores the alpha kept in the file's metadata; the pipeline hands that metadata over)
    reference = transformer_with(2, alpha=4)
    state, file_metadata = FluxPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    reference.load_lora_adapter(state, adapter_name="extra", prefix="transformer", metadata=file_metadata)
    assert reference.peft_config["extra"].lora_alpha == 8
    reference.set_adapters(["default", "extra"], weights=[1.0, 0.5])
    assert torch.allclose(ours, output(reference), atol=1e-5)
    assert not torch.allclose(ours, before, atol=1e-4)
    assert torch.equal(output(trained), before)  # the trained adapter alone again
