"""HiDream with the quantization plugin (stune-quant): fp8-quanto, which SimpleTuner refuses for
HiDream, trains like the unquantized model here. The seed config's int8-quanto run is in
test_hidream_training.py. Skipped, and said so, while stune-quant is not installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stune.plugins import PluginHost
from stune.session import prepare
from stune.train import train

pytest.importorskip("stune_quant", reason="stune-quant is not installed: fp8-quanto is untested here")


def test_fp8_quanto_trains_like_the_unquantized_model(
    tmp_path: Path, tiny_hidream_dir: Path, hidream_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = hidream_run(
        tmp_path,
        tiny_hidream_dir,
        images=2,
        wide=2,
        max_train_steps=3,
        learning_rate="3e-3",
        caption_dropout_probability=0,
        hidream_use_load_balancing_loss="true",
    )
    monkeypatch.chdir(run)
    losses: dict[str, list[float]] = {}
    for precision in ("no_change", "fp8-quanto"):
        output = f"output-{precision}"
        overrides = {"output_dir": output, "base_model_precision": precision, "text_encoder_4_precision": precision}
        result = train(prepare(overrides=overrides, host=PluginHost.build(["hidream", "quant"])))
        assert result.final_step == 3
        records = [json.loads(line) for line in (run / output / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [r["diffusion_loss"] for r in records if "diffusion_loss" in r]
    plain, fp8 = losses["no_change"], losses["fp8-quanto"]
    assert len(fp8) == 3 and all(0 < loss < 10 for loss in fp8)  # finite
    # Same data, noise and σ: every step's loss within a few percent of the unquantized model's.
    assert all(abs(a - b) / a < 0.05 for a, b in zip(plain, fp8, strict=True)), (plain, fp8)
