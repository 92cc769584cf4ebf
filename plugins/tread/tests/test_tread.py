"""TREAD on tiny pipelines of every installed family that declares a token layout.

The equivalence tests run each family's own transformer twice on the same inputs — once plain,
once with the router installed and every token kept but shuffled — and compare outputs and
gradients; the training tests run the seed's route on a tiny FLUX deep enough for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stune.errors import ConfigError
from stune.family import LoadRequest
from stune.plugins import PluginHost
from stune.session import prepare
from stune.step import Predictor, StepInputs
from stune.testing import make_images, write_run
from stune.train import train
from stune_tread.router import Tread

SEED_ROUTE = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}
LORA_FILE = "pytorch_lora_weights.safetensors"


# -- tiny models of every family with a layout ---------------------------------------------------------


def _builders() -> dict[str, Any]:
    """family name → a function building its tiny pipeline folder, for the families installed here."""
    found: dict[str, Any] = {}
    from stune_flux.tiny import build_tiny_flux

    found["flux"] = lambda path: build_tiny_flux(path, num_single_layers=4)
    if importlib.util.find_spec("stune_sd3") is not None:
        from stune_sd3.tiny import build_tiny_sd3

        found["sd3"] = build_tiny_sd3
    if importlib.util.find_spec("stune_hidream") is not None:
        from stune_hidream.tiny import build_tiny_hidream

        found["hidream"] = build_tiny_hidream
    return found


BUILDERS = _builders()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(f"tread-{name}") / "model") for name, build in BUILDERS.items()}


def _family(name: str, model: Path, **options: Any) -> Any:
    host = PluginHost.build(sorted({name, "flux", "tread"}))
    config = host.config_model().model_validate(
        {"model_family": name, "pretrained_model_name_or_path": str(model), "mixed_precision": "no", **options}
    )
    family = host.family_class(name)(config)
    family.apply_defaults()
    return family


def _inputs(family: Any, components: Any, width: int, height: int, batch: int = 2) -> StepInputs:
    """Random latents of a (width × height) image, two real captions, σ = 0.6."""
    gen = torch.Generator().manual_seed(0)
    scale = family.vae_scale_factor
    shape = (batch, family.latent_channels, height // scale, width // scale)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    embeds = family.encode_prompts(components, ["a red circle on a blue background", "a photo of a cat"][:batch])
    sigmas = torch.full((batch,), 0.6)
    noisy = 0.4 * latents + 0.6 * noise
    return StepInputs(
        latents=latents,
        noise=noise,
        sigmas=sigmas,
        noisy_latents=noisy,
        target=noise - latents,
        embeds=family.collate_embeds(embeds),  # a family may cache variable-length entries (HiDream)
        generator=torch.Generator().manual_seed(1),
    )


def _run(family: Any, transformer: torch.nn.Module, inputs: StepInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training forward and backward; the output and every parameter's gradient."""
    transformer.zero_grad(set_to_none=True)
    velocity = Predictor(family, transformer)(inputs, grad=True).velocity
    velocity.square().mean().backward()
    grads = [p.grad.clone() for p in transformer.parameters() if p.grad is not None]
    return velocity.detach(), grads


def _router(family: Any, transformer: torch.nn.Module, tread: dict[str, Any], **options: Any) -> Tread:
    from stune.features import FeatureContext

    family.config.tread_config = tread
    for key, value in options.items():
        setattr(family.config, key, value)
    router = Tread(family.config, family)
    generator = torch.Generator().manual_seed(7)
    router.bind(FeatureContext(device=torch.device("cpu"), seed=0, rank=0, generator=generator))
    layout = family.token_layout()
    router.install(transformer, layout)
    return router


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("size", [(64, 64), (128, 64)], ids=["square", "wide"])
def test_every_token_kept_but_shuffled_equals_the_unrouted_model(
    name: str, size: tuple[int, int], tiny_models: dict[str, Path]
) -> None:
    family = _family(name, tiny_models[name])
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    transformer = components.transformer.train()
    transformer.requires_grad_(True)
    inputs = _inputs(family, components, *size)
    plain, plain_grads = _run(family, transformer, inputs)
    router = _router(
        family, transformer, {"routes": [{"selection_ratio": 0.0, "start_layer_idx": 0, "end_layer_idx": -1}]}
    )
    routed, routed_grads = _run(family, transformer, inputs)
    kept = router._kept[0]
    assert kept is not None and not torch.equal(kept, kept.sort().values)  # the shuffling path ran
    assert torch.allclose(routed, plain, atol=1e-5, rtol=1e-4), (routed - plain).abs().max()
    assert len(routed_grads) == len(plain_grads)
    for a, b in zip(routed_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_dropped_tokens_leave_the_window_as_they_entered(name: str, tiny_models: dict[str, Path]) -> None:
    family = _family(name, tiny_models[name])
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    transformer = components.transformer.train()
    inputs = _inputs(family, components, 128, 64)
    layout = family.token_layout()
    blocks = list(layout.blocks(transformer))
    first, last = blocks[1], blocks[-2]
    seen: dict[str, torch.Tensor] = {}

    def entering(module: Any, args: Any, kwargs: Any) -> None:
        seen["in"] = first[1].routable_tokens(args, kwargs, family.forward_tokens(inputs)).detach().clone()

    first[2].register_forward_pre_hook(entering, with_kwargs=True)  # before the router: the full tokens
    router = _router(
        family, transformer, {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]}
    )

    def leaving(module: Any, args: Any, output: Any) -> None:
        tokens = output if last[1].output is None else output[last[1].output]
        seen["out"] = tokens.detach().clone()

    last[2].register_forward_hook(leaving)  # after the router: the restored sequence
    Predictor(family, transformer)(inputs, grad=True)
    kept = router._kept[0]
    count = family.forward_tokens(inputs).counts["image"]
    valid = family.forward_tokens(inputs).valid
    real = count if valid is None else int(valid.sum())
    assert kept is not None and kept.numel() == round(real * 0.5) + (count - real)  # padding always stays
    dropped = torch.ones(count, dtype=torch.bool)
    dropped[kept] = False
    spans = last[1].segments
    offset = 0  # the image segment comes first wherever a block also carries other tokens
    assert spans[0].routable
    out = seen["out"][:, offset : offset + count]
    assert torch.equal(out[:, dropped], seen["in"][:, dropped])
    assert not torch.equal(out[:, ~dropped], seen["in"][:, ~dropped])  # the kept ones were processed


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_routing_is_off_outside_training_forwards(name: str, tiny_models: dict[str, Path]) -> None:
    """No-grad forwards (eval loss, regularisation targets, rollouts) and pipeline calls see every token."""
    family = _family(name, tiny_models[name])
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    transformer = components.transformer.eval()
    inputs = _inputs(family, components, 64, 64)
    plain = Predictor(family, transformer)(inputs).velocity
    direct = family.predict(transformer, inputs).velocity  # no forward context at all, as in a pipeline
    router = _router(
        family, transformer, {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}
    )
    assert torch.equal(Predictor(family, transformer)(inputs).velocity, plain)
    assert torch.equal(family.predict(transformer, inputs).velocity, direct)
    assert router._kept == [None] * len(router.windows)


def test_loss_mask_tokens_are_always_kept(tiny_models: dict[str, Path]) -> None:
    family = _family("flux", tiny_models["flux"])
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    transformer = components.transformer.train()
    inputs = _inputs(family, components, 64, 64)
    weight = torch.zeros(2, 1, 8, 8)
    weight[0, :, :2, :4] = 1.0  # sample 0: the top-left 2×4 latent cells, i.e. tokens 0 and 1 of the 4×4 grid
    weight[1, :, 6:, 6:] = 1.0  # sample 1: the bottom-right token
    router = _router(
        family, transformer, {"routes": [{"selection_ratio": 0.9, "start_layer_idx": 0, "end_layer_idx": -1}]}
    )
    Predictor(family, transformer)(inputs.replace(loss_weight=weight), grad=True)
    kept = set(router._kept[0].tolist())  # type: ignore[union-attr]
    assert {0, 1, 15} <= kept
    assert len(kept) == 3  # 10% of 16 rounds to 2, fewer than the forced three: only those


def test_importance_keeps_the_highest_norm_tokens(tiny_models: dict[str, Path]) -> None:
    family = _family("flux", tiny_models["flux"])
    components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
    transformer = components.transformer.train()
    inputs = _inputs(family, components, 64, 64, batch=1)
    layout = family.token_layout()
    _, blocks, first = next(iter(layout.blocks(transformer)))
    norms: list[torch.Tensor] = []
    first.register_forward_pre_hook(
        lambda m, a, k: norms.append(blocks.routable_tokens(a, k, family.forward_tokens(inputs)).abs().sum(-1)[0]),
        with_kwargs=True,
    )
    route = {"selection_ratio": 0.75, "start_layer_idx": 0, "end_layer_idx": 0, "importance": 1.0}
    router = _router(family, transformer, {"routes": [route]})
    Predictor(family, transformer)(inputs, grad=True)
    assert set(router._kept[0].tolist()) == set(torch.topk(norms[0], 4).indices.tolist())  # type: ignore[union-attr]


# -- configuration ------------------------------------------------------------------------------------------


def _run_folder(folder: Path, model: Path, **options: Any) -> Path:
    make_images(folder / "data", 4, size=(64, 64))
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "output"),
        "max_train_steps": 4,
        "train_batch_size": 2,
        "learning_rate": "1e-3",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "tokenizer_max_length": 16,
        "resolution": 64,
        "caption_strategy": "textfile",
        "seed": 1,
        "checkpoint_step_interval": 2,
        "validation_step_interval": 0,
        "tread_config": SEED_ROUTE,
        **options,
    }
    datasets = [
        {"id": "pics", "instance_data_dir": str(folder / "data"), "cache_dir_vae": str(folder / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(folder / "cache" / "text")},
    ]
    write_run(folder, config, datasets)
    return folder


@pytest.mark.parametrize(
    ("tread_config", "message"),
    [
        ("{not json", "is not JSON"),
        ({"routes": []}, "routes"),
        ({"routes": [{"selection_ratio": 1.0, "start_layer_idx": 0, "end_layer_idx": 1}]}, "selection_ratio"),
        ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1, "ratio": 1}]}, "ratio"),
        (
            {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 9}]},
            "reaches outside the model's 5 blocks",
        ),
        (
            {"routes": [{"selection_ratio": 0.5, "start_layer_idx": -1, "end_layer_idx": 1}]},
            "starts at block 4 after it ends",
        ),
        (
            {
                "routes": [
                    {"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 3},
                    {"selection_ratio": 0.5, "start_layer_idx": 3, "end_layer_idx": 4},
                ]
            },
            r"route 2 \(blocks 3..4\) overlaps",
        ),
    ],
)
def test_bad_routes_are_refused_before_any_model_loads(
    tread_config: Any, message: str, tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_folder(tmp_path, tiny_models["flux"], tread_config=tread_config)
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match=message):
        prepare(host=PluginHost.build(["flux", "tread"]))


def test_the_seed_block_trains_resumes_exactly_and_the_lora_loads(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxPipeline

    model = tiny_models["flux"]
    straight = _run_folder(tmp_path / "straight", model)
    monkeypatch.chdir(straight)
    result = train(prepare(host=PluginHost.build(["flux", "tread"])))
    records = [json.loads(line) for line in (straight / "output" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tread/kept_fraction"] for r in records] == [0.5] * 4
    halves = _run_folder(tmp_path / "halves", model, max_train_steps=2)
    monkeypatch.chdir(halves)
    train(prepare(host=PluginHost.build(["flux", "tread"])))
    train(prepare(host=PluginHost.build(["flux", "tread"]), overrides={"max_train_steps": "4"}))
    a, b = load_file(str(result.output_dir / LORA_FILE)), load_file(str(halves / "output" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # TREAD's draws resumed too

    pipe = FluxPipeline.from_pretrained(model)
    pipe.load_lora_weights(result.output_dir)  # raises on missing or unexpected keys
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_it_trains_with_lycoris_full_and_checkpoint_intervals(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lycoris.json").write_text(json.dumps({"algo": "lokr", "factor": 4}))
    for name, options in {
        "lycoris": {"lora_type": "lycoris", "lycoris_config": str(tmp_path / "lycoris.json")},
        "full": {"model_type": "full"},
        "interval": {"gradient_checkpointing": "true", "gradient_checkpointing_interval": 2},
    }.items():
        run = _run_folder(
            tmp_path / name, tiny_models["flux"], max_train_steps=1, checkpoint_step_interval=0, **options
        )
        monkeypatch.chdir(run)
        assert train(prepare(host=PluginHost.build(["flux", "tread"]))).final_step == 1, name


def test_kontext_reference_tokens_are_never_routed(tiny_models: dict[str, Path]) -> None:
    family = _family("flux", tiny_models["flux"], model_flavour="kontext")
    reference = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(3))

    def loaded() -> tuple[torch.nn.Module, StepInputs]:
        components = family.load(LoadRequest(torch.device("cpu"), torch.float32))
        transformer = components.transformer.train().requires_grad_(True)
        inputs = _inputs(family, components, 64, 64)
        return transformer, inputs.replace(conditioning={"reference_latents": reference})

    transformer, inputs = loaded()
    plain, plain_grads = _run(family, transformer, inputs)
    _router(family, transformer, {"routes": [{"selection_ratio": 0.0, "start_layer_idx": 0, "end_layer_idx": -1}]})
    routed, routed_grads = _run(family, transformer, inputs)
    assert torch.allclose(routed, plain, atol=1e-5, rtol=1e-4)
    for a, b in zip(routed_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)

    transformer, inputs = loaded()
    _router(family, transformer, {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]})
    seen: list[int] = []
    first = next(iter(family.token_layout().blocks(transformer)))[2]
    first.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    Predictor(family, transformer)(inputs, grad=True)
    assert seen == [8 + 24]  # half of the 16 image tokens, and all 24 reference tokens


def test_plugin_flux_alone_runs_a_config_with_tread(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """`st-train --plugin flux` in a folder whose config routes tokens loads the installed stune-tread too."""
    from stune.testing import run_cli

    run = _run_folder(tmp_path, tiny_models["flux"])
    proc = run_cli(["check", "--quick", "--plugin", "flux"], cwd=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
