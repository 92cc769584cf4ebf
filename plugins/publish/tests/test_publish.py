"""publishing_config: entries checked before anything loads, and a real run uploading its output_dir
to S3 (moto's server), Backblaze B2 (the same S3 API), Azure Blob Storage and Dropbox (local servers
speaking their REST APIs) through the vendors' SDKs, byte for byte; a failed upload ends in one
sentence and keeps every file on disk; credentials never reach training_config.json."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stune.errors import ConfigError
from stune.plugins import PluginHost
from stune.publish import files_to_upload
from stune.publishing import REDACTED, build_publishers, read_entries, shareable_values
from stune.testing import make_images, offline_env, run_cli, write_run

sys.path.insert(0, str(Path(__file__).parent))
from servers import AzureBlobServer, DropboxServer

S3_KEYS = {"access_key": "test-key-id", "secret_key": "test-secret-key", "region": "us-east-1"}
DROPBOX_TOKEN = "sl.test-token"
LORA = "pytorch_lora_weights.safetensors"


# -- entries are checked with the config ----------------------------------------------------------------


def test_every_mistake_in_an_entry_is_one_sentence_naming_it() -> None:
    host = PluginHost.build()
    s3 = {"provider": "s3", "bucket": "models"}
    cases: list[tuple[Any, str]] = [
        ({"bucket": "models"}, "has no provider"),
        ([{"provider": "gcs", "bucket": "x"}], "provider `gcs` is unknown; installed providers: azure, azure_blob"),
        ({"provider": "s3"}, "provider `s3`: the key `bucket` is required"),
        ({**s3, "bucket_name": "x"}, "provider `s3`: unknown key `bucket_name`"),
        ({**s3, "access_key": "id"}, "access_key and secret_key go together"),
        ({**s3, "base_path": "runs/../../etc"}, "base_path may not contain . or .. parts"),
        ({"provider": "backblaze_b2", "bucket": "b"}, "needs region (e.g. us-west-004) or endpoint_url"),
        ({"provider": "azure_blob", "connection_string": "x"}, "the key `container` is required"),
        ({"provider": "azure", "container": "c"}, "give connection_string, or account_url"),
        ({"provider": "dropbox"}, "give token (an access token), or refresh_token with app_key"),
        ({"provider": "dropbox", "token": "t", "chunk_size_mb": 500}, "`chunk_size_mb` Input should be less than"),
        ("[1, 2]", "entries must be JSON objects with a provider key"),
        ("{not json", "publishing_config is not valid JSON"),
        ("no/such/publishing.json", "publishing_config file no/such/publishing.json does not exist"),
    ]
    for value, expected in cases:
        with pytest.raises(ConfigError) as caught:
            build_publishers(value, host)
        message = str(caught.value)
        assert expected in message, (value, message)
        assert "\n" not in message and message.endswith(".")
        assert "publishing_config" in message


def test_a_provider_of_a_missing_plugin_names_the_package() -> None:
    bare = PluginHost.build(entry_points=False)
    with pytest.raises(ConfigError, match=r"provider `dropbox` comes with the `publish` plugin; install it with "):
        build_publishers({"provider": "dropbox", "token": "t"}, bare)


def test_values_may_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"provider": "dropbox", "token": "{env:STUNE_TEST_DROPBOX_TOKEN}", "base_path": "runs"}
    with pytest.raises(ConfigError, match=r"`token` reads the environment variable STUNE_TEST_DROPBOX_TOKEN, which "):
        build_publishers(entry, PluginHost.build())
    monkeypatch.setenv("STUNE_TEST_DROPBOX_TOKEN", "sl.from-the-environment")
    (publisher,) = build_publishers(entry, PluginHost.build())
    assert publisher.settings.token == "sl.from-the-environment"  # type: ignore[attr-defined]


def test_the_file_form_and_aliases_read_like_inline_json(tmp_path: Path) -> None:
    entries = [{"provider": "AZURE", "container": "c", "connection_string": "UseDevelopmentStorage=true"}]
    path = tmp_path / "publishing.json"
    path.write_text(json.dumps(entries))
    assert read_entries(str(path)) == read_entries(json.dumps(entries)) == entries
    (publisher,) = build_publishers(str(path), PluginHost.build())
    assert publisher.name == "azure_blob" and publisher.settings.provider == "azure_blob"


def test_credentials_are_redacted_from_what_is_shared() -> None:
    from stune.config import CoreOptions

    entries = [
        {"provider": "s3", "bucket": "b", **S3_KEYS},
        {"provider": "dropbox", "token": DROPBOX_TOKEN},
        {"provider": "azure_blob", "container": "c", "connection_string": "AccountKey=secret"},
    ]
    config = CoreOptions.model_validate(
        {"publishing_config": entries, "webhook_config": {"webhook_url": "https://discord.test/api/webhooks/1/abc"}}
    )
    shared = json.dumps(shareable_values(config))
    for secret in ("test-key-id", "test-secret-key", DROPBOX_TOKEN, "AccountKey=secret", "webhooks/1/abc"):
        assert secret not in shared
    values = shareable_values(config)
    assert values["publishing_config"][0] == {"provider": "s3", "bucket": "b", "access_key": REDACTED,
                                              "secret_key": REDACTED, "region": "us-east-1"}  # fmt: skip
    assert config.publishing_config == entries  # the run itself keeps them


# -- a real run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """moto's S3 server with two buckets, the Azure and Dropbox stand-ins; closed after the module."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    s3_server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3_server.start()
    endpoint = f"http://127.0.0.1:{s3_server.get_host_and_port()[1]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEYS["access_key"],
        aws_secret_access_key=S3_KEYS["secret_key"],
    )
    for bucket in ("models", "b2-models"):
        s3.create_bucket(Bucket=bucket)
    azure = AzureBlobServer()
    dropbox = DropboxServer(tmp_path_factory.mktemp("dropbox-tls"), DROPBOX_TOKEN)
    yield {"s3": s3, "endpoint": endpoint, "azure": azure, "dropbox": dropbox}
    azure.close()
    dropbox.close()
    s3_server.stop()


def _s3_objects(s3: Any, bucket: str) -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listing}


def _run(folder: Path, model: Path, publishing: list[dict[str, Any]], services: dict[str, Any], **extra: Any) -> Any:
    make_images(folder / "images", 4)
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(folder / "tiny-lora"),
        "resolution": 64,
        "train_batch_size": 2,
        "max_train_steps": 2,
        "checkpointing_steps": 1,
        "mixed_precision": "no",
        "tokenizer_max_length": 32,
        "validation_disable": True,
        "publishing_config": publishing,
        **extra,
    }
    dataset = {"id": "pictures", "type": "local", "instance_data_dir": str(folder / "images"),
               "caption_strategy": "textfile", "cache_dir_vae": str(folder / "cache")}  # fmt: skip
    write_run(folder, config, [dataset])
    env = {**services["dropbox"].environment(), "STUNE_TEST_DROPBOX_TOKEN": DROPBOX_TOKEN}
    return run_cli(["--plugin", "flux"], cwd=folder, env=env)


def test_a_run_publishes_its_outputs_to_every_provider(
    tmp_path: Path, tiny_flux_dir: Path, services: dict[str, Any]
) -> None:
    urls = tmp_path / "uploaded.txt"
    script = "import pathlib, sys; pathlib.Path(sys.argv[1]).open('a').write(sys.argv[2] + '\\n')"
    publishing = [
        {"provider": "s3", "bucket": "models", "endpoint_url": services["endpoint"], "base_path": "runs/2026",
         "include_checkpoints": True, **S3_KEYS},
        {"provider": "backblaze_b2", "bucket": "b2-models", "region": "us-west-004",
         "endpoint_url": services["endpoint"], **S3_KEYS},
        {"provider": "azure_blob", "connection_string": services["azure"].connection_string,
         "container": "stune", "base_path": "models/latest"},
        # a small chunk size sends the LoRA file through an upload session, as a large file would go
        {"provider": "dropbox", "token": "{env:STUNE_TEST_DROPBOX_TOKEN}", "base_path": "/SimpleTuner/runs",
         "chunk_size_mb": 0.004},
    ]  # fmt: skip
    done = _run(
        tmp_path,
        tiny_flux_dir,
        publishing,
        services,
        post_upload_script=shlex.join([sys.executable, "-c", script, str(urls), "{remote_checkpoint_path}"]),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "tiny-lora"
    finals = {name: (out / name).read_bytes() for name in files_to_upload(out, include_checkpoints=False)}
    everything = {name: (out / name).read_bytes() for name in files_to_upload(out, include_checkpoints=True)}
    assert LORA in finals and "README.md" in finals and "training_config.json" in finals
    assert any(name.startswith("checkpoint-2/") for name in everything)
    assert not any(name.startswith("checkpoint-") for name in finals)

    s3 = services["s3"]
    assert _s3_objects(s3, "models") == {f"runs/2026/tiny-lora/{k}": v for k, v in everything.items()}
    assert _s3_objects(s3, "b2-models") == {f"tiny-lora/{k}": v for k, v in finals.items()}
    azure = services["azure"]
    assert azure.containers["stune"] == {f"models/latest/tiny-lora/{k}": v for k, v in finals.items()}
    assert azure.content_types[("stune", "models/latest/tiny-lora/README.md")] == "text/markdown"
    dropbox = services["dropbox"]
    assert dropbox.files == {f"/SimpleTuner/runs/tiny-lora/{k}": v for k, v in finals.items()}
    assert f"/SimpleTuner/runs/tiny-lora/{LORA}" in dropbox.chunked

    # post_upload_script ran once per provider with the URI of the published folder
    uploaded = sorted(urls.read_text().split())
    assert uploaded == sorted(
        [
            "s3://models/runs/2026/tiny-lora/",
            "s3://b2-models/tiny-lora/",
            f"http://127.0.0.1:{azure.port}/devstoreaccount1/stune/models/latest/tiny-lora/",
            next(u for u in uploaded if u.startswith("https://www.dropbox.test/scl/fo/")),
        ]
    )
    published_config = json.loads(finals["training_config.json"])
    assert published_config["publishing_config"][0]["secret_key"] == REDACTED
    assert S3_KEYS["secret_key"].encode() not in b"".join(everything.values())
    assert DROPBOX_TOKEN.encode() not in b"".join(everything.values())


def test_a_failed_upload_keeps_the_files_and_says_so_in_one_sentence(
    tmp_path: Path, tiny_flux_dir: Path, services: dict[str, Any]
) -> None:
    publishing = [
        {"provider": "s3", "bucket": "no-such-bucket", "endpoint_url": services["endpoint"], **S3_KEYS},
        {"provider": "azure_blob", "connection_string": services["azure"].connection_string, "container": "after"},
    ]
    done = _run(tmp_path, tiny_flux_dir, publishing, services)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert last.startswith(
        "st-train: error: Publishing to s3 bucket no-such-bucket (NoSuchBucket: The specified bucket does not exist) "
        "failed;"
    ), last
    assert last.endswith(f"the files remain in {tmp_path / 'tiny-lora'}, fix publishing_config (or the network) "
                         "and upload them again.")  # fmt: skip
    assert (tmp_path / "tiny-lora" / LORA).is_file()
    # the other provider still received the run
    assert f"tiny-lora/{LORA}" in services["azure"].containers["after"]


def test_publishing_again_overwrites_and_finds_the_existing_dropbox_link(
    tmp_path: Path, services: dict[str, Any]
) -> None:
    """A second upload of the same run (a rerun of the same output_dir) replaces the files, and the
    URI is the folder's existing shared link, which Dropbox returns in its error for a second link."""
    out = tmp_path / "again"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "a.txt").write_text("first")
    script = (
        "import json, sys; from pathlib import Path; from stune.plugins import PluginHost;"
        "from stune.publishing import build_publishers, publish_outputs;"
        "entry = {'provider': 'dropbox', 'token': sys.argv[2], 'base_path': 'runs'};"
        "done = publish_outputs(build_publishers(entry, PluginHost.build()), Path(sys.argv[1]));"
        "print(json.dumps([uri for _, uri in done]))"
    )
    env = {**offline_env(services["dropbox"].environment()), "TQDM_DISABLE": "1"}
    uris = []
    for text in ("first", "second"):
        (out / "sub" / "a.txt").write_text(text)
        done = subprocess.run(
            [sys.executable, "-c", script, str(out), DROPBOX_TOKEN], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        uris += json.loads(done.stdout.strip().splitlines()[-1])
        assert services["dropbox"].files["/runs/again/sub/a.txt"] == text.encode()
    assert uris[0] == uris[1] and uris[0].startswith("https://www.dropbox.test/scl/fo/")


def test_st_train_check_stops_on_a_bad_entry(tmp_path: Path, tiny_flux_dir: Path, services: dict[str, Any]) -> None:
    make_images(tmp_path / "images", 4)
    config = {
        "model_family": "flux",
        "pretrained_model_name_or_path": str(tiny_flux_dir),
        "output_dir": "out",
        "publishing_config": [{"provider": "s3", "bucket": "models", "secret_key": "only-half"}],
    }
    write_run(tmp_path, config, [{"id": "p", "type": "local", "instance_data_dir": str(tmp_path / "images")}])
    done = run_cli(["check", "--plugin", "flux"], cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "st-train: error: publishing_config provider `s3`: access_key and secret_key go together; give both, or neither "
        "to use boto3's credentials."
    )
    good = [{"provider": "s3", "bucket": "models", "base_path": "runs"}, {"provider": "dropbox", "token": "t"}]
    done = run_cli(["check", "--plugin", "flux", "--quick", f"--publishing_config={json.dumps(good)}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == [
        "after training, publishes to s3 bucket models: runs/out/",
        "after training, publishes to dropbox: out/",
    ]
