"""`st-train demo` builds a tiny model and dataset, trains, and says where everything is."""

from __future__ import annotations

from pathlib import Path

from stune.testing import run_cli


def test_demo_runs_and_reports_outputs(tmp_path: Path) -> None:
    proc = run_cli(["demo", "--dir", str(tmp_path / "demo"), "--steps", "6"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo" / "output"
    assert "stune demo finished: 6 steps" in proc.stdout
    assert str(out / "pytorch_lora_weights.safetensors") in proc.stdout
    assert "load_lora_weights" in proc.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "validation_images").glob("*.png"))
