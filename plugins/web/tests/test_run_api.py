"""A tiny FLUX run through the API of a real `st-train server`: configured and checked from the API,
started, its progress events in order, stopped mid-run (SIGINT: a checkpoint), resumed to the end
(followed by a second server: the run outlives the one that started it)."""

from __future__ import annotations

import json
from pathlib import Path

from stune.config import read_config_file

from .conftest import IMAGES, finished, stop_children, tiny_dataset, tiny_flux_config


def test_a_run_configured_started_stopped_and_resumed_from_the_api(
    tmp_path: Path, tiny_flux_dir: Path, shared: dict[str, Path], start_server: object
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    server = start_server(project)  # type: ignore[operator]
    api = server.client
    try:
        # -- configure: the files the CLI reads ------------------------------------------------------
        config = tiny_flux_config(tiny_flux_dir, shared, max_train_steps=200, checkpoint_step_interval=0)
        saved = api.put("/api/config", json={"set": config})
        assert saved.status_code == 200, saved.text
        assert read_config_file(project / "config" / "config.json") == config  # what the CLI reads
        assert api.put("/api/datasets", json={"datasets": [tiny_dataset(shared)]}).status_code == 200
        check = api.post("/api/check", json={}).json()
        assert check["ok"], check
        (report,) = check["report"]["datasets"]
        assert report["used"] == IMAGES and report["buckets"] == {"64x64": IMAGES}

        # -- start, watch, stop mid-run ---------------------------------------------------------------
        started = api.post("/api/run", json={"devices": {"mode": "cpu"}})
        assert started.status_code == 200, started.text
        assert started.json()["run"]["command"][3:5] == ["train", "--num_processes=1"]
        assert api.post("/api/run", json={}).status_code == 409  # one run at a time per project
        steps: list[int] = []
        stopping = False
        states = []
        for event in server.events(until=finished):
            if event["event"] == "status":
                states.append(event["data"]["state"])
            if event["event"] == "progress":
                steps.append(event["data"]["step"])
                assert event["data"]["max_steps"] == 200 and event["data"]["loss"] > 0
                if event["data"]["step"] >= 2 and not stopping:
                    stopping = True
                    assert api.post("/api/run/stop", json={}).status_code == 200
        final = api.get("/api/run").json()["run"]
        assert final["state"] == "stopped" and final["returncode"] == 130, final
        assert states[0] == "starting" and "running" in states and "stopping" in states
        stopped_at = steps[-1]
        assert steps == list(range(1, stopped_at + 1))  # every step, once, in order
        assert 2 <= stopped_at < 200
        checkpoint = project / "output" / f"checkpoint-{stopped_at}"
        assert (checkpoint / "checkpoint_complete.json").is_file()

        # -- resume: it goes on from the checkpoint to the (new) end; a restarted server picks it up -------
        end = stopped_at + 3
        resumed = api.post("/api/run", json={"resume": "latest", "extra": f"--max_train_steps={end}"})
        assert resumed.status_code == 200, resumed.text
        assert "--resume_from_checkpoint=latest" in resumed.json()["run"]["command"]
        server.close()  # the run goes on: it writes to its log file, not to the server
        server = start_server(project)  # type: ignore[operator]
        api = server.client
        assert api.get("/api/run").json()["run"]["pid"] == resumed.json()["run"]["pid"]
        more = [e["data"]["step"] for e in server.events(until=finished) if e["event"] == "progress"]
        assert more == list(range(stopped_at + 1, end + 1))
        final = api.get("/api/run").json()["run"]
        assert final["state"] == "finished", final
        metrics = [json.loads(line) for line in (project / "output" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics if "loss" in r] == list(range(1, end + 1))
        assert (project / "output" / "pytorch_lora_weights.safetensors").is_file()
        log = (project / "output" / "train.log").read_text()
        assert f"from step {stopped_at}" in log

        # -- outputs: the run, its adapter, checkpoint and curves --------------------------------------
        details = api.get("/api/runs/details", params={"run": "output"}).json()
        assert details["status"] == "finished" and details["steps"] == end
        assert any(f["name"] == "pytorch_lora_weights.safetensors" for f in details["adapter"])
        assert f"checkpoint-{stopped_at}" in [c["name"] for c in details["checkpoints"]]
        assert "load_lora_weights" in details["loading_example"]
        download = api.get(
            "/api/runs/file", params={"run": "output", "path": "pytorch_lora_weights.safetensors", "download": 1}
        )
        assert download.status_code == 200
        assert download.content == (project / "output" / "pytorch_lora_weights.safetensors").read_bytes()
        assert "attachment" in download.headers["content-disposition"]
        outside = api.get("/api/runs/file", params={"run": "output", "path": "../config/config.json"})
        assert outside.status_code == 404  # nothing outside the run folder is served
        charts = api.get("/api/runs/charts", params={"run": "output"}).json()["charts"]
        assert len(charts) == 3 and all("<polyline" in c for c in charts)

        # -- several runs compared: one line per run -----------------------------------------------------
        other = project / "runs" / "lower-lr"
        other.mkdir(parents=True)
        (other / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) + "\n" for s in range(1, 6))
        )
        listed = {r["id"]: r for r in api.get("/api/runs").json()["runs"]}
        assert listed["output"]["steps"] == end and listed["runs/lower-lr"]["steps"] == 5
        svg = api.get("/api/compare", params=[("run", "output"), ("run", "runs/lower-lr"), ("metric", "loss")])
        assert svg.status_code == 200
        assert svg.json()["svg"].count("<polyline") == 2 and "runs/lower-lr" in svg.json()["svg"]
        assert api.get("/api/compare", params={"run": "elsewhere"}).status_code == 404
    finally:
        stop_children(project)
