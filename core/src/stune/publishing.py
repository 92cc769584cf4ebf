"""Publishing a finished run to storage providers (``publishing_config``), beside the Hub upload.

``publishing_config`` is SimpleTuner's option: one provider entry, a list of them, inline JSON or the
path of a JSON file holding either. Each entry names a ``provider`` (``s3``, ``backblaze_b2``,
``azure_blob``, ``dropbox`` … — whatever the installed plugins register through
``register_publishers``), an optional ``base_path`` inside the destination, and the provider's own
keys (bucket, credentials, …; ``{env:NAME}`` in a value reads an environment variable). At the end of training, after the model card and the optional Hub
push, the main process uploads ``output_dir`` as the folder ``<base_path>/<output_dir's name>/``
to each provider, with the same file selection as the Hub upload (no temporary files, no wandb run
folder; ``checkpoint-*`` folders only with ``include_checkpoints``).

A :class:`Publisher` carries the behaviour: its ``Settings`` model validates the entry when the
config is checked (so a missing bucket or SDK stops the run before anything loads), and
``upload`` sends files and returns the URI of the published folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stune.errors import ConfigError, UserError
from stune.jsonfile import read_json_option

if TYPE_CHECKING:
    from stune.plugins import PluginHost

log = logging.getLogger("stune.publishing")

OPTION = "publishing_config"
#: Entry keys whose values are credentials: never written to training_config.json, trackers or logs.
SECRET_KEYS = frozenset(
    {
        "access_key",
        "secret_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "connection_string",
        "sas_token",
        "credential",
        "account_key",
        "token",
        "refresh_token",
        "app_secret",
        "webhook_url",  # a Discord webhook URL is its own credential
    }
)
REDACTED = "<redacted>"


class PublisherSettings(BaseModel):
    """The keys every ``publishing_config`` entry may have; providers subclass it with their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    base_path: str = ""
    include_checkpoints: bool = False

    @field_validator("base_path")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        parts = [p for p in value.replace("\\", "/").split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError("base_path may not contain . or .. parts")
        return "/".join(parts)


@dataclass(frozen=True)
class UploadFile:
    """One file of the published folder: where it is here and its path inside the destination."""

    local: Path
    remote: str  # POSIX path: <base_path>/<run folder name>/<path relative to output_dir>
    size: int


class Publisher:
    """A storage provider. Subclasses set ``name`` (and ``aliases``), ``Settings``, and implement
    ``check`` (cheap, at config time: the SDK is importable, the keys make sense) and ``upload``."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type[PublisherSettings]] = PublisherSettings

    def __init__(self, settings: PublisherSettings) -> None:
        self.settings = settings

    def check(self) -> None:
        """Raise :class:`ConfigError` when this entry cannot work (missing SDK, missing key)."""

    def upload(self, files: list[UploadFile], folder: str, advance: Callable[[int], None]) -> str:
        """Upload ``files`` (``folder`` is their common remote folder); call ``advance(bytes)`` as bytes
        go out; return the URI of the published folder. Raise on failure."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def needs_module(module: str, provider: str, extra: str) -> None:
    """ConfigError unless ``module`` imports: the provider's SDK is an optional dependency."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{OPTION} provider `{provider}` needs the {module} package; install it with "
            f"`pip install 'stune-publish[{extra}]'`."
        )


# -- reading the option ---------------------------------------------------------------------------


def read_entries(value: Any) -> list[dict[str, Any]]:
    """``publishing_config`` (an object, a list of objects, JSON text or a JSON file path) → entries,
    each a dict with a ``provider``. Shape mistakes are ConfigErrors naming the option."""
    if value is None or value == "" or value == []:
        return []
    data = read_json_option(value, OPTION)
    entries = data if isinstance(data, list) else [data]
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"{OPTION} entries must be JSON objects with a provider key.")
        if not isinstance(entry.get("provider"), str) or not entry["provider"].strip():
            raise ConfigError(f'{OPTION} entry {_shown(entry)} has no provider; add "provider": "s3" (or another).')
    return [dict(entry) for entry in entries]


def _shown(entry: dict[str, Any]) -> str:
    return json.dumps(redact(entry), sort_keys=True)[:120]


def redact(value: Any) -> Any:
    """``value`` with every credential (SECRET_KEYS) in nested objects replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def shareable_values(config: Any) -> dict[str, Any]:
    """The run's options as JSON, without credentials: what training_config.json and trackers get."""
    values: dict[str, Any] = config.model_dump(mode="json")
    for key in (OPTION, "webhook_config"):
        if isinstance(values.get(key), (dict, list)):
            values[key] = redact(values[key])
    return values


def build_publishers(value: Any, host: PluginHost) -> list[Publisher]:
    """One checked :class:`Publisher` per entry; mistakes are ConfigErrors naming the provider and key."""
    publishers: list[Publisher] = []
    for entry in read_entries(value):
        name = entry["provider"].strip().lower()
        cls = host.publishers.get(name)
        if cls is None:
            owner = host.catalog_owner_of_publisher(name)
            if owner is not None:
                raise ConfigError(
                    f"{OPTION} provider `{name}` comes with the `{owner.name}` plugin; install it with "
                    f"`pip install {owner.distribution}`."
                )
            known = ", ".join(sorted(host.publishers)) or "none installed"
            raise ConfigError(f"{OPTION} provider `{name}` is unknown; installed providers: {known}.")
        entry = {key: _from_environment(given, name, key) for key, given in entry.items()}
        try:
            settings = cls.Settings.model_validate({**entry, "provider": cls.name})
        except ValidationError as exc:
            raise ConfigError(f"{OPTION} provider `{name}`: {_first_error(exc)}.") from None
        publisher = cls(settings)
        publisher.check()
        publishers.append(publisher)
    return publishers


_ENV = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _from_environment(value: Any, provider: str, key: str) -> Any:
    """``{env:NAME}`` in a string value is the environment variable's value, so that credentials
    can stay out of config files (``"secret_key": "{env:AWS_SECRET_ACCESS_KEY}"``)."""
    if not isinstance(value, str):
        return value

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(
                f"{OPTION} provider `{provider}`: `{key}` reads the environment variable {name}, which is not set; "
                "export it."
            )
        return os.environ[name]

    return _ENV.sub(variable, value)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key `{key}`"
    if error["type"] == "missing":
        return f"the key `{key}` is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"`{key}` {message}" if key else message


# -- uploading ------------------------------------------------------------------------------------


def remote_folder(output_dir: Path, settings: PublisherSettings) -> str:
    """Where the run goes inside the destination: ``<base_path>/<output_dir's name>``."""
    return str(PurePosixPath(settings.base_path or ".", Path(output_dir).resolve().name)).removeprefix("./")


def files_to_publish(output_dir: Path, settings: PublisherSettings) -> tuple[str, list[UploadFile]]:
    """The remote folder and the files of ``output_dir`` to send (the Hub upload's selection)."""
    from stune.publish import files_to_upload

    folder = remote_folder(output_dir, settings)
    files = []
    for relative in files_to_upload(output_dir, settings.include_checkpoints):
        local = output_dir / relative
        files.append(UploadFile(local, f"{folder}/{relative}", local.stat().st_size))
    return folder, files


def publish_outputs(
    publishers: Iterable[Publisher],
    output_dir: Path,
    on_published: Callable[[Publisher, str], None] | None = None,
) -> list[tuple[Publisher, str]]:
    """Upload ``output_dir`` with every publisher; return (publisher, URI) pairs.

    ``on_published`` runs after each successful upload. One provider failing does not stop the
    others; afterwards a failure ends the run with one sentence saying the files are safe on disk
    (as a failed Hub push does)."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    done: list[tuple[Publisher, str]] = []
    failures: list[str] = []
    for publisher in publishers:
        folder, files = files_to_publish(output_dir, publisher.settings)
        total = sum(f.size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"publishing to {publisher.describe()}") as bar:
            try:
                uri = publisher.upload(files, folder, bar.update)
            # Whatever the SDK raises (network, credentials, permissions), the trained files are on disk.
            except Exception as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")[:300]
                log.error("publishing to %s failed: %s", publisher.describe(), reason)
                failures.append(f"{publisher.describe()} ({reason})")
                continue
        log.info("published %d files (%d bytes) to %s", len(files), total, uri)
        done.append((publisher, uri))
        if on_published is not None:
            on_published(publisher, uri)
    if failures:
        raise UserError(
            f"Publishing to {'; '.join(failures)} failed; the files remain in {output_dir}, "
            f"fix {OPTION} (or the network) and upload them again."
        )
    return done
