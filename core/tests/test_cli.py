"""The command line: light imports, JSON listings, exit status 2 with one sentence on mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stune.testing import offline_env, run_cli

PROBE = """
import sys
from stune.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "peft") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def _heavy_modules_after(argv: list[str], cwd: Path) -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        env=offline_env(),
        cwd=cwd,
        timeout=120,
    )
    heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY=")]
    assert heavy, proc.stderr
    return heavy[-1][len("HEAVY=") :], proc.stdout


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["plugins"], ["plugins", "--all"], ["options"], ["train", "--help"], ["check", "--help"]],
)
def test_light_commands_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    heavy, stdout = _heavy_modules_after(argv, tmp_path)
    assert heavy == "", f"`st-train {' '.join(argv)}` imported {heavy}"
    assert stdout.strip()


def test_plugins_lists_json(tmp_path: Path) -> None:
    proc = run_cli(["plugins", "--all"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert listing[0]["name"] == "stune.defaults"
    assert "load_model" in listing[0]["hooks"]


def test_options_json_has_defaults_and_help(tmp_path: Path) -> None:
    proc = run_cli(["options", "--json"], cwd=tmp_path)
    rows = {row["option"]: row for row in json.loads(proc.stdout)}
    assert rows["learning_rate"]["default"] == 1e-4
    assert rows["lora_rank"]["help"]
    assert all(row["help"] for row in rows.values()), [k for k, v in rows.items() if not v["help"]]


def test_no_config_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli([], cwd=tmp_path)
    assert proc.returncode == 2
    assert "config/config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_exits_2_with_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({"learning_rat": 1e-4}))
    proc = run_cli([], cwd=tmp_path)
    assert proc.returncode == 2
    assert "`learning_rat`" in proc.stderr and "`learning_rate`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_plugin_exits_2(tmp_path: Path) -> None:
    proc = run_cli(["--plugin", "nonexistent"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "pip install stune-nonexistent" in proc.stderr


def test_unknown_command(tmp_path: Path) -> None:
    proc = run_cli(["frobnicate"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Unknown command `frobnicate`" in proc.stderr
