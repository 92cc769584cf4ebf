"""Devices: the seed's Auto / Manual / Disabled modes as CUDA_VISIBLE_DEVICES and a process count,
the CPU where there is no GPU; what the run page starts with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stune.errors import UserError
from stune_web.devices import placement

from .conftest import finished

GPUS = [{"index": i, "name": "GPU", "memory_mb": 81920} for i in range(4)]


def test_each_mode_becomes_visible_devices_and_processes() -> None:
    auto = placement("auto", GPUS)
    assert (auto.processes, auto.env) == (4, {})  # every GPU, one process each
    manual = placement("manual", GPUS, [1, 3])
    assert (manual.processes, manual.env) == (2, {"CUDA_VISIBLE_DEVICES": "1,3"})
    fewer = placement("manual", GPUS, [0, 1, 2], processes=2)
    assert (fewer.processes, fewer.env) == (2, {"CUDA_VISIBLE_DEVICES": "0,1,2"})
    one = placement("disabled", GPUS, [2])
    assert (one.processes, one.env) == (1, {"CUDA_VISIBLE_DEVICES": "2"})
    first = placement("disabled", GPUS)
    assert first.env == {"CUDA_VISIBLE_DEVICES": "0"}
    cpu_here = placement("cpu", GPUS)
    assert (cpu_here.processes, cpu_here.env) == (1, {"CUDA_VISIBLE_DEVICES": ""})  # GPUs hidden
    cpu = placement("cpu", [], processes=2)
    assert (cpu.processes, cpu.env) == (2, {})


@pytest.mark.parametrize(
    ("mode", "gpus", "chosen", "processes", "message"),
    [
        ("auto", [], None, None, "No GPU was detected"),
        ("manual", GPUS, [], None, "at least one GPU"),
        ("manual", GPUS, [7], None, "GPU 7 is not among"),
        ("manual", GPUS, [0], 2, "2 processes need 2 GPUs"),
        ("cpu", [], None, 0, "1 or more"),
        ("fast", GPUS, None, None, "Unknown device mode"),
    ],
)
def test_impossible_choices_are_one_sentence(
    mode: str, gpus: list[dict[str, Any]], chosen: list[int] | None, processes: int | None, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        placement(mode, gpus, chosen, processes)


def test_the_run_page_starts_st_train_with_the_devices_and_shows_why_it_stopped(
    tmp_path: Path, start_server: Any
) -> None:
    server = start_server(tmp_path)
    api = server.client
    detected = api.get("/api/devices").json()
    assert detected["gpus"] == [] and detected["modes"] == ["auto", "manual", "disabled", "cpu"]
    refused = api.post("/api/run", json={"devices": {"mode": "auto"}})
    assert refused.status_code == 400 and "No GPU was detected" in refused.json()["error"]
    # A config st-train refuses at once: the page gets its sentence.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text('{"model_family": "nosuchfamily"}')
    started = api.post("/api/run", json={"devices": {"mode": "cpu", "processes": 2}, "extra": "--seed=3"})
    assert started.status_code == 200, started.text
    assert started.json()["run"]["command"][3:] == ["train", "--num_processes=2", "--seed=3"]
    statuses = [e["data"] for e in server.events(until=finished, timeout=120) if e["event"] == "status"]
    assert statuses[-1]["state"] == "failed" and statuses[-1]["returncode"] == 2
    assert "Unknown model_family `nosuchfamily`" in statuses[-1]["error"]
    bad = api.post("/api/run", json={"extra": "seed=3"})
    assert bad.status_code == 400 and "--key=value" in bad.json()["error"]
