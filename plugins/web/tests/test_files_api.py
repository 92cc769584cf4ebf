"""The configure API: forms from the option registry, and config.json / multidatabackend.json /
lycoris_config.json read and written as the CLI reads them, keys kept (in-process, no training)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

import stune
import stune_flux
from stune.config import read_config_file
from stune.options import Field
from stune.plugins import PluginHost
from stune.project import LYCORIS_PRESETS
from stune.testing import offline_env, venv_with_only
from stune_web.app import create_app

REPO = Path(__file__).resolve().parents[3]
SEEDS = REPO / "tests" / "seeds"


class ExtraOptions(stune.Options):
    web_test_knob: int = Field(3, ge=1, description="A knob only the test plugin has.")


class ExtraPlugin:
    """A plugin written in the test: one option."""

    @stune.hookimpl
    def register_options(self, register: Any) -> None:
        register(ExtraOptions)


def client(project: Path, *plugins: object, installed: list[str] | None = None, **kwargs: Any) -> TestClient:
    """The app over ``project`` with only the FLUX family (or the ``installed`` plugins named) and ``plugins``."""
    if installed is not None:
        host = PluginHost.build(installed)
    else:
        host = PluginHost.build(plugins=[stune_flux, *plugins], entry_points=False)
    return TestClient(create_app(project, host, **kwargs))


def options_of(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["key"]: o for group in schema["groups"] for o in group["options"]}


def test_the_form_has_a_plugins_options_only_when_it_is_loaded(tmp_path: Path) -> None:
    with_plugin = client(tmp_path, ExtraPlugin()).get("/api/schema").json()
    without = client(tmp_path).get("/api/schema").json()
    knob = options_of(with_plugin)["web_test_knob"]
    assert knob == {
        "key": "web_test_knob",
        "plugin": "ExtraPlugin",
        "kind": "int",
        "type": "int",
        "nullable": False,
        "required": False,
        "default": 3,
        "help": "A knob only the test plugin has.",
        "limits": {"ge": 1},
    }
    assert "web_test_knob" not in options_of(without)
    assert [g["id"] for g in with_plugin["groups"]][-1] == "plugin-ExtraPlugin"
    # Every core option is there, grouped by area; the family plugin's too, with its flavours.
    core = options_of(without)
    assert core["mixed_precision"]["choices"] == ["no", "bf16", "fp16"]
    assert core["model_family"]["choices"] == ["flux"]
    assert core["learning_rate"]["kind"] == "float" and core["learning_rate"]["limits"] == {"gt": 0}
    assert core["flux_lora_target"]["plugin"] == "stune_flux"
    assert {g["id"] for g in without["groups"]} >= {"model", "adapter", "data", "training", "optim", "validation"}
    (flux,) = without["families"]
    assert flux["flavours"]["dev"] == "black-forest-labs/FLUX.1-dev" and flux["default_flavour"]
    dataset = {o["key"]: o for o in without["dataset"]["options"]}
    assert dataset["caption_strategy"]["choices"] == ["filename", "textfile", "instanceprompt", "parquet"]
    assert without["lycoris_presets"] == LYCORIS_PRESETS


def test_the_schema_follows_the_installed_distributions(tmp_path: Path) -> None:
    """In an environment where only stune and stune-web are installed, no family option shows;
    this environment (stune-flux installed) shows them."""
    python = venv_with_only(tmp_path / "venv", [REPO / "core", REPO / "plugins" / "web"])
    probe = (
        "import json; from stune.plugins import PluginHost; from stune_web.schema import form_schema; "
        "s = form_schema(PluginHost.build()); "
        "print(json.dumps([o['key'] for g in s['groups'] for o in g['options']] + [f['name'] for f in s['families']]))"
    )
    bare = json.loads(
        subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, env=offline_env()).stdout
    )
    here = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=offline_env()
        ).stdout
    )
    assert "learning_rate" in bare and "flux_lora_target" not in bare and "flux" not in bare
    assert "flux_lora_target" in here and "flux" in here


def test_a_simpletuner_config_keeps_every_key_spelling_and_value_but_the_changed_one(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    path = config_dir / "config.json"
    original = json.loads((SEEDS / "config-000-1.json").read_text())
    written = {"--" + k if i % 3 == 0 else k: v for i, (k, v) in enumerate(original.items())}  # SimpleTuner's `--key`
    written["some_future_simpletuner_key"] = [1, 2]
    path.write_text(json.dumps(written, indent=4) + "\n")
    before = path.read_bytes()
    # Without the quant plugin loaded, its keys are unknown here: kept, with the CLI's reason.
    api = client(tmp_path, installed=["flux", "hidream"])
    got = api.get("/api/config").json()
    assert got["written"] == written
    assert got["values"]["learning_rate"] == "4e-5" and got["values"]["model_family"] == "hidream"
    quant = {"base_model_precision", "text_encoder_3_precision", "text_encoder_4_precision"}
    rescale = next(k for k in written if k.lstrip("-") == "validation_guidance_rescale")
    assert {k.lstrip("-") for k in got["unknown"]} == {
        *quant,
        "some_future_simpletuner_key",
        "validation_guidance_rescale",
    }
    assert all("stune-quant" in why for k, why in got["unknown"].items() if k.lstrip("-") in quant)
    assert "Unknown option" in got["unknown"]["some_future_simpletuner_key"]
    assert got["unknown"][rescale].startswith("SimpleTuner option, differently in stune: validation images are ")

    # Saving nothing leaves the file byte for byte as it was.
    assert api.put("/api/config", json={"set": {}, "unset": []}).status_code == 200
    assert path.read_bytes() == before

    # One change: that value changes, in its place and spelling; every other key stays.
    saved = api.put("/api/config", json={"set": {"learning_rate": 1e-4, "validation_seed": 7}})
    assert saved.status_code == 200, saved.text
    after = json.loads(path.read_text())
    assert list(after) == list(written)
    changed = {k for k in written if after[k] != written[k] or type(after[k]) is not type(written[k])}
    learning_rate_key = next(k for k in written if k.lstrip("-") == "learning_rate")
    seed_key = next(k for k in written if k.lstrip("-") == "validation_seed")
    assert changed == {learning_rate_key, seed_key}
    assert after[learning_rate_key] == 1e-4 and after[seed_key] == 7
    # The rest of the file is as it was, line for line (same indentation).
    old_lines, new_lines = before.decode().splitlines(), path.read_text().splitlines()
    assert len(old_lines) == len(new_lines)
    assert [i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b] == [
        i for i, line in enumerate(old_lines) if f'"{learning_rate_key}"' in line or f'"{seed_key}"' in line
    ]
    # What the CLI reads is what was saved; the page reads it back the same.
    cli = read_config_file(path)
    assert cli == {**{k.lstrip("-"): v for k, v in written.items()}, "learning_rate": 1e-4, "validation_seed": 7}
    again = api.get("/api/config").json()
    assert again["written"] == after
    saved_bytes = path.read_bytes()
    assert api.put("/api/config", json={"set": {"learning_rate": 1e-4}}).status_code == 200
    assert path.read_bytes() == saved_bytes  # the same value again: not rewritten


def test_a_new_config_round_trips_through_the_cli_reader(tmp_path: Path) -> None:
    api = client(tmp_path)
    sent = {
        "model_family": "flux",
        "model_flavour": "dev",
        "learning_rate": 0.0003,
        "lora_rank": 8,
        "gradient_checkpointing": False,
        "validation_resolution": "512x512,768x512",
        "peft_lora_target_modules": ["to_q", "to_k"],
        "validation_prompt": "ein Foto, 写真",
    }
    response = api.put("/api/config", json={"set": sent})
    assert response.status_code == 200, response.text
    path = tmp_path / "config" / "config.json"
    assert read_config_file(path) == sent
    assert list(json.loads(path.read_text())) == list(sent)
    assert response.json()["values"] == sent
    # A key equal to its default is kept, never pruned (SimpleTuner's WebUI dropped train_batch_size).
    assert api.put("/api/config", json={"set": {"train_batch_size": 1}}).status_code == 200
    assert read_config_file(path)["train_batch_size"] == 1
    # The user removes a key explicitly.
    assert api.put("/api/config", json={"unset": ["lora_rank"]}).status_code == 200
    assert "lora_rank" not in read_config_file(path)


def test_the_loader_refuses_and_nothing_is_written(tmp_path: Path) -> None:
    api = client(tmp_path)
    assert api.put("/api/config", json={"set": {"learning_rate": 1e-4}}).status_code == 200
    path = tmp_path / "config" / "config.json"
    before = path.read_bytes()
    bad = api.put("/api/config", json={"set": {"learning_rate": "fast"}})
    assert bad.status_code == 400 and bad.json()["key"] == "learning_rate"
    assert "learning_rate" in bad.json()["error"]
    typo = api.put("/api/config", json={"set": {"learnin_rate": 1}})
    assert typo.status_code == 400 and "did you mean `learning_rate`" in typo.json()["error"]
    combo = api.put("/api/config", json={"set": {"use_dora": True, "lora_type": "lycoris"}})
    assert combo.status_code == 400 and "use_dora" in combo.json()["error"]
    missing = api.put("/api/config", json={"set": {"model_family": "hidream"}})
    assert missing.status_code == 400  # its plugin is not loaded in this host
    assert path.read_bytes() == before


def test_the_dataset_list_is_edited_as_a_list_with_its_keys(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    path = config_dir / "multidatabackend.json"
    shutil.copy(SEEDS / "multidatabackend-flux.json", path)
    seeds = json.loads(path.read_text())
    before = path.read_bytes()
    api = client(tmp_path)
    got = api.get("/api/datasets").json()
    assert got["path"] == "config/multidatabackend.json" and got["datasets"] == seeds
    assert api.put("/api/datasets", json={"datasets": seeds}).status_code == 200
    assert path.read_bytes() == before  # unchanged: not rewritten
    edited = [dict(d) for d in seeds]
    edited[0]["repeats"] = 2
    edited.append({"id": "more", "type": "local", "instance_data_dir": "datasets/more", "caption_strategy": "textfile"})
    assert api.put("/api/datasets", json={"datasets": edited}).status_code == 200
    assert json.loads(path.read_text()) == edited
    bad = api.put("/api/datasets", json={"datasets": [*edited, {"id": "x", "type": "local", "resolution": 64}]})
    assert bad.status_code == 400 and bad.json()["index"] == len(edited) and "instance_data_dir" in bad.json()["error"]
    twice = api.put("/api/datasets", json={"datasets": [*edited, edited[-1]]})
    assert twice.status_code == 400 and "appears twice" in twice.json()["error"]
    typo = api.put("/api/datasets", json={"datasets": [{**edited[-1], "repeat": 1}]})
    assert typo.status_code == 400 and "did you mean `repeats`" in typo.json()["error"]
    # A key the file already had that stune does not know is kept, not refused.
    path.write_text(json.dumps([{**edited[-1], "cache_file_suffix": "x"}]))
    kept = api.get("/api/datasets").json()
    assert kept["problems"] and "cache_file_suffix" in kept["problems"][0]["message"]
    entry = {**kept["datasets"][0], "repeats": 3}
    assert api.put("/api/datasets", json={"datasets": [entry]}).status_code == 200
    assert json.loads(path.read_text()) == [entry]


def test_the_lycoris_config_starts_from_a_seed_preset(tmp_path: Path) -> None:
    api = client(tmp_path)
    assert api.get("/api/lycoris").json()["exists"] is False
    preset = LYCORIS_PRESETS["lokr-attention"]["settings"]
    saved = api.put("/api/lycoris", json={"settings": preset})
    assert saved.status_code == 200, saved.text
    assert json.loads((tmp_path / "config" / "lycoris_config.json").read_text()) == preset
    vocabulary = api.get("/api/lycoris/algorithms").json()
    assert "lokr" in vocabulary["algorithms"] and "module_algo_map" in vocabulary["preset_keys"]
    bad = api.put("/api/lycoris", json={"settings": {**preset, "algo": "lokrr"}})
    assert bad.status_code == 400 and "lokrr" in bad.json()["error"]
    typo = api.put("/api/lycoris", json={"settings": {**preset, "apply_preset": {"target_modules": ["Attention"]}}})
    assert typo.status_code == 400 and "target_modules" in typo.json()["error"]
    # The config's lycoris_config decides which file is edited.
    assert api.put("/api/config", json={"set": {"lycoris_config": "config/lokr.json"}}).status_code == 200
    assert api.put("/api/lycoris", json={"settings": preset}).status_code == 200
    assert (tmp_path / "config" / "lokr.json").is_file()


@pytest.mark.parametrize("exposed", [True, False])
def test_requests_without_the_token_are_refused_when_exposed(tmp_path: Path, exposed: bool) -> None:
    token = "s3cret-token" if exposed else None
    remote = client(tmp_path, token=token, allowed_hosts=None if exposed else {"localhost", "127.0.0.1"})
    remote.client = ("203.0.113.9", 50123)  # type: ignore[attr-defined]
    if exposed:
        for path in ("/", "/api/config", "/api/events", "/static/app.js"):
            refused = remote.get(path, headers={"host": "trainer.example:8001"})
            assert refused.status_code == 401, path
            assert "token" in refused.json()["error"]
        assert remote.get("/api/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert remote.get("/api/config", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert remote.get("/api/config", headers={"X-Stune-Token": token}).status_code == 200
        page = remote.get(f"/?token={token}")
        assert page.status_code == 200 and "stune_token" in page.headers["set-cookie"]
        assert remote.get("/api/config").status_code == 200  # the cookie the link set
    else:
        # A loopback server answers localhost names only (DNS rebinding), without a token.
        assert remote.get("/api/config", headers={"host": "localhost:8001"}).status_code == 200
        assert remote.get("/api/config", headers={"host": "attacker.example"}).status_code == 403
        # Another site open in the browser cannot write.
        other = remote.put(
            "/api/config",
            json={"set": {"learning_rate": 1}},
            headers={"host": "localhost", "origin": "http://evil.example"},
        )
        assert other.status_code == 403
        form = remote.put("/api/config", content="x", headers={"host": "localhost", "content-type": "text/plain"})
        assert form.status_code == 415
        assert not (tmp_path / "config" / "config.json").exists()
