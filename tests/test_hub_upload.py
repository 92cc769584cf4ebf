"""The Hugging Face Hub upload, run for real through huggingface_hub against a local stand-in for the
Hub (``HF_ENDPOINT``): the repository is created, every checkpoint goes up as it is saved
(``push_checkpoints_to_hub``, also in the background), the final upload follows them without the
checkpoint folders, and a Hub that fails checkpoint uploads never stops training."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stune.publish import files_to_upload
from stune.testing import run_cli

from .conftest import TOY_PATH
from .test_toy_family import toy_run


class HubStandIn:
    """The Hub calls an upload makes (create repo, preupload, commit), answering as the Hub does,
    with every file sent as a regular (base64) file; commits are kept in order."""

    def __init__(self, fail_commits_under: str | None = None) -> None:
        self.repos: list[dict[str, Any]] = []
        self.commits: list[dict[str, bytes]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._send(404, {"error": "not here"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/api/repos/create":
                    hub.repos.append(json.loads(body))
                    return self._send(200, {"url": f"{hub.url}/me/lora", "name": "me/lora"})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._send(200, {"files": modes})
                if self.path == "/api/validate-yaml":  # the model card's metadata
                    return self._send(200, {"errors": [], "warnings": []})
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {
                        v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"
                    }
                    if fail_commits_under and any(path.startswith(fail_commits_under) for path in files):
                        return self._send(403, {"error": "no write access to checkpoint folders"})
                    hub.commits.append(files)
                    return self._send(200, {"commitUrl": f"{hub.url}/me/lora/commit/{'a' * 40}", "commitOid": "a" * 40})
                self._send(404, {"error": "not here"})

            def _send(self, status: int, value: Any) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def environment(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": "hf_stand_in_token", "HF_HUB_OFFLINE": "0"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _train(folder: Path, toy_model: Path, hub: HubStandIn, **options: Any) -> Any:
    run = toy_run(
        folder, toy_model, max_train_steps=3, push_to_hub=True, hub_model_id="me/lora", model_card_private=False,
        validation_step_interval=0, **options,
    )  # fmt: skip
    return run_cli(["--plugin", str(TOY_PATH)], cwd=run, env=hub.environment())


@pytest.mark.parametrize("background", [False, True])
def test_checkpoints_go_up_as_they_are_saved_then_the_outputs(
    tmp_path: Path, toy_model: Path, background: bool
) -> None:
    hub = HubStandIn()
    try:
        done = _train(tmp_path, toy_model, hub, push_checkpoints_to_hub=True, push_to_hub_background=background)
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "output"
    assert hub.repos[0] == {"name": "lora", "organization": "me", "visibility": "public", "type": "model"}
    *checkpoints, final = hub.commits
    # one commit per checkpoint, in the order they were saved, each the folder as it was written
    assert [sorted({path.split("/")[0] for path in commit}) for commit in checkpoints] == [
        ["checkpoint-1"],
        ["checkpoint-2"],
        ["checkpoint-3"],
    ]
    for commit in checkpoints:
        for path, data in commit.items():
            assert (out / path).read_bytes() == data
    # then the outputs, without the checkpoints (already there) or the upload staging folders
    assert sorted(final) == files_to_upload(out, include_checkpoints=False)
    assert "pytorch_lora_weights.safetensors" in final and "README.md" in final
    assert not any(p.name.startswith(".upload-") for p in out.iterdir())


def test_a_hub_failing_checkpoint_uploads_never_stops_training(tmp_path: Path, toy_model: Path) -> None:
    hub = HubStandIn(fail_commits_under="checkpoint-")
    try:
        done = _train(tmp_path, toy_model, hub, push_checkpoints_to_hub=True, push_to_hub_background=True)
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not upload checkpoint-1 to the Hub repository me/lora" in done.stderr
    assert "checkpoints not on the Hub: checkpoint-1, checkpoint-2, checkpoint-3" in done.stderr  # after a retry
    [final] = hub.commits  # the outputs still went up
    assert "pytorch_lora_weights.safetensors" in final
    assert all((tmp_path / "output" / f"checkpoint-{step}").is_dir() for step in (1, 2, 3))


def test_without_push_checkpoints_to_hub_only_the_outputs_go_up(tmp_path: Path, toy_model: Path) -> None:
    hub = HubStandIn()
    try:
        done = _train(tmp_path, toy_model, hub)
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    [final] = hub.commits
    assert sorted(final) == files_to_upload(tmp_path / "output", include_checkpoints=False)
    assert not any(path.startswith("checkpoint-") for path in final)
