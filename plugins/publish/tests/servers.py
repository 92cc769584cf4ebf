"""Local stand-ins for the storage services, so the real SDKs run unchanged against real HTTP.

S3 is moto's own server (``moto[server]``). Azure Blob Storage and Dropbox have no installable
emulator here, so each gets a small HTTP server implementing the few REST calls an upload makes,
as the services document them (Azure: Create Container, Put Blob, Put Block, Put Block List;
Dropbox: /2/files/upload, the upload-session calls, /2/sharing/create_shared_link_with_settings).
They keep what they receive, so tests compare bytes with what the run wrote. Dropbox's SDK speaks
only HTTPS: its server uses a self-signed certificate the test hands to requests.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import ssl
import threading
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = base64.b64encode(b"stune-test-account-key-32-bytes!").decode()


class _Server:
    """A threaded HTTP(S) server on a free local port, stopped by ``close``."""

    handler: type[http.server.BaseHTTPRequestHandler]

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet test output
        pass

    @property
    def owner(self) -> Any:
        return self.server.owner  # type: ignore[attr-defined]

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# -- Azure Blob Storage ------------------------------------------------------------------------------


class _AzureHandler(_Handler):
    def do_PUT(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = urllib.parse.unquote(url.path).lstrip("/").split("/", 2)
        data = self.body()
        owner: AzureBlobServer = self.owner
        owner.requests.append(f"PUT {url.path}?{url.query}")
        if len(parts) < 2 or parts[0] != AZURE_ACCOUNT:
            return self.reply(400)
        container = parts[1]
        if query.get("restype") == "container":
            if container in owner.containers:
                return self.reply(409, headers={"x-ms-error-code": "ContainerAlreadyExists"})
            owner.containers[container] = {}
            return self.reply(201, headers=self._stamp())
        if container not in owner.containers:
            return self.reply(404, headers={"x-ms-error-code": "ContainerNotFound"})
        blob = parts[2]
        if query.get("comp") == "block":
            owner.blocks[(container, blob, query["blockid"])] = data
            return self.reply(201, headers=self._stamp())
        if query.get("comp") == "blocklist":
            ids = [element.text or "" for element in ET.fromstring(data)]
            owner.containers[container][blob] = b"".join(owner.blocks.pop((container, blob, i)) for i in ids)
            return self.reply(201, headers=self._stamp())
        owner.containers[container][blob] = data
        owner.content_types[(container, blob)] = self.headers.get("x-ms-blob-content-type", "")
        return self.reply(201, headers=self._stamp())

    @staticmethod
    def _stamp() -> dict[str, str]:
        now = datetime.datetime.now(datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
        return {"ETag": f'"0x{uuid.uuid4().hex[:16].upper()}"', "Last-Modified": now, "x-ms-version": "2025-01-05"}


class AzureBlobServer(_Server):
    handler = _AzureHandler

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, bytes]] = {}
        self.blocks: dict[tuple[str, str, str], bytes] = {}
        self.content_types: dict[tuple[str, str], str] = {}
        super().__init__()

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZURE_ACCOUNT};"
        )


# -- Dropbox -----------------------------------------------------------------------------------------


class _DropboxHandler(_Handler):
    def do_POST(self) -> None:
        owner: DropboxServer = self.owner
        route = urllib.parse.urlsplit(self.path).path
        owner.requests.append(route)
        if self.headers.get("Authorization") != f"Bearer {owner.token}":
            error = {"error_summary": "invalid_access_token/", "error": {".tag": "invalid_access_token"}}
            return self.reply(401, json.dumps(error).encode(), {"Content-Type": "application/json"})
        arg = json.loads(self.headers.get("Dropbox-API-Arg") or "null")
        data = self.body()
        if route == "/2/files/upload":
            owner.files[arg["path"]] = data
            return self._json(self._metadata(arg["path"], data))
        if route == "/2/files/upload_session/start":
            session = uuid.uuid4().hex
            owner.sessions[session] = bytearray(data)
            return self._json({"session_id": session})
        if route == "/2/files/upload_session/append_v2":
            cursor = arg["cursor"]
            buffer = owner.sessions[cursor["session_id"]]
            assert cursor["offset"] == len(buffer), "append at the wrong offset"
            buffer += data
            return self._json(None)
        if route == "/2/files/upload_session/finish":
            buffer = owner.sessions.pop(arg["cursor"]["session_id"])
            assert arg["cursor"]["offset"] == len(buffer), "finish at the wrong offset"
            buffer += data
            owner.files[arg["commit"]["path"]] = bytes(buffer)
            owner.chunked.append(arg["commit"]["path"])
            return self._json(self._metadata(arg["commit"]["path"], bytes(buffer)))
        if route == "/2/sharing/create_shared_link_with_settings":
            path = json.loads(data)["path"]
            url = f"https://www.dropbox.test/scl/fo/{hashlib.sha1(path.encode()).hexdigest()[:12]}"
            link = self._link(path, url)
            if path in owner.links:  # Dropbox answers a second request for a path with the existing link
                error = {
                    ".tag": "shared_link_already_exists",
                    "shared_link_already_exists": {".tag": "metadata", "metadata": link},
                }
                body = {"error_summary": "shared_link_already_exists/metadata/..", "error": error}
                return self.reply(409, json.dumps(body).encode(), {"Content-Type": "application/json"})
            owner.links[path] = url
            return self._json(link)
        return self.reply(404)

    @staticmethod
    def _link(path: str, url: str) -> dict[str, Any]:
        return {
            ".tag": "folder",
            "url": url,
            "name": path.rsplit("/", 1)[-1],
            "path_lower": path.lower(),
            "link_permissions": {
                "can_revoke": True,
                "visibility_policies": [],
                "can_set_expiry": False,
                "can_remove_expiry": False,
                "allow_download": True,
                "can_allow_download": True,
                "can_disallow_download": False,
                "allow_comments": False,
                "team_restricts_comments": False,
            },
        }

    def _json(self, value: Any) -> None:
        self.reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _metadata(path: str, data: bytes) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "name": path.rsplit("/", 1)[-1],
            "id": "id:" + uuid.uuid4().hex,
            "client_modified": now,
            "server_modified": now,
            "rev": uuid.uuid4().hex[:12],
            "size": len(data),
            "path_lower": path.lower(),
            "path_display": path,
        }


class DropboxServer(_Server):
    """Serves both of Dropbox's API hosts (api and content) on one port, over HTTPS."""

    handler = _DropboxHandler

    def __init__(self, folder: Path, token: str = "sl.test-token") -> None:
        self.token = token
        self.files: dict[str, bytes] = {}
        self.sessions: dict[str, bytearray] = {}
        self.chunked: list[str] = []
        self.links: dict[str, str] = {}
        self.certificate = folder / "dropbox-test-cert.pem"
        key = folder / "dropbox-test-key.pem"
        _self_signed(self.certificate, key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, key)
        super().__init__(context)

    def environment(self) -> dict[str, str]:
        """What a process needs to reach this server with the dropbox SDK: its documented host
        variables (read when ``dropbox`` is imported) and the certificate for requests."""
        host = f"127.0.0.1:{self.port}"
        return {
            "DROPBOX_API_HOST": host,
            "DROPBOX_API_CONTENT_HOST": host,
            "REQUESTS_CA_BUNDLE": str(self.certificate),
        }


def _self_signed(certificate: Path, key: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(private, hashes.SHA256())
    )
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
