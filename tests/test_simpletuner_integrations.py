"""SimpleTuner integrations on the toy family: webhooks (webhook_config, webhook_reporting_interval)
and CLIP-score evaluation (evaluation_type, pretrained_evaluation_model_name_or_path)."""

from __future__ import annotations

import base64
import http.server
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stune
import stune.session
import stune.train
from stune.errors import ConfigError
from stune.plugins import PluginHost

from .conftest import load_toy
from .test_toy_family import toy_run

toy = load_toy()


class Hook(http.server.BaseHTTPRequestHandler):
    """A webhook endpoint: records JSON bodies; ``mode`` 500 fails every post, ``hang`` never answers."""

    received: list[dict[str, Any]]
    mode = "ok"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.mode == "hang":
            threading.Event().wait(30)
            return
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        self.received.append({"type": self.headers["Content-Type"], "body": body})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def serve(mode: str) -> tuple[http.server.ThreadingHTTPServer, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []
    handler = type("H", (Hook,), {"received": received, "mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    server, received = serve("ok")
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def train_toy(run_dir: Path, *plugins: object) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        host = PluginHost.build(plugins=[toy, *plugins], entry_points=False)
        return stune.train.train(stune.session.prepare(None, None, None, host=host))


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A 2-step toy run posting to a local raw endpoint, with a progress message every step."""
    server, received = serve("ok")
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    hooks = [{"webhook_url": url, "webhook_type": "raw", "message_prefix": "[toy]"}]
    run = toy_run(tmp_path_factory.mktemp("webhooks"), toy_model, webhook_config=hooks, webhook_reporting_interval=1)
    train_toy(run)
    server.shutdown()
    return run, [json.loads(r["body"]) for r in received]


def test_webhook_config_delivers_start_validation_checkpoints_and_end(
    delivered: tuple[Path, list[dict[str, Any]]],
) -> None:
    run, messages = delivered
    events = [m["event"] for m in messages]
    assert events[0] == "train_start" and events[-1] == "train_end"
    assert "checkpoint" in events
    validations = [m for m in messages if m["event"] == "validation"]
    assert [m["step"] for m in validations] == [1, 2]
    png = base64.b64decode(validations[0]["images"][0]["png_base64"])
    assert png.startswith(b"\x89PNG")
    assert all(m["message"].startswith("[toy] ") for m in messages)  # message_prefix
    assert "clip_score" not in (run / "output" / "metrics.jsonl").read_text()  # evaluation_type none


def test_webhook_reporting_interval_sends_progress(delivered: tuple[Path, list[dict[str, Any]]]) -> None:
    progress = [m for m in delivered[1] if m["event"] == "progress"]
    assert [m["step"] for m in progress] == [1, 2]  # every step
    assert all(math.isfinite(m["metrics"]["loss"]) and m["message"].startswith("[toy] step") for m in progress)


def test_webhook_config_discord_multipart_and_a_json_file(
    tmp_path: Path, toy_model: Path, endpoint: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = endpoint
    config_file = tmp_path / "webhooks.json"
    config_file.write_text(json.dumps({"webhook_url": url, "webhook_type": "discord", "log_level": "info"}))
    train_toy(toy_run(tmp_path / "run", toy_model, webhook_config=str(config_file), max_train_steps=1))
    texts = [json.loads(r["body"])["content"] for r in received if r["type"] == "application/json"]
    assert texts[0].startswith("training started") and texts[-1].startswith("training finished")
    uploads = [r for r in received if r["type"].startswith("multipart/form-data")]
    assert uploads and b'name="files[0]"' in uploads[0]["body"] and b"\x89PNG" in uploads[0]["body"]


@pytest.mark.parametrize("mode", ["down", "500", "hang"])
def test_webhook_config_dead_endpoint_never_stops_training(tmp_path: Path, toy_model: Path, mode: str) -> None:
    import time

    if mode == "down":
        server, _ = serve("ok")
        port = server.server_address[1]
        server.shutdown()
        server.server_close()
    else:
        server, _ = serve(mode)
        port = server.server_address[1]
    hooks = {"webhook_url": f"http://127.0.0.1:{port}/", "timeout": 0.5, "retries": 1}
    started = time.monotonic()
    result = train_toy(
        toy_run(tmp_path, toy_model, webhook_config=hooks, webhook_reporting_interval=1, max_train_steps=1)
    )
    assert result.final_step == 1 and result.adapter_files
    # The close waits at most 10 s for the queue; training itself never waited on the endpoint.
    assert time.monotonic() - started < 60
    if mode != "down":
        server.shutdown()


class StopAfterFirstStep:
    """Sends the process SIGTERM after step 1, as a scheduler stopping the job would."""

    __name__ = "stop_after_first_step"

    @stune.hookimpl
    def on_step_end(self, state: Any) -> None:
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_stopped_run_posts_interrupted_with_the_checkpoint(
    tmp_path: Path, toy_model: Path, endpoint: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = endpoint
    run = toy_run(tmp_path, toy_model, webhook_config={"webhook_url": url}, max_train_steps=3, validation_disable=True)
    result = train_toy(run, StopAfterFirstStep())
    assert result.interrupted == signal.SIGTERM and result.final_step == 1
    events = [json.loads(r["body"]) for r in received]
    # checkpoint-1 was due at step 1 anyway: the stop does not write it a second time
    assert [e["event"] for e in events] == ["train_start", "checkpoint", "interrupted"]
    last = events[-1]
    assert last["level"] == "warning" and last["step"] == 1
    assert last["message"] == (
        "training interrupted by SIGTERM at step 1 of 3; checkpoint-1 saved, resume_from_checkpoint=latest continues"
    )


def test_webhook_config_mistakes_are_config_errors(tmp_path: Path, toy_model: Path) -> None:
    for bad, words in [
        ({"webhook_url": "ftp://x"}, "webhook_url"),
        ({"webhook_url": "http://x", "webhook_type": "slack"}, "webhook_type"),
        (str(tmp_path / "missing.json"), "does not exist"),
    ]:
        run = toy_run(tmp_path / words.replace(" ", "_"), toy_model, webhook_config=bad)
        with pytest.MonkeyPatch.context() as mp, pytest.raises(ConfigError, match=words):
            mp.chdir(run)
            stune.session.prepare(None, None, None, host=PluginHost.build(plugins=[toy], entry_points=False))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (model, tokenizer trained on the fly, image processor) saved to a folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    corpus = ["a picture number 1", "a picture number 2", "a red circle", "a photo of a cat"] * 8
    tokenizer = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 77}
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text |= {"pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_evaluation_type_clip_scores_every_validation(tmp_path: Path, toy_model: Path, tiny_clip: Path) -> None:
    run = toy_run(
        tmp_path,
        toy_model,
        evaluation_type="clip",
        pretrained_evaluation_model_name_or_path=str(tiny_clip),
        report_to="tensorboard",
    )
    train_toy(run)
    records = [json.loads(line) for line in (run / "output" / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in records if "eval/clip_score" in r]
    assert [r["step"] for r in scores] == [1, 2]  # validation_step_interval 1, and the final one at step 2
    for record in scores:
        assert math.isfinite(record["eval/clip_score"]) and 0 <= record["eval/clip_score"] <= 100
        assert record["eval/clip_score/validation"] == record["eval/clip_score"]  # one prompt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "output" / "logs").iterdir())))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/clip_score")] == [1, 2]


def test_pretrained_evaluation_model_name_or_path_missing_is_a_user_error(
    tmp_path: Path, toy_model: Path, endpoint: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = endpoint
    bad = toy_run(
        tmp_path / "bad",
        toy_model,
        evaluation_type="clip",
        pretrained_evaluation_model_name_or_path="/nonexistent",
        max_train_steps=1,
        webhook_config={"webhook_url": url},
    )
    with pytest.raises(stune.UserError, match="pretrained_evaluation_model_name_or_path"):
        train_toy(bad)
    # The webhooks hear about the error (delivered before train() re-raises it, within the close wait).
    errors = [m for m in (json.loads(r["body"]) for r in received) if m["event"] == "error"]
    assert len(errors) == 1 and errors[0]["level"] == "error" and "pretrained_evaluation" in errors[0]["message"]


def test_lora_format_comfyui_on_any_family_resumes_exactly(tmp_path: Path, toy_model: Path) -> None:
    """The generic layout (ModelFamily.comfyui_lora_key: ``transformer.<module>``) on a third-party
    family: kohya keys with the alpha per module, read back on resume."""
    import torch
    from safetensors.torch import load_file

    options = {"lora_format": "comfyui", "lora_rank": 4, "lora_alpha": 8, "validation_step_interval": 0}
    finals = {}
    for name, stops in (("whole", [2]), ("split", [1, 2])):
        run = toy_run(tmp_path / name, toy_model, **options)
        for stop in stops:
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(run)
                host = PluginHost.build(plugins=[toy], entry_points=False)
                stune.train.train(stune.session.prepare(None, None, {"max_train_steps": str(stop)}, host=host))
        finals[name] = load_file(str(run / "output" / "pytorch_lora_weights.safetensors"))
    weights = finals["whole"]
    modules = {k.rsplit(".", 2)[0] for k in weights if k.endswith(".lora_down.weight")}
    assert modules and all(m.startswith("transformer.") for m in modules)
    assert set(weights) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {float(weights[f"{m}.alpha"]) for m in modules} == {8.0}
    assert all(torch.equal(weights[k], finals["split"][k]) for k in weights)
