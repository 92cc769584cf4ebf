"""SD3 and HiDream tiny runs with scheduled sampling, through each family's own tiny builder: the run
finishes, the training forward gets the same states as a one-sample-at-a-time rollout through the
family's ``predict`` (HiDream's inverted velocity is the family's business, not the plugin's), a
step costs the longest rollout plus one forward, and the LoRA loads in diffusers. Skipped while a
family's plugin is not installed."""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

import stune_rollout

from .conftest import LORA_FILE, Observer, family_run, metrics, train_here

#: family → (plugin module, tiny builder, diffusers pipeline)
FAMILIES = {
    "sd3": ("stune_sd3", "build_tiny_sd3", "StableDiffusion3Pipeline"),
    "hidream": ("stune_hidream", "build_tiny_hidream", "HiDreamImagePipeline"),
}
MAX_OFFSET = 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_with_rollout_and_its_lora_loads_in_diffusers(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import diffusers
    from peft.utils import get_peft_model_state_dict

    module, builder, pipeline = FAMILIES[family]
    plugin = pytest.importorskip(module, reason=f"the {family} plugin is not installed")
    tiny = importlib.import_module(f"{module}.tiny")
    model = getattr(tiny, builder)(tmp_path / "model")
    run = family_run(
        tmp_path / "run",
        family,
        model,
        scheduled_sampling_max_step_offset=MAX_OFFSET,
        scheduled_sampling_probability=1.0,
        scheduled_sampling_strategy="biased_late",
    )
    observer = Observer()
    result = train_here(run, [plugin, stune_rollout, observer], monkeypatch)
    assert result.final_step == 2

    rolled = 0
    for check, forwards, record in zip(observer.checks, observer.steps, metrics(run), strict=True):
        for steps, reference, interpolated in zip(
            check["offsets"], check["from_reference"], check["from_interpolated"], strict=True
        ):
            if steps:
                rolled += 1
                assert reference < 1e-4, check
                assert interpolated > max(1e-4, 100 * reference), check
        assert len(forwards) == max(check["offsets"]) + 1 <= MAX_OFFSET + 1
        assert not any(f.grad for f in forwards[:-1]) and forwards[-1].grad
        assert record["rollout/forwards"] == max(check["offsets"])
    assert rolled

    out = run / "output"
    with safe_open(str(out / LORA_FILE), "pt") as handle:
        file_keys = set(handle.keys())
    pipe: Any = getattr(diffusers, pipeline).from_pretrained(model)
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(out, adapter_name="rollout")
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing) keys", r.getMessage(), re.I)]
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="rollout")
    assert {f"transformer.{k}" for k in loaded} == file_keys
