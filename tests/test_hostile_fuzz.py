"""Property-based fuzzing of everything a user (or a web page) hands stune before a model loads.

Every option of the registry (the core's and every installed plugin's), the dataset list, the
LyCORIS config and the prompt library get wrong types, out-of-range numbers, empty and huge
strings, NUL bytes, `../`, unknown choices. Each case runs what `st-train check` runs
(:func:`stune.session.prepare` + :func:`stune.cli.check_session`) in this process and must end
either checked or in one :class:`stune.UserError` sentence; any other exception is a bug.
Examples are derandomized (the ``stune-fuzz`` profile of tests/conftest.py), so every run tries
the same cases; ``FUZZ_CASES`` counts them for the report at the end of the module.
"""

from __future__ import annotations

import json
import os
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stune.cli import check_session
from stune.data.config import DatasetConfig
from stune.errors import UserError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images, run_cli

FUZZ = settings.get_profile("stune-fuzz")
#: test name → Counter(outcome): how many generated cases each fuzz test ran and how they ended
FUZZ_CASES: dict[str, Counter[str]] = {}

HOSTILE_TEXT = [
    "",
    " ",
    "../../escape",
    "../",
    "/",
    "/etc/passwd",
    "a\x00b",
    "\ud800",
    "x" * 300,
    "é" * 200,
    "none",
    "null",
    "true",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e400",
    "[1, 2",
    "[]",
    "{}",
    "latest",
    "🙂",
    "a\nb",
]
FAMILIES = ["flux", "sd3", "hidream"]
#: what the fuzzer may give a folder option: a folder is the user's choice of place (even `/`), so
#: hostile values stay relative to the test's folder, and the ones that cannot be folders are kept
SAFE_FOLDER_VALUES = ["vae-a", "cache/vae-b", "", " ", "x" * 300, "a\x00b", "\ud800", "a_file", "a_file/below"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A run folder (two images with captions), the host with every installed plugin, and the
    working directory moved there so relative paths the fuzzer invents stay inside it."""
    root = tmp_path_factory.mktemp("fuzz")
    make_images(root / "data", 2, size=(64, 64))
    make_images(root / "masks", 2, size=(64, 64), captions=False)
    (root / "a_file").write_text("not a folder\n")
    (root / "datasets.json").write_text(json.dumps([{"id": "pics", "instance_data_dir": str(root / "data")}]))
    host = PluginHost.build()
    assert {"flux", "sd3", "hidream", "quant", "tread", "rollout", "web"} <= {p["name"] for p in host.listing()}
    old = Path.cwd()
    os.chdir(root)
    try:
        yield {"root": root, "host": host, "model": host.config_model()}
    finally:
        os.chdir(old)


def base_config(root: Path, family: str = "flux") -> dict[str, Any]:
    return {
        "model_family": family,
        "pretrained_model_name_or_path": str(root / "no-model-is-loaded"),
        "data_backend_config": str(root / "datasets.json"),
        "output_dir": str(root / "output"),
        "cache_dir": str(root / "cache"),
    }


def outcome(world: dict[str, Any], raw: dict[str, Any], test: str) -> str | None:
    """Check ``raw`` as `st-train check` would: None if it passes, else the one sentence."""
    counts = FUZZ_CASES.setdefault(test, Counter())
    try:
        session = prepare(host=world["host"], overrides=dict(raw))
        check_session(session)
    except UserError as exc:
        message = str(exc)
        assert message.strip(), f"empty error for {raw!r}"
        assert "\n" not in message.strip(), f"more than one line for {raw!r}: {message}"
        assert len(message) < 1200, f"a {len(message)}-character error for {raw!r}"
        named = "`" in message or "/" in message or any(str(key) in message for key in raw)
        assert named, f"names no option or file for {raw!r}: {message}"
        counts["UserError"] += 1
        return message
    counts["checked"] += 1
    return None


# -- strategies --------------------------------------------------------------------------------------

hostile_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40))
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def field_values(annotation: Any, default: Any) -> st.SearchStrategy[Any]:
    """Values for one option: anything, its choices and near-misses of them, its default as text."""
    near: list[Any] = [default, str(default)]
    for arg in _literals(annotation):
        near += [arg, str(arg).upper(), f"{arg}x", f" {arg} "]
    return st.one_of(anything, st.sampled_from(near), numbers.map(str))


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [a for arg in typing.get_args(annotation) for a in _literals(arg)]


@st.composite
def option_sets(draw: st.DrawFn, model: type[Any]) -> dict[str, Any]:
    fields = model.model_fields
    keys = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True))
    values = {k: draw(field_values(fields[k].annotation, fields[k].default)) for k in keys}
    for key, value in values.items():
        if key.endswith("_dir") and isinstance(value, str) and (value.startswith("/") or ".." in value):
            values[key] = draw(st.sampled_from(SAFE_FOLDER_VALUES))  # scanning writes its index there
    if draw(st.booleans()):  # as typed on the command line: every value a string
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    return values


# -- options ------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_every_option_fuzzed_ends_checked_or_in_one_sentence(world: dict[str, Any], data: st.DataObject) -> None:
    family = data.draw(st.sampled_from(FAMILIES))
    options = data.draw(option_sets(world["model"]))
    raw = {**base_config(world["root"], family), **options}
    message = outcome(world, raw, "options")
    if message is not None and not any(k in message for k in options):
        FUZZ_CASES["options"]["error names another option or file"] += 1


@FUZZ
@given(key=st.one_of(hostile_text, st.sampled_from(["learning_rat", "--lora_rank", "--", "id", "resolution "])))
def test_unknown_and_hostile_keys(world: dict[str, Any], key: str) -> None:
    outcome(world, {**base_config(world["root"]), key: "1"}, "keys")


SWEEP_VALUES: list[Any] = ["", "a\x00b", "\ud800", "x" * 300, "../../escape", True, 1e308, 2**70, -1, [], {"a": 1}]


def test_every_option_once_with_each_hostile_value(world: dict[str, Any]) -> None:
    """Not generated: every option of every plugin with each of a few hostile values (a full sweep)."""
    for name in sorted(world["model"].model_fields):
        for value in SWEEP_VALUES:
            outcome(world, {**base_config(world["root"]), name: value}, "sweep")


# -- dataset lists ----------------------------------------------------------------------------------

DATASET_KEYS = [
    "id",
    "type",
    "dataset_type",
    "instance_data_dir",
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "crop",
    "crop_aspect",
    "crop_aspect_buckets",
    "caption_strategy",
    "instance_prompt",
    "repeats",
    "probability",
    "cache_dir_vae",
    "conditioning_data",
    "conditioning_type",
    "source_dataset_id",
    "disabled",
    "parquet",
    "metadata_backend",
    "skip_file_discovery",
    "hash_filenames",
    "train_batch_size",
    "max_num_samples",
    "is_regularisation_data",
    "default",
    "cache_dir",
    "unknown_key",
]


@st.composite
def dataset_lists(draw: st.DrawFn, root: Path) -> Any:
    if draw(st.booleans()):
        return draw(near_valid_lists(root))
    ids = draw(st.lists(st.one_of(st.sampled_from(["pics", "masks", "refs", "text"]), hostile_text), max_size=4))
    folders = [str(root / "data"), str(root / "masks"), str(root / "missing"), str(root / "a_file"), "data"]
    entries: list[Any] = []
    for index, name in enumerate(ids):
        entry: dict[str, Any] = {"id": name} if draw(st.integers(0, 9)) else {}
        entry["instance_data_dir"] = draw(st.one_of(st.sampled_from(folders), hostile_text))
        entry["dataset_type"] = draw(st.sampled_from(["image", "conditioning", "eval", "text_embeds", "imagex"]))
        if entry["dataset_type"] == "conditioning" or draw(st.booleans()):
            entry["conditioning_type"] = draw(st.sampled_from(["mask", "reference_strict", "reference_loose", "x"]))
        if ids and draw(st.booleans()):  # links, cycles and self-references included
            entry["conditioning_data"] = draw(st.one_of(st.sampled_from(ids), st.lists(st.sampled_from(ids))))
        if ids and draw(st.integers(0, 3)) == 0:
            entry["source_dataset_id"] = draw(st.sampled_from(ids))
        for key in draw(st.lists(st.sampled_from(DATASET_KEYS), max_size=3, unique=True)):
            entry[key] = draw(anything)
        if "cache_dir_vae" in entry or "cache_dir" in entry:  # folder options: the user's own place, kept in here
            entry["cache_dir_vae"] = entry["cache_dir"] = draw(st.sampled_from(SAFE_FOLDER_VALUES))
        entries.append(entry if draw(st.integers(0, 19)) else draw(anything))
        if index and draw(st.integers(0, 9)) == 0:
            entries.append(entries[0])  # a duplicate entry
    return entries if draw(st.integers(0, 19)) else draw(anything)


@st.composite
def near_valid_lists(draw: st.DrawFn, root: Path) -> Any:
    """A list that checks as it is (images, masks, a text cache), with one or two values made hostile."""
    entries: list[dict[str, Any]] = [
        {"id": "pics", "instance_data_dir": str(root / "data"), "conditioning_data": ["masks"]},
        {
            "id": "masks",
            "dataset_type": "conditioning",
            "conditioning_type": "mask",
            "instance_data_dir": str(root / "masks"),
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]
    for _ in range(draw(st.integers(1, 2))):
        entry = entries[draw(st.integers(0, 2))]
        key = draw(st.sampled_from([k for k in DATASET_KEYS if k not in ("cache_dir_vae", "cache_dir")]))
        entry[key] = draw(
            field_values(DatasetConfig.model_fields[key].annotation, None)
            if key in DatasetConfig.model_fields
            else anything
        )
    return entries


@FUZZ
@given(data=st.data())
def test_dataset_lists_fuzzed(world: dict[str, Any], data: st.DataObject) -> None:
    root = world["root"]
    path = root / "fuzzed-datasets.json"
    listing = data.draw(dataset_lists(root))
    path.write_text(json.dumps(listing))
    before = set(_files_under(root))
    message = outcome(world, {**base_config(root), "data_backend_config": str(path)}, "datasets")
    folders = [
        "cache/",
        *(f"{e['cache_dir_vae']}/" for e in _entries(listing) if isinstance(e.get("cache_dir_vae"), str)),
    ]
    written = [p for p in set(_files_under(root)) - before if not p.startswith(tuple(folders))]
    assert not written, f"{listing!r} wrote {written} outside the cache folders ({message})"


def _entries(listing: Any) -> list[dict[str, Any]]:
    return [e for e in listing if isinstance(e, dict)] if isinstance(listing, list) else []


def _files_under(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


# -- LyCORIS configs and prompt libraries ----------------------------------------------------------------

LYCORIS_ALGOS = ["lora", "locon", "loha", "lokr", "full", "LoKr", "lokrr", "", "boft", "ia3", "diag-oft"]


@st.composite
def lycoris_configs(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):  # a sound config (SimpleTuner's LoKr example) with one value made hostile
        sound: dict[str, Any] = {
            "algo": "lokr",
            "multiplier": 1.0,
            "linear_dim": 10000,
            "linear_alpha": 1,
            "factor": 16,
            "apply_preset": {
                "target_module": ["Attention", "FeedForward"],
                "module_algo_map": {"Attention": {"factor": 16}},
            },
        }
        key = draw(st.sampled_from(["algo", "multiplier", "linear_dim", "factor", "apply_preset", "preset", "dropout"]))
        if draw(st.booleans()):
            sound[key] = draw(st.one_of(numbers, hostile_text, anything))
        return sound
    settings_: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        settings_["algo"] = draw(st.one_of(st.sampled_from(LYCORIS_ALGOS), anything))
    for key in draw(
        st.lists(
            st.sampled_from(
                ["multiplier", "linear_dim", "linear_alpha", "conv_dim", "factor", "block_size", "dropout", "preset"]
            ),
            max_size=3,
            unique=True,
        )
    ):
        settings_[key] = draw(st.one_of(numbers, numbers.map(str), anything))
    if draw(st.booleans()):
        preset: Any = {
            key: draw(anything)
            for key in draw(
                st.lists(
                    st.sampled_from(["target_module", "module_algo_map", "name_algo_map", "target_name", "bogus"]),
                    max_size=2,
                )
            )
        }
        if draw(st.booleans()):
            preset["module_algo_map"] = {"Attention": {"algo": draw(st.sampled_from(LYCORIS_ALGOS)), "factor": 4}}
        settings_["apply_preset"] = preset
    return settings_ if draw(st.integers(0, 19)) else draw(anything)


@FUZZ
@given(lycoris=lycoris_configs())
def test_lycoris_configs_fuzzed(world: dict[str, Any], lycoris: Any) -> None:
    path = world["root"] / "lycoris.json"
    path.write_text(json.dumps(lycoris))
    raw = {**base_config(world["root"]), "lora_type": "lycoris", "lycoris_config": str(path)}
    outcome(world, raw, "lycoris")


libraries = st.one_of(
    anything,
    st.dictionaries(
        hostile_text,
        st.one_of(hostile_text, st.fixed_dictionaries({"prompt": hostile_text}, optional={"image": hostile_text})),
        max_size=4,
    ),
)


@FUZZ
@given(library=libraries, text=st.booleans())
def test_prompt_libraries_fuzzed(world: dict[str, Any], library: Any, text: bool) -> None:
    path = world["root"] / "prompts.json"
    if text:
        path.write_text(json.dumps(library))
    else:  # raw bytes: not UTF-8, not JSON
        path.write_bytes(b"\xff\xfe{" + json.dumps(library).encode("utf-16")[:50])
    outcome(world, {**base_config(world["root"]), "user_prompt_library": str(path)}, "prompt libraries")


# -- the known bugs ---------------------------------------------------------------------------------------


def test_unknown_lycoris_algo_is_one_sentence(world: dict[str, Any]) -> None:
    path = world["root"] / "lycoris-unknown.json"
    path.write_text(json.dumps({"algo": "lokrr", "linear_dim": 4}))
    raw = {**base_config(world["root"]), "lora_type": "lycoris", "lycoris_config": str(path)}
    message = outcome(world, raw, "regressions")
    assert message is not None and "`algo`" in message and "'lokrr'" in message and "lokr" in message


def test_output_dir_that_is_a_file_is_one_sentence(world: dict[str, Any]) -> None:
    file = world["root"] / "a_file"
    message = outcome(world, {**base_config(world["root"]), "output_dir": str(file)}, "regressions")
    assert message is not None and "`output_dir`" in message and "is a file" in message
    below = outcome(world, {**base_config(world["root"]), "output_dir": str(file / "run")}, "regressions")
    assert below is not None and "lies under" in below


@pytest.mark.parametrize(
    "name", ["../escape", "../../../tmp/x", "/abs/path", "a\x00b", "x" * 256, "é" * 101, "..", "a/b", "a\\b"]
)
def test_dataset_id_never_becomes_a_path(world: dict[str, Any], name: str) -> None:
    root = world["root"]
    path = root / "ids.json"
    path.write_text(json.dumps([{"id": name, "instance_data_dir": str(root / "data")}]))
    before = set(_files_under(root.parent))
    message = outcome(world, {**base_config(root), "data_backend_config": str(path)}, "regressions")
    assert message is not None and "dataset id" in message
    assert set(_files_under(root.parent)) == before  # nothing written anywhere


def test_cli_exits_2_without_traceback(world: dict[str, Any]) -> None:
    """The real command line, twice: the contract the in-process cases rely on."""
    root = world["root"]
    (root / "cli-lycoris.json").write_text(json.dumps({"algo": "nope"}))
    config = {**base_config(root), "lora_type": "lycoris", "lycoris_config": str(root / "cli-lycoris.json")}
    (root / "cli-config.json").write_text(json.dumps(config))
    for extra in ([], ["--output_dir", str(root / "a_file")]):
        proc = run_cli(["check", "--config", str(root / "cli-config.json"), *extra], cwd=root)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("st-train: error:")]
        assert len(errors) == 1 and ("lycoris" in errors[0] or "output_dir" in errors[0]), proc.stderr[-2000:]


def test_zz_report_fuzz_counts(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Prints how many cases each fuzz test generated and how they ended (run with -s to see it)."""
    total = sum(sum(c.values()) for c in FUZZ_CASES.values())
    with capsys.disabled():
        for name, counts in sorted(FUZZ_CASES.items()):
            print(f"\nfuzz {name}: {dict(counts)}")
        print(f"fuzz total: {total} cases")
    if len(FUZZ_CASES) >= 6:  # the whole module ran (not one test picked with -k)
        assert total > 1000
