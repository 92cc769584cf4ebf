"""SimpleTuner options whose row in docs/simpletuner-compat.md named a test that only accepted,
validated or defaulted them (issue 15): here each one is changed and what then happens differently is
compared with what it should be, on the module that implements it or in a short toy run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stune.config import CoreOptions
from stune.errors import ConfigError, UserError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import train_by_phases

from .conftest import load_toy

# -- the flow schedule --------------------------------------------------------------------------------------


def _flow_step(**options: Any) -> Any:
    from stune.step import FlowStep

    config = CoreOptions.model_validate(options)
    return FlowStep(load_toy().ToyFamily(config), config, None, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]


def _latents(size: int) -> torch.Tensor:
    return torch.zeros(()).expand(20000, 4, size, size)  # only the shape is read: no memory for 20000 latents


def test_flow_schedule_shift_and_auto_shift_move_the_drawn_sigmas() -> None:
    from stune.flow import resolution_shift, shift_sigmas

    def drawn(size: int, **options: Any) -> torch.Tensor:
        return _flow_step(**options).draw_sigmas(_latents(size), torch.Generator().manual_seed(0))

    plain = drawn(8, flow_schedule_shift=1.0)
    shifted = drawn(8, flow_schedule_shift=3.0)
    torch.testing.assert_close(shifted, shift_sigmas(plain, 3.0))  # the same draws, each moved towards noise
    assert shifted.mean() > plain.mean() + 0.1
    # auto shift: the shift follows the image's token count (the family's scheduler numbers), not the static one
    shift_parameters = load_toy().ToyFamily.SHIFT
    for size in (16, 64):
        expected = resolution_shift((size // 2) ** 2, *shift_parameters)  # patch size 2
        auto = drawn(size, flow_schedule_auto_shift=True)
        torch.testing.assert_close(auto, shift_sigmas(plain, expected))
    small, large = (_flow_step(flow_schedule_auto_shift=True).shift(s, s) for s in (16, 64))
    assert small < large  # larger images are trained nearer noise


# -- buckets and dataset filters ----------------------------------------------------------------------------


def _buckets(tmp_path: Path, sizes: dict[str, tuple[int, int]], entry: dict[str, Any], **options: Any) -> Any:
    from stune.data.report import scan_all

    folder = tmp_path / "img"
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (120, 60, 30)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(
        json.dumps(
            [
                {
                    "id": "d",
                    "instance_data_dir": str(folder),
                    "caption_strategy": "textfile",
                    "cache_dir_vae": str(tmp_path / "vae"),
                    **entry,
                }
            ]
        )
    )
    config = CoreOptions.model_validate({"data_backend_config": str(datasets), **options})
    [report] = scan_all(config, load_toy().ToyFamily(config), processes=1).datasets
    return report


def test_aspect_bucket_rounding_decides_which_aspects_share_a_bucket(tmp_path: Path) -> None:
    """Aspects 1.34 and 1.30: one bucket when rounded to 1 decimal, two when rounded to 2."""
    sizes = {"a": (1340, 1000), "b": (1300, 1000)}
    options = {"resolution": 1024, "resolution_type": "pixel_area"}
    coarse = _buckets(tmp_path / "1", sizes, {}, aspect_bucket_rounding=1, **options)
    fine = _buckets(tmp_path / "2", sizes, {}, aspect_bucket_rounding=2, **options)
    assert len({r.plan.bucket for r in coarse.scan.records}) == 1
    assert len({r.plan.bucket for r in fine.scan.records}) == 2


def test_minimum_aspect_ratio_skips_tall_images(tmp_path: Path) -> None:
    sizes = {"tall": (300, 900), "square": (600, 600)}
    kept = _buckets(tmp_path / "1", sizes, {}, resolution=256, resolution_type="pixel")
    assert sorted(r.path.stem for r in kept.scan.records) == ["square", "tall"]
    limited = _buckets(tmp_path / "2", sizes, {"minimum_aspect_ratio": 0.5}, resolution=256, resolution_type="pixel")
    assert [r.path.stem for r in limited.scan.records] == ["square"]
    assert [(s.path.stem, s.reason) for s in limited.scan.skipped] == [("tall", "aspect ratio out of range")]


# -- attention ----------------------------------------------------------------------------------------------


def test_sageattention_usage_chooses_the_phase_that_gets_the_kernel() -> None:
    """Which backend the training forward and the validation images get for each usage, and that an
    inference-only SageAttention leaves the training processors alone. The SageAttention kernels
    themselves need the sageattention package and a CUDA GPU: on this CPU machine the run is refused
    with one sentence (checked below); the kernel running is not verified here."""
    from diffusers import FluxTransformer2DModel

    from stune.attention import apply_attention, check_attention, for_training, for_validation

    def config(**options: Any) -> CoreOptions:
        return CoreOptions.model_validate(options)

    phases = {
        usage: (for_training(c), for_validation(c))
        for usage in ("inference", "training", "training+inference")
        for c in [config(attention_mechanism="sageattention", sageattention_usage=usage)]
    }
    assert phases == {"inference": (None, "sage"), "training": ("sage", None), "training+inference": ("sage", "sage")}
    varlen = config(attention_mechanism="sageattention-varlen", sageattention_usage="training")
    assert (for_training(varlen), for_validation(varlen)) == ("sage_varlen", None)
    plain = config(attention_mechanism="native-math", sageattention_usage="inference")  # other kernels: both phases
    assert (for_training(plain), for_validation(plain)) == ("_native_math", "_native_math")

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )

    def backends() -> set[Any]:
        return {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")}

    default = backends()
    apply_attention(model, config(attention_mechanism="sageattention", sageattention_usage="inference"))
    assert backends() == default  # validation only: the training forward keeps its kernel
    apply_attention(model, plain)
    assert {getattr(b, "value", b) for b in backends()} == {"_native_math"}
    if torch.cuda.is_available():
        pytest.skip("the refusal below is this CPU machine's")
    with pytest.raises(ConfigError, match=r"^attention_mechanism=sageattention (needs the sageattention|runs only)"):
        check_attention(config(attention_mechanism="sageattention"))


# -- adapters -----------------------------------------------------------------------------------------------


def _lora_transformer(toy_model: Path, **options: Any) -> torch.nn.Module:
    from stune.adapters import PeftLora

    toy = load_toy()
    config = CoreOptions.model_validate({"model_family": "toy", **options})
    torch.manual_seed(0)
    transformer = toy.ToyDiT.from_pretrained(toy_model, subfolder="transformer")
    PeftLora(transformer, toy.ToyFamily(config), config)
    return transformer  # type: ignore[no-any-return]


def _toy_inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=gen), torch.full((1,), 0.5), torch.randn(1, 3, 32, generator=gen)


def test_lora_init_type_initialises_the_adapter_as_peft_does(toy_model: Path) -> None:
    toy = load_toy()
    base = toy.ToyDiT.from_pretrained(toy_model, subfolder="transformer")
    with torch.no_grad():
        expected = base(*_toy_inputs())

    def parts(model: torch.nn.Module, kind: str) -> list[torch.Tensor]:
        return [p.detach() for n, p in model.named_parameters() if f"lora_{kind}" in n]

    default = _lora_transformer(toy_model, lora_rank=4)
    gaussian = _lora_transformer(toy_model, lora_rank=4, lora_init_type="gaussian")
    pissa = _lora_transformer(toy_model, lora_rank=4, lora_init_type="pissa")
    # default and gaussian start as the base model (lora_B zero) with differently drawn lora_A
    assert all(not b.any() for b in parts(default, "B") + parts(gaussian, "B"))
    assert all(abs(float(a.std()) - 1 / 4) < 0.1 for a in parts(gaussian, "A"))  # PEFT's gaussian: std 1/r
    assert all(not torch.allclose(a, g) for a, g in zip(parts(default, "A"), parts(gaussian, "A"), strict=True))
    # pissa: the principal components move into the adapter (lora_B no longer zero) and out of the base weight
    assert all(b.any() for b in parts(pissa, "B"))
    base_weights = dict(base.named_parameters())
    residual = {n.replace(".base_layer", ""): p for n, p in pissa.named_parameters() if ".base_layer.weight" in n}
    assert residual and all(not torch.allclose(p, base_weights[n]) for n, p in residual.items())
    with torch.no_grad():
        for model in (default, gaussian, pissa):
            # all start as the base model (eval: diffusers adds the LoRA layers in training mode, with dropout)
            torch.testing.assert_close(model.eval()(*_toy_inputs()), expected, rtol=1e-4, atol=1e-4)


def test_lora_dropout_drops_the_adapter_path_while_training(toy_model: Path) -> None:
    outputs = {}
    for rate in (0.0, 0.5):
        model = _lora_transformer(toy_model, lora_dropout=rate).train()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            outputs[rate] = [model(*_toy_inputs()) for _ in range(2)] + [model.eval()(*_toy_inputs())]
    same, dropped = outputs[0.0], outputs[0.5]
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(dropped[0], dropped[1])  # a new dropout mask every forward
    torch.testing.assert_close(dropped[2], same[2])  # no dropout outside training


# -- runs of the toy model ----------------------------------------------------------------------------------


def _train(folder: Path, toy_model: Path, after_build: Any = None, **options: Any) -> Any:
    from .test_toy_family import toy_run

    host = PluginHost.build(plugins=[load_toy()], entry_points=False)
    return train_by_phases(toy_run(folder, toy_model, **options), host, after_build)


def test_grad_clip_method_and_max_grad_norm_clip_what_the_optimizer_steps_with(tmp_path: Path, toy_model: Path) -> None:
    """The gradients the optimizer sees (an optimizer step pre-hook): unclipped, clamped to
    ±max_grad_norm (value), or scaled to the norm max_grad_norm (norm); the logged grad_norm is the
    one before clipping."""
    limit = 1e-4
    seen: dict[str, list[torch.Tensor]] = {}
    for name, options in {
        "off": {"max_grad_norm": 0},
        "value": {"max_grad_norm": limit, "grad_clip_method": "value"},
        "norm": {"max_grad_norm": limit, "grad_clip_method": "norm"},
    }.items():

        def watch(run: Any, name: str = name) -> None:
            optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds torch's
            optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: seen.setdefault(name, []).extend(
                    p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None
                )
            )

        run = _train(
            tmp_path / name,
            toy_model,
            watch,
            max_train_steps=1,
            checkpoint_step_interval=0,
            validation_step_interval=0,
            **options,
        )
        records = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["grad_norm"] > 10 * limit  # logged before clipping
    largest = {name: max(float(g.abs().max()) for g in grads) for name, grads in seen.items()}
    norms = {
        name: float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) for name, grads in seen.items()
    }
    assert largest["off"] > 10 * limit and norms["off"] > 10 * limit
    assert largest["value"] == pytest.approx(limit) and norms["value"] > limit  # each element clamped
    assert norms["norm"] == pytest.approx(limit, rel=1e-3)  # scaled as a whole
    pairs = [(c, o) for c, o in zip(seen["norm"], seen["off"], strict=True) if o.any()]  # lora_A: 0 at step 1
    assert pairs and all(float(c.flatten() @ o.flatten() / (c.norm() * o.norm())) > 0.999 for c, o in pairs)


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> dict[str, Any]:
    """Validation on startup (the untrained model, so only the validation seed decides the image)."""
    from stune.train import train

    from .test_toy_family import toy_run

    short = {"max_train_steps": 1, "checkpoint_step_interval": 0}
    runs = {
        "seven": {"validation_seed": 7, "max_train_steps": 3, "checkpoints_total_limit": 2},
        "seed-seven": {"seed": 7, "max_train_steps": 3},  # no validation_seed: the run's seed
        "eight": {"validation_seed": 8, **short},
        "eight-again": {"validation_seed": 8, **short},
        "eight-seed-one": {"validation_seed": 8, "seed": 1, **short},
    }
    results = {}
    for name, options in runs.items():
        run_dir = toy_run(
            tmp_path_factory.mktemp(name), toy_model, validation_on_startup=True, validation_step_interval=0, **options
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(run_dir)
            results[name] = train(prepare(host=PluginHost.build(plugins=[load_toy()], entry_points=False)))
    return results


def _startup_image(result: Any) -> np.ndarray:
    return np.asarray(Image.open(result.output_dir / "validation_images" / "step-000000-validation-32x32.png"))


def test_validation_seed_sets_the_starting_noise_of_validation_images(seeded_runs: dict[str, Any]) -> None:
    image = {name: _startup_image(result) for name, result in seeded_runs.items()}
    assert np.array_equal(image["seven"], image["seed-seven"])  # validation_seed 7 = seed 7 without one
    assert not np.array_equal(image["seven"], image["eight"])
    assert np.array_equal(image["eight"], image["eight-seed-one"])  # validation_seed wins over seed


def test_seed_decides_the_training_draws(seeded_runs: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    lora = {
        name: load_file(str(seeded_runs[name].adapter_files[0])) for name in ("eight", "eight-again", "eight-seed-one")
    }
    assert all(torch.equal(lora["eight"][k], lora["eight-again"][k]) for k in lora["eight"])  # the same seed repeats
    assert not all(torch.equal(lora["eight"][k], lora["eight-seed-one"][k]) for k in lora["eight"])


def test_checkpoints_total_limit_keeps_the_newest(seeded_runs: dict[str, Any]) -> None:
    def checkpoints(name: str) -> list[str]:
        return sorted(p.name for p in seeded_runs[name].output_dir.glob("checkpoint-*"))

    assert checkpoints("seed-seven") == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # no limit
    assert checkpoints("seven") == ["checkpoint-2", "checkpoint-3"]


# -- publishing ---------------------------------------------------------------------------------------------


def test_model_card_private_creates_a_private_or_public_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What huggingface_hub asks the Hub for when stune creates the repository, received by a local
    server standing in for the Hub (its endpoint, as HF_ENDPOINT would set it); the upload then fails
    there, which stune reports in one sentence."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants

    from stune.publish import push

    created: list[dict[str, Any]] = []

    class Hub(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/api/repos/create":
                created.append(json.loads(body))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        for private in (True, False):
            config = CoreOptions.model_validate(
                {
                    "model_family": "toy",
                    "output_dir": str(tmp_path),
                    "push_to_hub": True,
                    "hub_model_id": "me/lora",
                    "model_card_private": private,
                }
            )
            with pytest.raises(UserError, match="Uploading to the Hub repository me/lora failed"):
                push(config, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert [(c["organization"], c["name"], c["visibility"]) for c in created] == [
        ("me", "lora", "private"),
        ("me", "lora", "public"),
    ]


# -- the family and its validation images -------------------------------------------------------------------


def test_model_family_chooses_the_family_that_trains(tmp_path: Path, toy_model: Path) -> None:
    from stune.hookspecs import hookimpl

    toy = load_toy()

    class Other(toy.ToyFamily):  # type: ignore[misc,name-defined]
        name = "toy-other"

    class Plugin:
        @hookimpl
        def register_families(self, register: Any) -> None:
            register(Other)

    host = PluginHost.build(plugins=[toy, Plugin()], entry_points=False)
    base = {"pretrained_model_name_or_path": str(toy_model), "output_dir": str(tmp_path)}
    assert type(prepare(host=host, overrides={**base, "model_family": "toy"}).family) is toy.ToyFamily
    assert type(prepare(host=host, overrides={**base, "model_family": "toy-other"}).family) is Other


# -- dataset keys read by the batch plan --------------------------------------------------------------------


def _prepared(
    folder: Path,
    toy_model: Path,
    entries: dict[str, dict[str, Any]],
    text: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """A toy run up to its first step: datasets scanned, caches written, batches planned (four 32×32
    images per dataset, batches of 2); ``text``: the text_embeds dataset's keys, if any."""
    from stune import train as phases
    from stune.testing import make_images, write_run

    datasets: list[dict[str, Any]] = []
    for name, entry in entries.items():
        make_images(folder / name, 4, size=(32, 32))
        datasets.append({"id": name, "instance_data_dir": str(folder / name), **entry})
    if text is not None:
        datasets.append({"id": "text", "dataset_type": "text_embeds", "default": True, **text})
    config = {
        "model_family": "toy",
        "pretrained_model_name_or_path": str(toy_model),
        "output_dir": str(folder / "out"),
        "train_batch_size": 2,
        "mixed_precision": "no",
        "resolution": 32,
        "caption_strategy": "textfile",
        "seed": 0,
        "max_train_steps": 1,
        "validation_step_interval": 0,
        "checkpoint_step_interval": 0,
        **options,
    }
    write_run(folder, config, datasets)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run = phases.setup(prepare(host=PluginHost.build(plugins=[load_toy()], entry_points=False)))
        phases.load_data(run)
        phases.build_model(run)
    return run


def _plan(folder: Path, toy_model: Path, entries: dict[str, dict[str, Any]]) -> Any:
    return _prepared(folder, toy_model, entries).plan


def test_repeats_train_batch_size_and_probability_shape_the_epoch(tmp_path: Path, toy_model: Path) -> None:
    """repeats adds passes over a dataset's images, a dataset's train_batch_size sizes its batches,
    and probability weighs which dataset's batches come first (every batch still runs once an epoch)."""
    assert _plan(tmp_path / "plain", toy_model, {"a": {}}).batches_per_epoch == 2
    assert _plan(tmp_path / "repeats", toy_model, {"a": {"repeats": 2}}).batches_per_epoch == 6
    plan = _plan(tmp_path / "batch", toy_model, {"a": {"train_batch_size": 4}})
    assert plan.batches_per_epoch == 1 and [len(b.indices) for b in plan.epoch(0)] == [4]
    weighted = _plan(tmp_path / "weighted", toy_model, {"a": {"probability": 1.0}, "b": {"probability": 0.05}})
    epochs = [weighted.epoch(e) for e in range(40)]
    assert all(sorted(b.dataset_id for b in e) == ["a", "a", "b", "b"] for e in epochs)
    assert [e[0].dataset_id for e in epochs].count("a") > 30  # weights 2 × 1.0 and 2 × 0.05 for the first pick


# -- compilation --------------------------------------------------------------------------------------------


class _Scale(torch.nn.Module):  # defined here: dynamo does not trace torch.nn's own modules
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Scale(), _Scale()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_dynamo_use_regional_compilation_compiles_each_block_instead_of_the_whole_model() -> None:
    from stune.layout import Arg, BlockList, Segment, TokenLayout
    from stune.speed import compile_transformer

    layout = TokenLayout((BlockList("blocks", Arg("x", 0), (Segment("image", routable=True),)),), patch_size=1)

    def compiled(regional: bool) -> tuple[int, _Blocks]:
        torch._dynamo.reset()
        model = _Blocks()
        config = CoreOptions.model_validate({"dynamo_backend": "eager", "dynamo_use_regional_compilation": regional})
        return compile_transformer(model, layout, config), model

    count, regional = compiled(True)
    assert count == 2 and regional._compiled_call_impl is None
    assert all(block._compiled_call_impl is not None for block in regional.blocks)
    count, whole = compiled(False)
    assert count == 1 and whole._compiled_call_impl is not None
    assert all(block._compiled_call_impl is None for block in whole.blocks)
    assert torch.equal(regional(torch.ones(3)), torch.full((3,), 7.0))  # the compiled blocks compute as before
    assert torch.equal(whole(torch.ones(3)), torch.full((3,), 7.0))
    with pytest.raises(ConfigError, match="dynamo_use_regional_compilation needs the family to declare its blocks"):
        compile_transformer(_Blocks(), None, CoreOptions.model_validate({"dynamo_use_regional_compilation": True}))


# -- sharding -----------------------------------------------------------------------------------------------


def test_fsdp_cpu_offload_offloads_the_sharded_parameters(tmp_path: Path, toy_model: Path) -> None:
    """FSDP 1: accelerate's plugin gets CPUOffload(offload_params=True). FSDP 2 passes torch's
    CPUOffloadPolicy to fully_shard, which needs an accelerator ("Cannot access accelerator device"
    on a CPU mesh): this CPU machine refuses the run with one sentence instead; the offloaded
    FSDP 2 run itself is not verified here."""
    from stune.sharding import accelerate_plugins

    def plugin(offload: bool) -> Any:
        config = CoreOptions.model_validate({"fsdp_enable": True, "fsdp_version": 1, "fsdp_cpu_offload": offload})
        return accelerate_plugins(config, ["Block"])["fsdp_plugin"]

    assert plugin(True).cpu_offload.offload_params and not plugin(False).cpu_offload.offload_params
    if torch.cuda.is_available():
        pytest.skip("the refusal below is this CPU machine's")
    host = PluginHost.build(plugins=[load_toy()], entry_points=False)
    options = {
        "model_family": "toy",
        "pretrained_model_name_or_path": str(toy_model),
        "output_dir": str(tmp_path),
        "fsdp_enable": True,
        "fsdp_version": 2,
        "fsdp_cpu_offload": True,
    }
    with pytest.raises(ConfigError, match=r"^fsdp_cpu_offload moves shards off a GPU, and this machine has none"):
        prepare(host=host, overrides=options)


def _cache_folders(folder: Path) -> list[str]:
    return sorted({str(p.parent.relative_to(folder)) for p in folder.rglob("*.safetensors") if "out" not in p.parts})


def test_cache_dir_cache_dir_vae_and_cache_dir_text_place_the_caches(tmp_path: Path, toy_model: Path) -> None:
    """Where the global cache options put the latents and caption embeddings, and a dataset's own folder winning."""
    root = tmp_path / "root"
    _prepared(root, toy_model, {"a": {}}, cache_dir=str(root / "elsewhere"))
    split = tmp_path / "split"
    _prepared(split, toy_model, {"a": {}}, cache_dir_vae=str(split / "latents"), cache_dir_text=str(split / "captions"))
    assert _cache_folders(root) == ["elsewhere/text", "elsewhere/vae/a"]  # under cache_dir
    assert _cache_folders(split) == ["captions", "latents/a"]  # one latent folder per dataset
    own = tmp_path / "own"  # a dataset's cache_dir_vae and the text_embeds dataset's cache_dir win
    _prepared(
        own,
        toy_model,
        {"a": {"cache_dir_vae": str(own / "a-latents")}},
        {"cache_dir": str(own / "embeds")},
        cache_dir_vae=str(own / "latents"),
        cache_dir_text=str(own / "captions"),
    )
    assert _cache_folders(own) == ["a-latents", "embeds"]


# -- scheduled sampling (the rollout plugin) ----------------------------------------------------------------


def test_scheduled_sampling_reflexflow_beta1_weighs_the_drift_term(tmp_path: Path, toy_model: Path) -> None:
    """The same first step (same weights, same rollouts) with beta1 5 and 10: the drift term (logged
    weighted, as it is added to the loss) doubles, and nothing else changes."""
    stune_rollout = pytest.importorskip("stune_rollout")
    from stune.train import train

    from .test_toy_family import toy_run

    first: dict[float, dict[str, float]] = {}
    for beta1 in (5.0, 10.0):
        run_dir = toy_run(
            tmp_path / str(beta1),
            toy_model,
            max_train_steps=1,
            checkpoint_step_interval=0,
            validation_step_interval=0,
            scheduled_sampling_max_step_offset=2,
            scheduled_sampling_probability=1.0,
            scheduled_sampling_reflexflow=True,
            scheduled_sampling_reflexflow_beta1=beta1,
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(run_dir)
            train(prepare(host=PluginHost.build(plugins=[load_toy(), stune_rollout], entry_points=False)))
        first[beta1] = json.loads((run_dir / "output" / "metrics.jsonl").read_text().splitlines()[0])
    five, ten = first[5.0], first[10.0]
    assert ten["aux_loss/reflexflow_adr"] == pytest.approx(2 * five["aux_loss/reflexflow_adr"], rel=1e-5)
    assert five["aux_loss/reflexflow_adr"] > 0
    for record in (five, ten):
        assert record["diffusion_loss"] == five["diffusion_loss"]
        parts = record["diffusion_loss"] + record["aux_loss/reflexflow_fc"] + record["aux_loss/reflexflow_adr"]
        assert record["loss"] == pytest.approx(parts, rel=1e-5)
