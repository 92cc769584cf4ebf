"""The publishing seam as a third party uses it: a provider defined here, registered through
``register_publishers``, checked with the config and handed the run's files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

import stune
from stune.errors import ConfigError, UserError
from stune.plugins import PluginHost
from stune.publishing import Publisher, PublisherSettings, UploadFile, build_publishers, publish_outputs


class FolderSettings(PublisherSettings):
    root: str


class Folder(Publisher):
    """Copies the run into a local folder (a stand-in for a network drive)."""

    name = "folder"
    aliases = ("dir",)
    Settings: ClassVar[type[PublisherSettings]] = FolderSettings

    def check(self) -> None:
        if not Path(self.settings.root).is_dir():  # type: ignore[attr-defined]
            raise ConfigError(f"publishing_config provider `folder`: {self.settings.root} is not a folder.")  # type: ignore[attr-defined]

    def upload(self, files: list[UploadFile], folder: str, advance: Callable[[int], None]) -> str:
        root = Path(self.settings.root)  # type: ignore[attr-defined]
        for file in files:
            target = root / file.remote
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file.local, target)
            advance(file.size)
        return (root / folder).as_uri() + "/"


class FolderPlugin:
    __name__ = "folder_publisher"

    @stune.hookimpl
    def register_publishers(self, register: Any) -> None:
        register(Folder)


def _output(tmp_path: Path) -> Path:
    out = tmp_path / "my-run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "state.safetensors").write_bytes(b"state")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (out / "validation_images").mkdir()
    (out / "validation_images" / "step-2-a.png").write_bytes(b"png")
    (out / ".checkpoint-4.tmp-1").mkdir()  # an unfinished checkpoint: never published
    (out / ".checkpoint-4.tmp-1" / "x").write_bytes(b"x")
    return out


def test_a_provider_of_a_plugin_defined_here_publishes_the_run(tmp_path: Path) -> None:
    host = PluginHost.build(plugins=[FolderPlugin()], entry_points=False)
    assert host.publishers == {"folder": Folder, "dir": Folder}
    remote = tmp_path / "remote"
    remote.mkdir()
    entries = [{"provider": "DIR", "root": str(remote), "base_path": "team/runs"}]
    published: list[str] = []
    [(publisher, uri)] = publish_outputs(
        build_publishers(entries, host), _output(tmp_path), lambda _p, uri: published.append(uri)
    )
    assert publisher.name == "folder" and published == [uri] == [(remote / "team/runs/my-run").as_uri() + "/"]
    got = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    assert got == [
        "team/runs/my-run/pytorch_lora_weights.safetensors",
        "team/runs/my-run/validation_images/step-2-a.png",
    ]

    with_checkpoints = [{**entries[0], "include_checkpoints": True, "base_path": ""}]
    publish_outputs(build_publishers(with_checkpoints, host), tmp_path / "my-run")
    assert (remote / "my-run" / "checkpoint-2" / "state.safetensors").read_bytes() == b"state"


def test_the_providers_own_check_and_keys_stop_the_config(tmp_path: Path) -> None:
    host = PluginHost.build(plugins=[FolderPlugin()], entry_points=False)
    with pytest.raises(ConfigError, match="is not a folder"):
        build_publishers({"provider": "folder", "root": str(tmp_path / "nowhere")}, host)
    with pytest.raises(ConfigError, match="provider `folder`: the key `root` is required"):
        build_publishers({"provider": "folder"}, host)
    with pytest.raises(ConfigError, match=r"provider `ftp` is unknown; installed providers: dir, folder\."):
        build_publishers({"provider": "ftp"}, host)


def test_a_failing_provider_does_not_stop_the_next_and_ends_in_one_sentence(tmp_path: Path) -> None:
    host = PluginHost.build(plugins=[FolderPlugin()], entry_points=False)
    remote = tmp_path / "remote"
    remote.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    publishers = build_publishers(
        [{"provider": "folder", "root": str(broken)}, {"provider": "folder", "root": str(remote)}], host
    )
    broken.rmdir()
    broken.write_text("a file where the folder was")  # the first upload fails (NotADirectoryError)
    with pytest.raises(UserError) as caught:
        publish_outputs(publishers, _output(tmp_path))
    message = str(caught.value)
    assert message.startswith("Publishing to folder (") and "\n" not in message
    assert message.endswith(
        f"the files remain in {tmp_path / 'my-run'}, fix publishing_config (or the network) and upload them again."
    )
    assert (remote / "my-run" / "pytorch_lora_weights.safetensors").is_file()
