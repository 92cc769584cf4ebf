"""docs/troubleshooting.md quotes what stune says for each common mistake: every case here is run
as `st-train check` runs it, and its sentence must appear in the page word for word.

Run ``python tests/test_hostile_docs.py`` to print the sentences (to update the page)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stune.cli import check_session
from stune.errors import UserError
from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import make_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
BASE: dict[str, Any] = {
    "model_family": "flux",
    "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "data_backend_config": "config/multidatabackend.json",
    "output_dir": "output",
    "train_batch_size": 1,
}
DATASETS: list[dict[str, Any]] = [{"id": "pics", "instance_data_dir": "data", "caption_strategy": "textfile"}]


def _datasets(entries: list[Any]) -> Callable[[Path], dict[str, Any]]:
    def setup(root: Path) -> dict[str, Any]:
        (root / "config" / "other-datasets.json").write_text(json.dumps(entries))
        return {"data_backend_config": "config/other-datasets.json"}

    return setup


def _file(name: str, text: str, option: str) -> Callable[[Path], dict[str, Any]]:
    def setup(root: Path) -> dict[str, Any]:
        (root / "config" / name).write_text(text)
        return {option: f"config/{name}"}

    return setup


#: (the mistake, what the case sets: options, or a function writing files and returning options)
CASES: list[tuple[str, dict[str, Any] | Callable[[Path], dict[str, Any]]]] = [
    ("a misspelt option", {"learning_rat": "1e-4"}),
    ("a value of the wrong type", {"lora_rank": "sixteen"}),
    ("a choice that does not exist", {"mixed_precision": "bf32"}),
    ("a dataset option in the config", {"crop_aspect": "square"}),
    ("no dataset list", {"data_backend_config": "config/missing.json"}),
    ("a dataset list that is not JSON", _file("broken.json", '[{"id": "pics",, }]', "data_backend_config")),
    ("a dataset folder that does not exist", _datasets([{"id": "pics", "instance_data_dir": "photos"}])),
    ("a dataset id that is a path", _datasets([{"id": "../pics", "instance_data_dir": "data"}])),
    (
        "two datasets with the same id",
        _datasets([{"id": "pics", "instance_data_dir": "data"}, {"id": "pics", "instance_data_dir": "data"}]),
    ),
    ("an unknown dataset key", _datasets([{"id": "pics", "instance_data_dir": "data", "resolutoin": 512}])),
    ("an output_dir that is a file", {"output_dir": "notes.txt"}),
    ("a path with a NUL byte", {"output_dir": "out\x00put"}),
    ("a tracker run name that is a path", {"tracker_run_name": "../../runs/a"}),
    ("a LyCORIS config that does not exist", {"lora_type": "lycoris", "lycoris_config": "config/lycoris.json"}),
    ("an unknown LyCORIS algo", _file("lyco.json", '{"algo": "lokrr", "factor": 16}', "lycoris_config")),
    ("a prompt library entry without a prompt", _file("prompts.json", '{"portrait": 3}', "user_prompt_library")),
    ("a seed out of range", {"seed": -1}),
    ("too few images for one batch", {"train_batch_size": 8}),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("troubleshooting")
    old = Path.cwd()
    os.chdir(root)
    try:
        yield _project(root)
    finally:
        os.chdir(old)


def _project(root: Path) -> Path:
    make_images(root / "data", 2)
    (root / "config").mkdir()
    (root / "config" / "multidatabackend.json").write_text(json.dumps(DATASETS))
    (root / "notes.txt").write_text("not a folder\n")
    return root


def said(root: Path, host: PluginHost, case: dict[str, Any] | Callable[[Path], dict[str, Any]]) -> str:
    options = case(root) if callable(case) else case
    if "lycoris_config" in options:
        options = {"lora_type": "lycoris", **options}
    try:
        check_session(prepare(host=host, overrides={**BASE, **options}))
    except UserError as exc:
        return f"st-train: error: {exc}"
    raise AssertionError(f"{options} was accepted")


def test_every_quoted_sentence_is_what_stune_says(project: Path) -> None:
    host = PluginHost.build()
    page = DOC.read_text(encoding="utf-8")
    missing = []
    for title, case in CASES:
        sentence = said(project, host, case)
        if sentence not in page:
            missing.append(f"{title}:\n    {sentence}")
    assert not missing, "docs/troubleshooting.md does not quote:\n" + "\n".join(missing)


if __name__ == "__main__":  # print the sentences, for the page
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        root = _project(Path(folder))
        host = PluginHost.build()
        for title, case in CASES:
            print(f"## {title}\n\n```\n{said(root, host, case)}\n```\n", file=sys.stdout)
