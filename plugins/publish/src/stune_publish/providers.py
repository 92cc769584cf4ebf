"""The providers: S3-compatible storage (AWS, MinIO, R2, …), Backblaze B2 through its S3 API, Azure
Blob Storage and Dropbox. Each uses its vendor's SDK (boto3, azure-storage-blob, dropbox) the way
its authors intend, imported only when a run checks or uploads.

Entries, as SimpleTuner's documentation writes them::

    {"provider": "s3", "bucket": "models", "region": "us-east-1", "access_key": "…", "secret_key": "…",
     "endpoint_url": "https://…", "public_base_url": "https://cdn.example.com/models", "base_path": "runs"}
    {"provider": "azure_blob", "connection_string": "DefaultEndpointsProtocol=…", "container": "models"}
    {"provider": "dropbox", "token": "sl.…", "base_path": "/runs"}
"""

from __future__ import annotations

import contextlib
import mimetypes
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field, model_validator

from stune.errors import ConfigError
from stune.publishing import OPTION, Publisher, PublisherSettings, UploadFile, needs_module

_TIMEOUT_S = 60  # per request: a dead endpoint fails the upload instead of hanging the end of a run


# -- S3 and Backblaze B2 ----------------------------------------------------------------------------


class S3Settings(PublisherSettings):
    bucket: str = Field(min_length=1)
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    endpoint_url: str | None = None
    public_base_url: str | None = None

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> S3Settings:
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError("access_key and secret_key go together; give both, or neither to use boto3's credentials")
        return self


class S3(Publisher):
    """Any S3-compatible store. Without ``access_key``/``secret_key`` boto3 finds credentials as it
    always does (environment, ~/.aws, instance roles). Large files go up in multipart chunks."""

    name = "s3"
    Settings: ClassVar[type[PublisherSettings]] = S3Settings
    settings: S3Settings

    def check(self) -> None:
        needs_module("boto3", self.name, "s3")

    def endpoint(self) -> str | None:
        return self.settings.endpoint_url

    def describe(self) -> str:
        return f"{self.name} bucket {self.settings.bucket}"

    def upload(self, files: list[UploadFile], folder: str, advance: Callable[[int], None]) -> str:
        import boto3
        from boto3.exceptions import S3UploadFailedError
        from botocore.config import Config

        s = self.settings
        session = boto3.session.Session(
            aws_access_key_id=s.access_key,
            aws_secret_access_key=s.secret_key,
            aws_session_token=s.session_token,
            region_name=s.region,
        )
        client = session.client(
            "s3",
            endpoint_url=self.endpoint(),
            config=Config(
                connect_timeout=_TIMEOUT_S, read_timeout=_TIMEOUT_S, retries={"max_attempts": 4, "mode": "standard"}
            ),
        )
        for file in files:
            try:
                client.upload_file(
                    str(file.local), s.bucket, file.remote, ExtraArgs=_content_type(file), Callback=advance
                )
            except S3UploadFailedError as exc:  # its text repeats the paths; the service's answer is enough
                error = getattr(exc.__context__, "response", {}).get("Error", {})
                if not error:
                    raise
                raise RuntimeError(f"{error.get('Code')}: {error.get('Message')}") from exc
        if s.public_base_url:
            return f"{s.public_base_url.rstrip('/')}/{folder}/"
        return f"s3://{s.bucket}/{folder}/"


class BackblazeB2(S3):
    """Backblaze B2 through its S3-compatible API; ``region`` (e.g. ``us-west-004``) gives the endpoint
    when ``endpoint_url`` is not set. access_key / secret_key are the application key id and key."""

    name = "backblaze_b2"

    def check(self) -> None:
        super().check()
        if not (self.settings.endpoint_url or self.settings.region):
            raise ConfigError(
                f"{OPTION} provider `{self.name}` needs region (e.g. us-west-004) or endpoint_url "
                "(https://s3.<region>.backblazeb2.com); add one."
            )

    def endpoint(self) -> str | None:
        return self.settings.endpoint_url or f"https://s3.{self.settings.region}.backblazeb2.com"


def _content_type(file: UploadFile) -> dict[str, str]:
    kind, _ = mimetypes.guess_type(file.local.name)
    return {"ContentType": kind} if kind else {}


# -- Azure Blob Storage -----------------------------------------------------------------------------


class AzureSettings(PublisherSettings):
    container: str = Field(min_length=1)
    connection_string: str | None = None
    account_url: str | None = None
    credential: str | None = None  # an account key or SAS token, with account_url

    @model_validator(mode="after")
    def _one_way_in(self) -> AzureSettings:
        if bool(self.connection_string) == bool(self.account_url):
            raise ValueError("give connection_string, or account_url (with credential unless the URL carries a SAS)")
        return self


class AzureBlob(Publisher):
    """Block blobs in one container (created when missing); the SDK splits large files into blocks."""

    name = "azure_blob"
    aliases = ("azure",)
    Settings: ClassVar[type[PublisherSettings]] = AzureSettings
    settings: AzureSettings

    def check(self) -> None:
        needs_module("azure.storage.blob", self.name, "azure")

    def describe(self) -> str:
        return f"{self.name} container {self.settings.container}"

    def upload(self, files: list[UploadFile], folder: str, advance: Callable[[int], None]) -> str:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient, ContentSettings

        s = self.settings
        timeouts: dict[str, Any] = {"connection_timeout": _TIMEOUT_S, "read_timeout": _TIMEOUT_S}
        if s.connection_string:
            service = BlobServiceClient.from_connection_string(s.connection_string, **timeouts)
        else:
            service = BlobServiceClient(str(s.account_url), credential=s.credential, **timeouts)
        container = service.get_container_client(s.container)
        with contextlib.suppress(ResourceExistsError):  # publishing into an existing container is the usual case
            container.create_container()
        for file in files:
            sent = 0

            def progress(current: int, _total: int | None) -> None:
                nonlocal sent
                advance(current - sent)
                sent = current

            kind, _ = mimetypes.guess_type(file.local.name)
            with file.local.open("rb") as data:
                container.upload_blob(
                    file.remote,
                    data,
                    length=file.size,
                    overwrite=True,
                    content_settings=ContentSettings(content_type=kind) if kind else None,
                    progress_hook=progress,
                )
        return f"{container.url}/{folder}/"


# -- Dropbox ---------------------------------------------------------------------------------------------


class DropboxSettings(PublisherSettings):
    token: str | None = None  # a short-lived access token, or:
    refresh_token: str | None = None  # with app_key (and app_secret unless the app uses PKCE)
    app_key: str | None = None
    app_secret: str | None = None
    chunk_size_mb: float = Field(8.0, gt=0, le=150)  # files above this go up in an upload session

    @model_validator(mode="after")
    def _credentials(self) -> DropboxSettings:
        if not self.token and not (self.refresh_token and self.app_key):
            raise ValueError("give token (an access token), or refresh_token with app_key")
        return self


class Dropbox(Publisher):
    """Files under ``/<base_path>/<run folder>/`` in the account (or app folder) the token opens.
    Files above ``chunk_size_mb`` are sent in an upload session (Dropbox takes at most 150 MB per
    request). The URI is a shared link to the folder when the token may create one, else a
    ``dropbox://`` path."""

    name = "dropbox"
    Settings: ClassVar[type[PublisherSettings]] = DropboxSettings
    settings: DropboxSettings

    def check(self) -> None:
        needs_module("dropbox", self.name, "dropbox")

    def upload(self, files: list[UploadFile], folder: str, advance: Callable[[int], None]) -> str:
        import dropbox
        from dropbox.exceptions import ApiError
        from dropbox.files import CommitInfo, UploadSessionCursor, WriteMode

        s = self.settings
        client = dropbox.Dropbox(
            oauth2_access_token=s.token,
            oauth2_refresh_token=s.refresh_token,
            app_key=s.app_key,
            app_secret=s.app_secret,
            timeout=_TIMEOUT_S,
        )
        chunk = int(s.chunk_size_mb * 1024 * 1024)
        for file in files:
            path = "/" + file.remote
            with file.local.open("rb") as data:
                if file.size <= chunk:
                    client.files_upload(data.read(), path, mode=WriteMode.overwrite)
                    advance(file.size)
                    continue
                first = data.read(chunk)
                session = client.files_upload_session_start(first)
                cursor = UploadSessionCursor(session_id=session.session_id, offset=len(first))
                advance(len(first))
                while file.size - cursor.offset > chunk:
                    piece = data.read(chunk)
                    client.files_upload_session_append_v2(piece, cursor)
                    cursor.offset += len(piece)
                    advance(len(piece))
                last = data.read()
                client.files_upload_session_finish(last, cursor, CommitInfo(path=path, mode=WriteMode.overwrite))
                advance(len(last))
        try:
            return str(client.sharing_create_shared_link_with_settings("/" + folder).url)
        except ApiError as exc:  # no sharing permission (scoped app), or a link exists already
            existing = getattr(exc.error, "get_shared_link_already_exists", None)
            if callable(existing) and exc.error.is_shared_link_already_exists():
                metadata = existing()
                if metadata is not None and metadata.is_metadata():
                    return str(metadata.get_metadata().url)
            return f"dropbox:///{folder}/"
