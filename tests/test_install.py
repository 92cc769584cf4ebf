"""Installing the core alone: plugins listing works without torch, a missing family names its package."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def core_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("core-only") / "venv"
    venv.create(root, with_pip=True)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Only the light dependencies: proving listing and errors need no torch at all.
    subprocess.run([*pip, "pluggy>=1.5", "pydantic>=2.7"], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", str(REPO / "core")], check=True, timeout=600)
    return root


def _st_train(venv_root: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv_root / "bin" / "st-train"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_core_alone_lists_plugins_and_names_missing_packages(core_only_venv: Path, tmp_path: Path) -> None:
    python = core_only_venv / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0

    listing = _st_train(core_only_venv, ["plugins"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == []

    missing = _st_train(core_only_venv, ["--plugin", "flux"], tmp_path)
    assert missing.returncode == 2
    assert "pip install stune-flux" in missing.stderr
    assert "Traceback" not in missing.stderr

    server = _st_train(core_only_venv, ["server"], tmp_path)
    assert server.returncode == 2 and "pip install stune-web" in server.stderr

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({"model_family": "flux", "flux_lora_target": "all"}))
    by_key = _st_train(core_only_venv, [], tmp_path)
    assert by_key.returncode == 2
    assert "`flux_lora_target` belongs to the `flux` plugin" in by_key.stderr
    assert "pip install stune-flux" in by_key.stderr

    (tmp_path / "config" / "config.json").write_text(json.dumps({"model_family": "flux"}))
    by_family = _st_train(core_only_venv, [], tmp_path)
    assert by_family.returncode == 2
    assert "model_family `flux` needs the `flux` plugin" in by_family.stderr
