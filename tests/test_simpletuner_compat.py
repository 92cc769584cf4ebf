"""SimpleTuner compatibility (issue 15): every SimpleTuner option and dataset key has a status in
``stune.simpletuner``, the configuration check applies it, docs/simpletuner-compat.md is generated
from it, and every implemented row names a test that exists. Also the caption keys stune gained
(caption_filter_list, caption_shuffle, disable_multiline_split), the SimpleTuner options that are
dataset defaults, and options that no other test exercised."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stune.config import CoreOptions, validate_config
from stune.data.config import DatasetConfig, ResolvedDataset, read_dataset_list, resolve_datasets
from stune.data.metadata import scan_dataset
from stune.errors import ConfigError, UserError
from stune.options import option_names
from stune.plugins import PluginHost
from stune.session import prepare
from stune.simpletuner import (
    DATASET_ROWS,
    DIFFERENTLY,
    IMPLEMENTED,
    OPTION_ROWS,
    OPTION_TESTS,
    PLUGIN,
    REFUSED,
    SIMPLETUNER_DATASET_KEYS,
    SIMPLETUNER_OPTIONS,
    Row,
    dataset_key_statuses,
    option_statuses,
    same_value,
)
from stune.testing import make_images, run_cli

from .conftest import load_toy

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
SEEDS = Path(__file__).with_name("seeds")

#: Options of reference §2 that stune refuses although §2 names them, each with why: the issue
#: itself asks for the destructive ones to be refused (stune never modifies dataset folders).
SECTION_2_REFUSALS = {
    "delete_problematic_images": "the issue's own example of a refusal: stune never modifies dataset folders",
    "delete_unwanted_images": "destructive like delete_problematic_images",
}


# -- the table ----------------------------------------------------------------------------------------------


def test_the_list_is_simpletuner_4_10_1s_flow_matching_options() -> None:
    path = REFERENCE / "simpletuner-options.txt"
    if not path.is_file():
        pytest.skip("../shared/reference is not beside this checkout")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert list(SIMPLETUNER_OPTIONS) == names


def test_every_option_and_dataset_key_has_a_status() -> None:
    host = PluginHost.build()
    missing = [s.name for s in option_statuses(host) if s.status == "missing"]
    missing += [s.name for s in dataset_key_statuses() if s.status == "missing"]
    assert missing == []
    assert not set(OPTION_ROWS) & set(option_names(host.config_model())), "a row shadows a stune option"
    assert not set(DATASET_ROWS) & set(option_names(DatasetConfig)), "a row shadows a dataset key"


def _asking_value(row: Row) -> Any:
    """A value of a refused option that asks for something (not one of its accepted values)."""
    return next(
        v for v in (True, "config/something.json", 7, "other") if not any(same_value(v, n) for n in row.neutral)
    )


def test_every_simpletuner_option_passes_the_check_or_is_refused_by_name(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each name of the list, with a valid value, through the check `st-train check` runs (one process)."""
    monkeypatch.chdir(tmp_path)
    host = PluginHost.build()
    model = host.config_model()
    base = {"model_family": "flux", "pretrained_model_name_or_path": str(tiny_flux_dir), "output_dir": "out"}
    refusals: dict[str, str] = {}
    for status in option_statuses(host):
        name = status.name
        if status.status in (IMPLEMENTED, PLUGIN):
            field = model.model_fields.get(option_names(model).get(name, ""))
            value = field.default if field is not None else None
        elif status.status == DIFFERENTLY:
            row = OPTION_ROWS[name]
            value = row.neutral[0] if row.only else True
        else:
            value = _asking_value(OPTION_ROWS[name])
        raw = {**base, name: value} if name != "model_family" else base
        try:
            prepare(overrides=dict(raw), host=host)
        except ConfigError as exc:
            message = str(exc)
            assert "Unknown option" not in message, message
            assert status.status == REFUSED, f"{name} = {value!r}: {message}"
            assert f"`{name}`" in message and OPTION_ROWS[name].reason in message
            refusals[name] = OPTION_ROWS[name].reason
            continue
        assert status.status != REFUSED, f"{name} = {value!r} was not refused"
    assert len(refusals) == sum(1 for row in OPTION_ROWS.values() if row.status == REFUSED)
    assert len(set(refusals.values())) == len(refusals), "two options share one refusal reason"


def test_refused_options_accept_the_values_that_ask_nothing(tmp_path: Path, tiny_flux_dir: Path) -> None:
    host = PluginHost.build()
    model = host.config_model()
    accepted = {name: value for name, row in OPTION_ROWS.items() if row.status == REFUSED for value in row.neutral}
    raw = {"model_family": "flux", "pretrained_model_name_or_path": str(tiny_flux_dir), **accepted}
    config = validate_config(raw, model, host)
    assert config.model_family == "flux"
    for name, row in OPTION_ROWS.items():  # the only-values of `differently` rows pass, the others are refused
        if row.status == DIFFERENTLY and row.only:
            validate_config({name: row.neutral[0]}, model, host)
            with pytest.raises(ConfigError, match=f"`{name}` = 'something else' is not supported by stune: "):
                validate_config({name: "something else"}, model, host)


def _seed_and_reference_names() -> set[str]:
    names: set[str] = set()
    for path in SEEDS.glob("config-*.json"):
        names |= {str(key).lstrip("-") for key in json.loads(path.read_text())}
    reference = REFERENCE / "simpletuner-behaviour.md"
    if reference.is_file():
        text = reference.read_text()
        section = text[text.index("## 2. Config options") : text.index("## 3. TREAD")]
        for token in re.findall(r"`([a-z0-9_/]+)`", section):  # `validation_adapter_path/name/strength` too
            first, *others = token.split("/")
            names |= {first, *(first.rsplit("_", 1)[0] + "_" + other for other in others)}
    return names & set(SIMPLETUNER_OPTIONS)


def test_options_of_the_seeds_and_of_reference_section_2_are_not_refused() -> None:
    host = PluginHost.build()
    wanted = _seed_and_reference_names()
    assert len(wanted) > 150
    refused = {s.name for s in option_statuses(host) if s.name in wanted and s.status == REFUSED}
    assert refused == set(SECTION_2_REFUSALS)
    seeds = set().union(*({str(k).lstrip("-") for k in json.loads(p.read_text())} for p in SEEDS.glob("config-*.json")))
    assert not refused & seeds


def test_differently_maps_onto_stune_options_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    host = PluginHost.build()
    with caplog.at_level(logging.INFO, logger="stune.config"):
        config = validate_config({"ema_cpu_only": "true", "vae_cache_ondemand": True}, host.config_model(), host)
    assert config.ema_device == "cpu"
    assert "`vae_cache_ondemand` accepted: stune encodes every latent before training" in caplog.text
    # an explicit stune value is never overwritten by a mapped SimpleTuner one
    config = validate_config({"ema_cpu_only": True, "ema_device": "accelerator"}, host.config_model(), host)
    assert config.ema_device == "accelerator"


def test_unknown_keys_that_are_no_simpletuner_option_keep_the_nearest_key_answer() -> None:
    host = PluginHost.build()
    with pytest.raises(ConfigError, match="Unknown option `lerning_rate`; did you mean `learning_rate`"):
        validate_config({"lerning_rate": 1}, host.config_model(), host)


def test_a_refused_option_exits_2_with_its_reason(tmp_path: Path) -> None:
    proc = run_cli(["check", "--model_family=flux", "--trust_remote_code=true"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "`trust_remote_code` is not supported by stune: stune loads only diffusers" in proc.stderr
    assert "Traceback" not in proc.stderr


def _resolve_test(ref: str) -> bool:
    """Whether ``ref`` (`path::name[param]`, or `name*` anywhere in the test tree) names a test function."""
    path_part, _, name = ref.rpartition("::")
    name = name.split("[")[0]
    files = (
        [ROOT / path_part]
        if path_part
        else [*ROOT.glob("tests/**/*.py"), *ROOT.glob("core/tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]
    )
    for file in files:
        if not file.is_file():
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                node.name.startswith(name[:-1]) if name.endswith("*") else node.name == name
            ):
                return True
    return False


def test_every_implemented_row_names_a_test_that_exists() -> None:
    host = PluginHost.build()
    rows = [s for s in (*option_statuses(host), *dataset_key_statuses()) if s.status in (IMPLEMENTED, PLUGIN)]
    assert len(rows) > 250
    without = [s.name for s in rows if not s.test]
    assert without == [], "implemented rows without a test"
    unresolved = [f"{s.name}: {s.test}" for s in rows if not _resolve_test(s.test)]
    assert unresolved == [], "tests named by docs/simpletuner-compat.md that do not exist"
    stale = sorted(set(OPTION_TESTS) - set(SIMPLETUNER_OPTIONS))
    assert stale == []


def test_compat_doc_is_generated_from_the_code_and_states_the_counts() -> None:
    generated = run_cli(["options", "--simpletuner"]).stdout
    doc = (ROOT / "docs" / "simpletuner-compat.md").read_text()
    assert generated == doc, "docs/simpletuner-compat.md is stale: regenerate it with `st-train options --simpletuner`"
    assert re.search(r"325 — \d+ implemented .* \d+ implemented differently, \d+ refused", doc)
    for name in SIMPLETUNER_OPTIONS:
        assert f"| `{name}` |" in doc


# -- dataset keys -------------------------------------------------------------------------------------------


def _config(tmp_path: Path, datasets: list[dict[str, Any]], **options: Any) -> CoreOptions:
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(datasets))
    return CoreOptions.model_validate({"data_backend_config": str(path), **options})


def test_every_simpletuner_dataset_key_is_read_or_refused_by_name(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 2)
    base = {"id": "pics", "instance_data_dir": str(tmp_path / "pics")}
    implemented = option_names(DatasetConfig)
    refused = 0
    for key in SIMPLETUNER_DATASET_KEYS:
        if key in base:
            continue
        if key in implemented:
            field = DatasetConfig.model_fields[implemented[key]]
            entry = {**base, key: field.default}
        elif DATASET_ROWS[key].status == DIFFERENTLY:
            entry = {**base, key: True}
        else:
            entry = {**base, key: _asking_value(DATASET_ROWS[key])}
        config = _config(tmp_path, [entry])
        if key in implemented or DATASET_ROWS[key].status == DIFFERENTLY:
            read_dataset_list(config)
            continue
        refused += 1
        with pytest.raises(ConfigError) as caught:
            read_dataset_list(config)
        assert f"dataset key (Dataset `pics` in {tmp_path / 'multidatabackend.json'}) `{key}`" in str(caught.value)
        assert DATASET_ROWS[key].reason in str(caught.value)
        for value in DATASET_ROWS[key].neutral:  # SimpleTuner's defaults pass
            read_dataset_list(_config(tmp_path, [{**base, key: value}]))
    assert refused > 20
    reasons = [row.reason for row in DATASET_ROWS.values() if row.status == REFUSED]
    assert len(set(reasons)) == len(reasons), "two dataset keys share one refusal reason"


def test_dataset_storage_types_are_refused_by_name(tmp_path: Path) -> None:
    for kind, words in (("aws", "aws s3 sync"), ("csv", "download the CSV"), ("huggingface", "export the Hub")):
        config = _config(tmp_path, [{"id": "remote", "type": kind, "aws_bucket_name": "b"}])
        with pytest.raises(ConfigError, match=f"`type` '{kind}' is not supported by stune: .*{words}"):
            read_dataset_list(config)
    config = _config(tmp_path, [{"id": "clips", "dataset_type": "video", "instance_data_dir": "x"}])
    with pytest.raises(
        ConfigError, match="`dataset_type` 'video' is not supported by stune: stune's families train on images"
    ):
        read_dataset_list(config)
    config = _config(tmp_path, [{"id": "pics", "type": "local", "instance_data_dir": "x"}])
    assert read_dataset_list(config)[1][0].type == "local"


def test_dataset_keys_act(tmp_path: Path) -> None:
    """Keys no other test exercised, read the way a run reads them."""
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "b", 2)
    make_images(tmp_path / "masks", 2)
    datasets = [
        {"id": "a", "instance_data_dir": str(tmp_path / "a"), "repeats": 2, "probability": 0.25,
         "train_batch_size": 3, "cache_dir_vae": str(tmp_path / "vae-a"), "is_regularization_data": True},
        {"id": "off", "instance_data_dir": str(tmp_path / "b"), "disabled": True},
        {"id": "off2", "instance_data_dir": str(tmp_path / "b"), "disable": True},
        {"id": "m", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(tmp_path / "masks"), "source_dataset_id": "a"},
        {"id": "t1", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "t1")},
        {"id": "t2", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "t2"),
         "write_batch_size": 7},
    ]  # fmt: skip
    data = resolve_datasets(_config(tmp_path, datasets))
    a = next(ds for ds in data.datasets if ds.id == "a")
    assert [ds.id for ds in data.datasets] == ["a", "m"]  # disabled / disable
    assert (a.repeats, a.entry.probability, a.batch_size, a.is_regularisation) == (2, 0.25, 3, True)
    assert a.latent_cache_dir == tmp_path / "vae-a"
    assert a.masks is not None and a.masks.id == "m"  # source_dataset_id links the mask set
    assert data.text_cache_dir == tmp_path / "t2" and data.text_write_batch_size == 7  # the default one


def _scan(tmp_path: Path, entry: dict[str, Any], captions: dict[str, str], **options: Any) -> dict[str, list[str]]:
    folder = tmp_path / "caps"
    make_images(folder, len(captions), captions=False)
    for image, text in zip(sorted(folder.glob("*.png")), captions.values(), strict=True):
        image.rename(folder / f"{next(k for k, v in captions.items() if v == text)}.png")
        (folder / f"{next(k for k, v in captions.items() if v == text)}.txt").write_text(text)
    dataset = DatasetConfig.model_validate(
        {"id": "caps", "instance_data_dir": str(folder), "caption_strategy": "textfile", **entry}
    )
    config = CoreOptions.model_validate({"resolution": 64, **options})
    scan = scan_dataset(ResolvedDataset(dataset, config, tmp_path / "text"), 16, 2)
    return {r.path.stem: r.captions for r in scan.records}


def test_caption_filter_list(tmp_path: Path) -> None:
    (tmp_path / "filters.txt").write_text("watermark\n^a photo of \ns/blurry/sharp/\n")
    found = _scan(
        tmp_path,
        {"caption_filter_list": str(tmp_path / "filters.txt")},
        {"one": "a photo of a cat, watermark, blurry", "two": "a dog (watermark) on grass"},
    )
    assert found == {"one": ["a cat, sharp"], "two": ["a dog () on grass"]}
    found = _scan(tmp_path / "list", {"caption_filter_list": ["[0-9]+ ", "red"]}, {"x": "3 red apples"})
    assert found == {"x": ["apples"]}
    with pytest.raises(ConfigError, match=r"caption_filter_list 'missing\.txt' is not a file"):
        _scan(tmp_path / "bad", {"caption_filter_list": "missing.txt"}, {"x": "a"})


def test_caption_shuffle(tmp_path: Path) -> None:
    shuffle = {"enable": True, "count": 2, "seed": 42, "position_start": 1}
    caption = "dog, running, park, sunny day"
    first = _scan(tmp_path / "1", {"caption_shuffle": shuffle}, {"d": caption})["d"]
    assert first[0] == caption and len(first) == 3
    for variant in first[1:]:
        tags = variant.split(", ")
        assert tags[0] == "dog" and sorted(tags) == sorted(caption.split(", "))
    assert first[1:] != [caption, caption]
    again = _scan(tmp_path / "2", {"caption_shuffle": shuffle}, {"d": caption})["d"]
    assert again == first  # deterministic: the same variants every run
    other = _scan(tmp_path / "3", {"caption_shuffle": {**shuffle, "seed": None}}, {"d": caption}, seed=7)["d"]
    assert other != first  # the run's seed when the block has none
    short = _scan(tmp_path / "4", {"caption_shuffle": {**shuffle, "include_original": False}}, {"d": "dog, cat"})
    assert short == {"d": ["dog, cat"]}  # nothing to shuffle after the fixed tag: the original stays
    spaces = _scan(tmp_path / "5", {"caption_shuffle": {"enable": True, "split_on": "space", "include_original": False,
                                                        "seed": 1}}, {"w": "a b c d e f"})["w"]  # fmt: skip
    assert len(spaces) == 1 and sorted(spaces[0].split()) == list("abcdef")


def test_disable_multiline_split(tmp_path: Path) -> None:
    text = "first line\nsecond line"
    assert _scan(tmp_path / "1", {}, {"m": text}) == {"m": ["first line", "second line"]}
    assert _scan(tmp_path / "2", {"disable_multiline_split": True}, {"m": text}) == {"m": [text]}


def test_global_dataset_options(tmp_path: Path) -> None:
    """SimpleTuner's global prepend_instance_prompt / only_instance_prompt / skip_file_discovery are
    every dataset's defaults; a dataset's own value wins."""
    make_images(tmp_path / "a", 1)
    make_images(tmp_path / "b", 1)
    datasets = [
        {"id": "a", "instance_data_dir": str(tmp_path / "a"), "caption_strategy": "textfile"},
        {"id": "b", "instance_data_dir": str(tmp_path / "b"), "caption_strategy": "textfile",
         "prepend_instance_prompt": False, "skip_file_discovery": ""},
    ]  # fmt: skip
    config = _config(
        tmp_path, datasets, instance_prompt="sks", prepend_instance_prompt=True, skip_file_discovery="vae text"
    )
    a, b = resolve_datasets(config).datasets
    assert a.entry.prepend_instance_prompt and a.entry.skips == {"vae", "text"}
    assert not b.entry.prepend_instance_prompt and b.entry.skips == set()
    caption = scan_dataset(a, 16, 2).records[0].captions[0]
    assert caption.startswith("sks ")
    only = resolve_datasets(_config(tmp_path, datasets[:1], instance_prompt="sks", only_instance_prompt=True))
    assert scan_dataset(only.datasets[0], 16, 2).records[0].captions == ["sks"]
    with pytest.raises(ConfigError, match=r"Dataset `a` with the global skip_file_discovery: .*'everything'"):
        resolve_datasets(_config(tmp_path, datasets[:1], skip_file_discovery="everything"))


# -- options no other test exercised ------------------------------------------------------------------------


class _Double(torch.nn.Module):  # defined here: dynamo does not trace torch.nn's own modules
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class _Graph(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1


def _flow_sigmas(**options: Any) -> torch.Tensor:
    from stune.step import FlowStep

    config = CoreOptions.model_validate({"flow_schedule_shift": 1.0, **options})
    family = load_toy().ToyFamily(config)
    step = FlowStep(family, config, None, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    return step.draw_sigmas(torch.zeros(20000, 4, 8, 8), torch.Generator().manual_seed(0))


def _dynamo(transformer: torch.nn.Module, **options: Any) -> torch.nn.Module:
    from stune.speed import compile_transformer

    torch._dynamo.reset()
    compile_transformer(
        transformer,
        None,
        CoreOptions.model_validate({"dynamo_backend": "eager", "dynamo_use_regional_compilation": False, **options}),
    )
    return transformer


def _check(option: str, tmp_path: Path, toy_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    if option == "flow_sigmoid_scale":
        assert _flow_sigmas(flow_sigmoid_scale=2.0).std() > _flow_sigmas(flow_sigmoid_scale=0.5).std() + 0.1
    elif option == "flow_use_uniform_schedule":
        assert (_flow_sigmas(flow_use_uniform_schedule=True) < 0.1).float().mean() == pytest.approx(0.1, abs=0.01)
    elif option in ("flow_use_beta_schedule", "flow_beta_schedule_alpha", "flow_beta_schedule_beta"):
        sigmas = _flow_sigmas(flow_use_beta_schedule=True, flow_beta_schedule_alpha=2.0, flow_beta_schedule_beta=6.0)
        assert sigmas.mean() == pytest.approx(0.25, abs=0.01)
    elif option == "flow_custom_timesteps":
        sigmas = _flow_sigmas(flow_custom_timesteps="[0.25, 500, 1.0]", flow_schedule_shift=3.0)
        assert set(sigmas.unique().tolist()) == {0.25, 0.5, 1.0}  # timesteps > 1 are out of 1000; no shift
        assert (sigmas == 0.5).float().mean() == pytest.approx(1 / 3, abs=0.02)
        with pytest.raises(ValueError, match="values must be σ"):
            CoreOptions.model_validate({"flow_custom_timesteps": [0.5, 2000]})
    elif option == "dynamo_fullgraph":
        _dynamo(_Graph(), dynamo_fullgraph=False)(torch.ones(2))
        with pytest.raises(Exception, match="graph_break"):
            _dynamo(_Graph(), dynamo_fullgraph=True)(torch.ones(2))
    elif option == "dynamo_dynamic":

        def recompiles(dynamic: bool) -> bool:
            module = _dynamo(_Double(), dynamo_dynamic=dynamic)
            try:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    for batch in (2, 3, 4):
                        module(torch.ones(batch, 3))
            except Exception as exc:
                return "Recompil" in type(exc).__name__ + str(exc)
            return False

        assert not recompiles(True) and recompiles(False)  # dynamic shapes compile once for every batch size
    elif option in ("fsdp_reshard_after_forward", "fsdp_limit_all_gathers"):
        from stune.sharding import accelerate_plugins

        def plugin(value: bool) -> Any:
            config = CoreOptions.model_validate({"fsdp_enable": True, "fsdp_version": 1, option: value})
            return accelerate_plugins(config, ["Block"])["fsdp_plugin"]

        if option == "fsdp_limit_all_gathers":
            assert plugin(True).limit_all_gathers and not plugin(False).limit_all_gathers
        else:
            assert plugin(True).reshard_after_forward != plugin(False).reshard_after_forward
    elif option in ("optimizer_cpu_offload_method", "optimizer_offload_gradients", "revision"):
        toy = load_toy()
        host = PluginHost.build(plugins=[toy], entry_points=False)
        base = {"model_family": "toy", "pretrained_model_name_or_path": str(toy_model), "output_dir": str(tmp_path)}
        if option == "revision":
            a = prepare(host=host, overrides=base).family
            b = prepare(host=host, overrides={**base, "revision": "v2"}).family
            assert a.text_cache_identity() != b.text_cache_identity()  # a revision is other weights: re-encode
            assert a.latent_cache_identity() != b.latent_cache_identity()
            return
        values = {
            "optimizer_cpu_offload_method": ({"optimizer_cpu_offload_method": "torchao"}, "no CUDA GPU"),
            "optimizer_offload_gradients": (
                {"optimizer": "torch-adamw", "optimizer_cpu_offload_method": "torchao", "optimizer_offload_gradients": True,
                 "gradient_accumulation_steps": 2},
                "cannot",
            ),
        }[option]  # fmt: skip
        if torch.cuda.is_available() != (option == "optimizer_offload_gradients"):
            # torchao's offload is refused without CUDA; the gradient offload is
            # checked only once the optimizer offload itself can run, on a CUDA machine.
            pytest.skip(
                "this check needs a CUDA machine" if option == "optimizer_offload_gradients" else "CPU-only check"
            )
        with pytest.raises(ConfigError, match=values[1]):
            prepare(host=host, overrides={**base, **values[0]})
    elif option in ("cache_dir_text", "write_batch_size"):
        make_images(tmp_path / "p", 1)
        data = resolve_datasets(
            _config(
                tmp_path,
                [{"id": "p", "instance_data_dir": str(tmp_path / "p")}],
                cache_dir_text=str(tmp_path / "t"),
                write_batch_size=5,
            )
        )
        assert data.text_cache_dir == tmp_path / "t" and data.text_write_batch_size == 5
    else:
        raise AssertionError(f"no check for {option}")


class _Recording(_Double):
    """``nn.Module.compile`` hands its arguments to torch.compile unchanged; this one records them."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled_with: list[dict[str, Any]] = []

    def compile(self, *args: Any, **kwargs: Any) -> None:
        self.compiled_with.append(kwargs)
        super().compile(*args, **kwargs)


def test_dynamo_mode_reaches_torch_compile(caplog: pytest.LogCaptureFixture) -> None:
    """Every dynamo_mode is handed to torch.compile, for the whole transformer and for each block
    (regional compilation); ``default`` leaves torch's own default. What a mode then does (autotuning,
    CUDA graphs) is inductor's work on a GPU, not verified here: this CPU machine runs one compiled
    forward through the eager backend, which names the mode it was given."""
    from typing import get_args

    from stune.layout import Arg, BlockList, Segment, TokenLayout
    from stune.speed import compile_transformer

    modes = get_args(CoreOptions.model_fields["dynamo_mode"].annotation)
    assert set(modes) == {"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}
    layout = TokenLayout((BlockList("blocks", Arg("x", 0), (Segment("image", routable=True),)),), patch_size=1)
    for mode in modes:
        expected: dict[str, Any] = {"backend": "inductor", "fullgraph": False, "dynamic": False}
        if mode != "default":
            expected["mode"] = mode
        options = {"dynamo_backend": "inductor", "dynamo_mode": mode}
        whole = _Recording()
        config = CoreOptions.model_validate({**options, "dynamo_use_regional_compilation": False})
        assert compile_transformer(whole, None, config) == 1
        assert whole.compiled_with == [expected], mode
        transformer = torch.nn.Module()
        transformer.blocks = torch.nn.ModuleList([_Recording(), _Recording()])
        config = CoreOptions.model_validate({**options, "dynamo_use_regional_compilation": True})
        assert compile_transformer(transformer, layout, config) == 2
        assert [block.compiled_with for block in transformer.blocks] == [[expected], [expected]], mode
    with caplog.at_level(logging.WARNING):
        _dynamo(_Double(), dynamo_mode="max-autotune")(torch.ones(1, 3))
    assert "'mode': 'max-autotune'" in caplog.text  # what the backend received from torch.compile


ACTS = [
    option
    for option, ref in OPTION_TESTS.items()
    if ref.startswith("tests/test_simpletuner_compat.py::test_option_acts[")
    and option not in ("vae_batch_size", "ema_update_interval", "ema_device", "musubi_block_swap_device")
]


@pytest.mark.parametrize("option", ACTS)
def test_option_acts(option: str, tmp_path: Path, toy_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    _check(option, tmp_path, toy_model, caplog)


def test_vae_batch_size_and_ema_update_interval_in_a_toy_run(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stune.hookspecs import hookimpl
    from stune.train import train

    from .test_toy_family import toy_run

    toy = load_toy()
    batches: list[int] = []

    class Recording(toy.ToyFamily):  # type: ignore[misc,name-defined]
        name = "toy-recording"

        def encode_images(self, components: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            batches.append(pixels.shape[0])
            return super().encode_images(components, pixels)  # type: ignore[no-any-return]

    class Plugin:
        @hookimpl
        def register_families(self, register: Any) -> None:
            register(Recording)

    run_dir = toy_run(
        tmp_path, toy_model, model_family="toy-recording", vae_batch_size=3, use_ema=True, ema_update_interval=2,
        ema_decay=0.5, ema_device="cpu", musubi_block_swap_device="cpu", max_train_steps=2, validation_step_interval=0,
    )  # fmt: skip
    monkeypatch.chdir(run_dir)
    host = PluginHost.build(plugins=[toy, Plugin()], entry_points=False)
    train(prepare(host=host))
    assert sorted(batches, reverse=True) == [3, 1]  # four images, three per VAE forward
    out = run_dir / "output"
    first, second = (load_file(out / f"checkpoint-{s}" / "ema_state.safetensors") for s in (1, 2))
    # LoRA B starts at zero: with ema_update_interval 2 the EMA has not moved after step 1
    assert any(not t.any() for t in first.values())
    assert not any(not t.any() for t in second.values())
    assert all(t.device.type == "cpu" for t in first.values())


def test_user_errors_name_the_option_for_a_bad_value_of_an_accepted_key() -> None:
    host = PluginHost.build()
    with pytest.raises(UserError, match=r"`validation_lycoris_strength` = 0\.5 is not supported by stune"):
        validate_config({"validation_lycoris_strength": 0.5}, host.config_model(), host)


def _recorder(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A folder ``seen`` and a script command that writes its {local_checkpoint_path} into ``seen/<name>``
    (``name`` may hold placeholders such as {global_step})."""
    import shlex
    import sys

    seen = tmp_path / "seen"
    seen.mkdir()
    script = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
    return seen, shlex.join([sys.executable, "-c", script, f"{seen}/{name}", "{local_checkpoint_path}"])


def test_post_checkpoint_script_and_validate_after_step_in_a_toy_run(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from stune.train import train

    from .test_toy_family import toy_run

    toy = load_toy()
    seen, command = _recorder(tmp_path, "step-{global_step}")
    run_dir = toy_run(
        tmp_path / "run", toy_model, max_train_steps=3, validation_step_interval=1, validate_after_step=2,
        post_checkpoint_script=command,
    )  # fmt: skip
    monkeypatch.chdir(run_dir)
    result = train(prepare(host=PluginHost.build(plugins=[toy], entry_points=False)))
    # one command per checkpoint, with the checkpoint's own path and step (the run waits for them at its end)
    assert sorted(p.name for p in seen.iterdir()) == ["step-1", "step-2", "step-3"]
    assert Path((seen / "step-2").read_text()) == (run_dir / "output" / "checkpoint-2").resolve()
    steps = sorted({p.name.split("-")[1] for p in result.validation_images})
    assert steps == ["000002", "000003"]  # none at step 1: validations start at validate_after_step


def test_validate_after_epoch() -> None:
    from stune.train import _validation_started

    config = CoreOptions.model_validate({"validate_after_epoch": 2})
    assert not _validation_started(config, 100, 1.5)
    assert _validation_started(config, 100, 2.0) and _validation_started(config, 1, 3.0)
    both = CoreOptions.model_validate({"validate_after_epoch": 1, "validate_after_step": 50})
    assert not _validation_started(both, 40, 1.0) and not _validation_started(both, 60, 0.5)
    assert _validation_started(both, 60, 1.0)


def test_post_upload_script_after_the_upload(tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub is unreachable here: stune's own push returns the repository URL it would have."""
    import shlex
    import sys

    from stune import publish, scripts

    toy = load_toy()
    marker = tmp_path / "uploaded"
    script = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2] + ' ' + sys.argv[3])"
    config = CoreOptions.model_validate(
        {
            "model_family": "toy",
            "pretrained_model_name_or_path": str(toy_model),
            "output_dir": str(tmp_path / "out"),
            "push_to_hub": True,
            "hub_model_id": "someone/tiny",
            "post_upload_script": shlex.join(
                [sys.executable, "-c", script, str(marker), "{huggingface_path}", "{remote_checkpoint_path}"]
            ),
        }
    )
    monkeypatch.setattr(publish, "push", lambda config, output_dir: "https://huggingface.co/someone/tiny")
    (tmp_path / "out").mkdir()
    publish.finish_run(config, toy.ToyFamily(config), tmp_path / "out", None, is_main=False)
    scripts.wait_all()
    assert not marker.exists()  # other processes never run it
    publish.finish_run(config, toy.ToyFamily(config), tmp_path / "out", None, is_main=True)
    scripts.wait_all()
    assert marker.read_text() == "someone/tiny https://huggingface.co/someone/tiny"


def test_masked_loss_probability() -> None:
    from stune.step import FlowStep

    def weights(chance: float) -> torch.Tensor:
        config = CoreOptions.model_validate({"masked_loss_probability": chance})
        step = FlowStep(load_toy().ToyFamily(config), config, None, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
        batch = {
            "latent_mean": torch.zeros(400, 4, 2, 2),
            "latent_std": torch.zeros(400, 4, 2, 2),
            "embeds": {"tokens": torch.zeros(400, 3, 8)},
            "loss_weight": torch.zeros(400, 1, 2, 2),  # masks that train nothing
        }
        weight = step.inputs(batch, torch.Generator().manual_seed(0)).loss_weight
        assert weight is not None
        return weight.flatten(1).mean(1)  # 0: masked sample, 1: unmasked

    assert weights(1.0).sum() == 0  # SimpleTuner's default: every mask applies
    assert weights(0.0).sum() == 400
    unmasked = weights(0.25)
    assert set(unmasked.tolist()) == {0.0, 1.0} and unmasked.mean() == pytest.approx(0.75, abs=0.06)


def test_validation_external_script_in_a_toy_run(
    tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from stune.train import train

    from .test_toy_family import toy_run

    toy = load_toy()
    seen, command = _recorder(tmp_path, "v-{global_step}")
    run_dir = toy_run(
        tmp_path / "run", toy_model, max_train_steps=2, validation_step_interval=1,
        validation_method="external-script", validation_external_script=command,
    )  # fmt: skip
    monkeypatch.chdir(run_dir)
    result = train(prepare(host=PluginHost.build(plugins=[toy], entry_points=False)))
    assert result.validation_images == []  # the script validates instead of stune
    out = (run_dir / "output").resolve()
    assert {p.name: p.read_text() for p in seen.iterdir()} == {
        "v-1": str(out / "checkpoint-1"),  # each validation gets the newest checkpoint
        "v-2": str(out / "checkpoint-2"),
    }
    with pytest.raises(ConfigError, match="external-script needs `validation_external_script`"):
        validate_config({"validation_method": "external-script"}, CoreOptions)
