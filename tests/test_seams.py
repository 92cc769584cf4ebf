"""The core's seams, proved with plugins written here against the public API only (none names a real
family): a token router, a rollout feature, a family with an auxiliary loss, and quantizers that take
the load-time and the post-load path. They all run on the toy DiT of tests/toy_family.py.
"""

from __future__ import annotations

import fnmatch
import json
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

import stune
from stune.errors import ConfigError
from stune.features import TrainingFeature
from stune.layout import BlockList, Selection, TokenLayout
from stune.options import Field, Options
from stune.plugins import PluginHost
from stune.quantize import Quantizer, QuantizeTarget, blocks_of
from stune.session import prepare
from stune.state import TrainState
from stune.step import AuxLoss, Prediction, Predictor, StepInputs, current_forward, in_training_forward
from stune.train import train

from .test_toy_family import toy, toy_run

LORA_FILE = "pytorch_lora_weights.safetensors"


def _train(run_dir: Path, plugins: list[Any], monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Any:
    monkeypatch.chdir(run_dir)
    host = PluginHost.build(plugins=[toy, *plugins], entry_points=False)
    return train(prepare(host=host, overrides={k: str(v) for k, v in overrides.items()}))


def _with_extra_datasets(run_dir: Path) -> Path:
    """Add a regularisation dataset and an eval dataset to a toy run."""
    from stune.testing import make_images

    make_images(run_dir / "reg", 2, size=(32, 32))
    make_images(run_dir / "held", 2, size=(32, 32))
    path = run_dir / "config" / "multidatabackend.json"
    datasets = json.loads(path.read_text())
    datasets += [
        {"id": "reg", "instance_data_dir": str(run_dir / "reg"), "is_regularisation_data": True},
        {"id": "held", "instance_data_dir": str(run_dir / "held"), "dataset_type": "eval"},
    ]
    path.write_text(json.dumps(datasets))
    return run_dir


# -------------------------------------------------------------------------------------------------
# 1. A token router: drops half of the image tokens in every block, only in training forwards
# -------------------------------------------------------------------------------------------------


class RouterOptions(Options):
    toy_route_fraction: float = Field(0.0, ge=0, lt=1, description="Share of image tokens the toy router drops.")


class ToyRouter(TrainingFeature[RouterOptions]):
    """Routes every block of the layout; the kept set is drawn once per training forward."""

    name = "toy-router"
    requires = ("token_layout",)

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(getattr(config, "toy_route_fraction", 0.0))

    def __init__(self, config: Any, family: Any) -> None:
        super().__init__(config, family)
        self.keep: torch.Tensor | None = None
        self.kind = ""
        self.selection: Selection | None = None
        self.seen: list[tuple[str, int, int]] = []  # (forward kind, tokens the block got, tokens in the image)
        self.dropped_unchanged: list[bool] = []

    def install(self, transformer: torch.nn.Module, layout: TokenLayout) -> None:
        transformer.register_forward_pre_hook(self._plan)
        for _, blocks, module in layout.blocks(transformer):
            module.register_forward_pre_hook(partial(self._select, blocks), with_kwargs=True)
            module.register_forward_hook(partial(self._restore, blocks))

    def _plan(self, module: Any, args: Any) -> None:
        context = current_forward()
        self.keep = None
        if context is None:
            self.kind = "pipeline"
        elif in_training_forward():
            self.kind = "training"
            assert context.tokens is not None
            count = context.tokens.counts["image"]
            kept = round(count * (1 - self.options.toy_route_fraction))
            order = torch.randperm(count, generator=self.generator, device=self.generator.device)
            self.keep = order[:kept].sort().values
            self.tokens = context.tokens
        else:
            self.kind = "regularisation target" if context.inputs.is_regularisation else "no-grad"

    def _select(self, blocks: BlockList, module: Any, args: Any, kwargs: Any) -> Any:
        full = blocks.tokens.get(args, kwargs)
        if self.keep is None:
            self.seen.append((self.kind, full.shape[1], full.shape[1]))
            return None
        args, kwargs, self.selection = blocks.select(args, kwargs, self.keep, self.tokens)
        self.seen.append((self.kind, blocks.tokens.get(args, kwargs).shape[1], full.shape[1]))
        return args, kwargs

    def _restore(self, blocks: BlockList, module: Any, args: Any, output: Any) -> Any:
        if self.keep is None or self.selection is None:
            return None
        restored = blocks.restore(output, self.selection)
        dropped = torch.ones(restored.shape[1], dtype=torch.bool)
        dropped[self.keep] = False
        self.dropped_unchanged.append(torch.equal(restored[:, dropped], self.selection.full[:, dropped]))
        return restored


class RouterPlugin:
    __name__ = "toy-router-plugin"

    @stune.hookimpl
    def register_options(self, register: Any) -> None:
        register(RouterOptions)

    @stune.hookimpl
    def register_features(self, register: Any) -> None:
        register(ToyRouter)

    @stune.hookimpl
    def route_tokens(self, transformer: Any, layout: TokenLayout | None, features: dict[str, Any]) -> None:
        router = features.get(ToyRouter.name)
        if router is not None:
            assert layout is not None
            router.install(transformer, layout)


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> tuple[Any, ToyRouter]:
    run_dir = _with_extra_datasets(
        toy_run(tmp_path_factory.mktemp("routed"), toy_model, max_train_steps=4, eval_steps_interval=2)
    )
    routers: list[ToyRouter] = []

    class Keep(RouterPlugin):
        @stune.hookimpl
        def route_tokens(self, transformer: Any, layout: Any, features: dict[str, Any]) -> None:
            routers.append(features[ToyRouter.name])
            super().route_tokens(transformer, layout, features)

    with pytest.MonkeyPatch.context() as mp:
        result = _train(run_dir, [Keep()], mp, toy_route_fraction=0.5)
    return result, routers[0]


def test_router_drops_half_the_image_tokens_in_training_forwards_only(routed: tuple[Any, ToyRouter]) -> None:
    result, router = routed
    assert result.final_step == 4 and (result.output_dir / LORA_FILE).is_file()
    kinds = {kind for kind, _, _ in router.seen}
    # Training forwards, the eval loss, regularisation targets and validation images all ran.
    assert kinds == {"training", "no-grad", "regularisation target", "pipeline"}, kinds
    for kind, got, total in router.seen:
        if kind == "training":
            assert got == total // 2, (kind, got, total)
        else:
            assert got == total, (kind, got, total)  # nothing is routed outside training forwards
    assert router.dropped_unchanged and all(router.dropped_unchanged)  # dropped tokens skip the blocks


def test_a_feature_needing_a_layout_is_refused_for_a_family_without_one(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoLayout(toy.ToyFamily):  # type: ignore[misc,name-defined]
        name = "toy-flat"

        def token_layout(self) -> None:
            return None

    class Family:
        __name__ = "flat-family"

        @stune.hookimpl
        def register_families(self, register: Any) -> None:
            register(NoLayout)

    run_dir = toy_run(tmp_path, toy_model, model_family="toy-flat")
    monkeypatch.chdir(run_dir)
    host = PluginHost.build(plugins=[toy, Family(), RouterPlugin()], entry_points=False)
    with pytest.raises(ConfigError, match="toy-router feature needs the toy-flat family to declare token_layout"):
        prepare(host=host, overrides={"toy_route_fraction": "0.5"})


# -------------------------------------------------------------------------------------------------
# 2. A rollout feature: replaces the noisy inputs with one no-grad model step
# -------------------------------------------------------------------------------------------------


class RolloutOptions(Options):
    toy_rollout: bool = Field(False, description="Roll some samples one model step from a noisier state.")


class ToyRollout(TrainingFeature[RolloutOptions]):
    name = "toy-rollout"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(getattr(config, "toy_rollout", False))

    def __init__(self, config: Any, family: Any) -> None:
        super().__init__(config, family)
        self.rolled = 0  # samples rolled out so far (checkpointed)
        self.last: torch.Tensor | None = None
        self.grad_after_rollout: list[bool] = []
        self.rollout_requires_grad: list[bool] = []

    def prepare_inputs(self, inputs: StepInputs, predictor: Predictor, state: TrainState) -> StepInputs:
        source = (inputs.sigmas + 0.25).clamp(max=1.0)
        s = source.view(-1, 1, 1, 1)
        noisier = ((1 - s) * inputs.latents + s * inputs.noise).to(inputs.noisy_latents.dtype)
        velocity = predictor(inputs.replace(noisy_latents=noisier, sigmas=source)).velocity
        self.rollout_requires_grad.append(velocity.requires_grad)
        params = [p for p in predictor.unwrapped.parameters() if p.requires_grad]
        self.grad_after_rollout.append(any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params))
        stepped = noisier + (inputs.sigmas - source).view(-1, 1, 1, 1) * velocity
        chosen = torch.rand(inputs.size, generator=self.generator, device=self.generator.device) < 0.5
        self.rolled += int(chosen.sum())
        noisy = torch.where(chosen.view(-1, 1, 1, 1), stepped.to(noisier.dtype), inputs.noisy_latents)
        self.last = noisy
        return inputs.replace(noisy_latents=noisy)

    def step_metrics(self) -> dict[str, float]:
        return {"toy_rollout/rolled": float(self.rolled)}

    def state_dict(self) -> dict[str, Any]:
        return {"rolled": self.rolled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rolled = int(state.get("rolled", 0))


class RolloutPlugin:
    __name__ = "toy-rollout-plugin"

    def __init__(self) -> None:
        self.features: list[ToyRollout] = []
        self.trained_on: list[bool] = []

    @stune.hookimpl
    def register_options(self, register: Any) -> None:
        register(RolloutOptions)

    @stune.hookimpl
    def register_features(self, register: Any) -> None:
        register(ToyRollout)

    @stune.hookimpl
    def route_tokens(self, features: dict[str, Any]) -> None:
        self.features.append(features[ToyRollout.name])

    @stune.hookimpl(wrapper=True)
    def compute_loss(self, inputs: StepInputs) -> Any:
        feature = self.features[-1]
        self.trained_on.append(feature.last is inputs.noisy_latents)
        return (yield)


def test_rollout_feeds_the_forward_its_own_states_without_gradient(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = RolloutPlugin()
    result = _train(toy_run(tmp_path, toy_model, max_train_steps=3), [plugin], monkeypatch, toy_rollout="true")
    feature = plugin.features[0]
    assert result.final_step == 3
    assert plugin.trained_on == [True] * 3  # the training forward got the rolled-out states
    assert feature.rollout_requires_grad == [False] * 3  # rollouts run without gradient
    assert not any(feature.grad_after_rollout)  # and leave no gradient on the adapter
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["toy_rollout/rolled"] for m in metrics] == sorted(m["toy_rollout/rolled"] for m in metrics)


def test_rollout_resumes_exactly(tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"toy_rollout": "true", "checkpoint_step_interval": 2, "validation_step_interval": 0}
    straight = RolloutPlugin()
    _train(toy_run(tmp_path / "straight", toy_model, max_train_steps=4), [straight], monkeypatch, **options)
    first, second = RolloutPlugin(), RolloutPlugin()
    halves = toy_run(tmp_path / "halves", toy_model, max_train_steps=2)
    _train(halves, [first], monkeypatch, **options)
    _train(halves, [second], monkeypatch, **{**options, "max_train_steps": 4})
    assert second.features[0].rolled == straight.features[0].rolled  # the feature's state came back
    a = load_file(str(tmp_path / "straight" / "output" / LORA_FILE))
    b = load_file(str(halves / "output" / LORA_FILE))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, interrupted or not


# -------------------------------------------------------------------------------------------------
# 3. A family whose prediction carries an auxiliary loss
# -------------------------------------------------------------------------------------------------


class AuxOptions(Options):
    toy_aux_weight: float = Field(0.0, ge=0, description="Weight of the toy balance term.")


class AuxToyFamily(toy.ToyFamily):  # type: ignore[misc,name-defined]
    """The toy DiT, plus a term that pulls the first block's query activations towards zero."""

    name = "toy-aux"
    values: ClassVar[list[torch.Tensor]] = []

    def predict(self, transformer: torch.nn.Module, inputs: StepInputs) -> Prediction:
        captured: list[torch.Tensor] = []
        query = transformer.get_submodule("blocks.0.attn.to_q")
        handle = query.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            prediction: Prediction = super().predict(transformer, inputs)
        finally:
            handle.remove()
        value = captured[0].float().square().mean()
        if value.requires_grad:
            value.retain_grad()
            self.values.append(value)
        weight = self.config.toy_aux_weight  # type: ignore[attr-defined]
        prediction.aux_losses["balance"] = AuxLoss(value, weight)
        return prediction


class AuxPlugin:
    __name__ = "toy-aux-plugin"

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    @stune.hookimpl
    def register_options(self, register: Any) -> None:
        register(AuxOptions)

    @stune.hookimpl
    def register_families(self, register: Any) -> None:
        register(AuxToyFamily)

    @stune.hookimpl
    def on_train_start(self) -> None:
        AuxToyFamily.values.clear()

    @stune.hookimpl
    def route_tokens(self, transformer: Any) -> None:
        # The LoRA B matrix of the adapted query projection: record its first gradient.
        param = transformer.get_submodule("blocks.0.attn.to_q.lora_B.default").weight
        param.register_hook(lambda grad: self.grads.append(grad.detach().clone()))


def _aux_run(folder: Path, model: Path, weight: float, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, AuxPlugin]:
    plugin = AuxPlugin()
    run_dir = toy_run(folder, model, model_family="toy-aux", max_train_steps=2, validation_step_interval=0)
    return _train(run_dir, [plugin], monkeypatch, toy_aux_weight=weight), plugin


def test_auxiliary_loss_trains_with_its_weight_and_is_logged(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weighted, with_term = _aux_run(tmp_path / "w", toy_model, 5.0, monkeypatch)
    values = list(AuxToyFamily.values)
    _, without = _aux_run(tmp_path / "zero", toy_model, 0.0, monkeypatch)
    zero_values = list(AuxToyFamily.values)

    # The term's own gradient: d(loss)/d(value) is the weight, so 5 with the term and 0 without.
    assert values[0].grad is not None and float(values[0].grad) == pytest.approx(5.0)
    assert zero_values[0].grad is not None and float(zero_values[0].grad) == 0.0
    # Same data, same noise: the difference of the two first-step gradients on the LoRA weight
    # is what the auxiliary term alone sent there.
    from_term = with_term.grads[0] - without.grads[0]
    assert from_term.abs().max() > 0

    records = [json.loads(line) for line in (weighted.output_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["loss"] == pytest.approx(record["diffusion_loss"] + record["aux_loss/balance"], rel=1e-5)
        assert record["aux_loss/balance"] > 0
    assert records[0]["aux_loss/balance"] == pytest.approx(5.0 * float(values[0].detach()), rel=1e-5)


# -------------------------------------------------------------------------------------------------
# 4. Quantizers: one hands the loader a quantization config, one quantizes after loading
# -------------------------------------------------------------------------------------------------


class ToyPostLoad(Quantizer):
    """Rounds Linear weights to 8 bits (per tensor), block by block, after loading."""

    name = "toy-fake-int8"
    precisions = ("toy-int8",)
    done: ClassVar[list[str]] = []
    excluded: ClassVar[list[str]] = []

    def quantize(self, module: torch.nn.Module, target: QuantizeTarget) -> torch.nn.Module:
        for block_name, block in blocks_of(module):
            for name, layer in block.named_modules(prefix=block_name):
                if not isinstance(layer, torch.nn.Linear):
                    continue
                if any(fnmatch.fnmatch(name, pattern) or name == pattern for pattern in target.exclude):
                    self.excluded.append(name)
                    continue
                with torch.no_grad():
                    scale = layer.weight.abs().max() / 127
                    layer.weight.copy_((layer.weight / scale).round() * scale)
                self.done.append(name)
        return module


class ToyLoadTime(Quantizer):
    """Quantizes the transformer while it loads (optimum-quanto through diffusers' QuantoConfig)."""

    name = "toy-load-time"
    precisions = ("toy-quanto-int8",)

    def load_config(self, target: QuantizeTarget) -> Any:
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype="int8", modules_to_not_convert=list(target.exclude))


class QuantPlugin:
    __name__ = "toy-quant-plugin"

    def __init__(self) -> None:
        self.transformers: list[torch.nn.Module] = []

    @stune.hookimpl
    def register_options(self, register: Any) -> None:
        class PrecisionOptions(Options):
            base_model_precision: str = Field("no_change", description="Precision of the base transformer.")
            text_encoder_1_precision: str = Field("no_change", description="Precision of the text encoder.")

        register(PrecisionOptions)

    @stune.hookimpl
    def register_quantizers(self, register: Any) -> None:
        register(ToyPostLoad)
        register(ToyLoadTime)

    @stune.hookimpl
    def route_tokens(self, transformer: Any) -> None:
        self.transformers.append(transformer)


def test_post_load_quantizer_goes_block_by_block_and_honours_exclusions(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ToyPostLoad.done.clear()
    ToyPostLoad.excluded.clear()
    result = _train(
        toy_run(tmp_path, toy_model, validation_step_interval=0),
        [QuantPlugin()],
        monkeypatch,
        base_model_precision="toy-int8",
        text_encoder_1_precision="toy-int8",
    )
    assert result.final_step == 2
    transformer_layers = [n for n in ToyPostLoad.done if n.startswith("blocks.")]
    assert "blocks.0.attn.to_q" in transformer_layers and "blocks.1.mlp.2" in transformer_layers
    # The family's exclusions (proj_in, proj_out, *.ada, ada_out) stay in full precision.
    assert {"proj_in", "proj_out", "ada_out", "blocks.0.ada", "blocks.1.ada"} <= set(ToyPostLoad.excluded)
    assert not any(n in ToyPostLoad.done for n in ("proj_in", "proj_out", "ada_out"))
    # The text encoder (slot text_encoder, option text_encoder_1_precision) was quantized too.
    assert any(n.startswith("encoder.layers.") for n in ToyPostLoad.done)


def test_load_time_quantizer_reaches_from_pretrained(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    plugin = QuantPlugin()
    result = _train(
        toy_run(tmp_path, toy_model, validation_step_interval=0),
        [plugin],
        monkeypatch,
        base_model_precision="toy-quanto-int8",
    )
    assert result.final_step == 2
    [transformer] = plugin.transformers
    assert isinstance(transformer.get_submodule("blocks.0.mlp.0"), QLinear)  # quantized while loading
    assert type(transformer.get_submodule("proj_in")) is torch.nn.Linear  # an exclusion


def test_full_fine_tuning_on_a_quantized_base_is_refused(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(toy_run(tmp_path, toy_model))
    host = PluginHost.build(plugins=[toy, QuantPlugin()], entry_points=False)
    with pytest.raises(ConfigError, match="model_type=full cannot train a quantized base"):
        prepare(host=host, overrides={"model_type": "full", "base_model_precision": "toy-int8"})
