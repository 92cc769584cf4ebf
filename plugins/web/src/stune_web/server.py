"""``st-train server``: bind, print the address (and the token when exposed), serve until Ctrl-C."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from pathlib import Path

from stune.errors import UserError

DEFAULT_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host} is not an address of this machine ({exc.strerror}).") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port} ({exc.strerror}); pass another --port.") from None
    sock.listen(128)
    return sock


def serve(host: str | None, port: int, directory: str) -> int:
    project = Path(directory).expanduser().resolve()
    if not project.is_dir():
        raise UserError(f"The project folder {directory} does not exist; pass --dir with an existing folder.")
    host = host or DEFAULT_HOST
    exposed = not is_loopback(host)
    token = secrets.token_urlsafe(24) if exposed else None
    sock = bind(host, port)
    actual = sock.getsockname()[1]

    import uvicorn

    from stune_web.app import LOOPBACK_NAMES, create_app

    allowed = None if exposed else {*LOOPBACK_NAMES, host}
    app = create_app(project, token=token, allowed_hosts=allowed)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{actual}/"
    lines = [f"stune web: {url}{'?token=' + token if token else ''}  (project {project})"]
    if token:
        lines.append(
            f"  listening on {host}: every request must carry the token {token} (the link above sets it as a "
            "cookie; API clients send `Authorization: Bearer TOKEN`)."
        )
    lines.append("  Ctrl-C stops the server; a run it started goes on, and the next server picks it up.")
    print("\n".join(lines), flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("stune web: stopped", file=sys.stderr)
    return 0
