"""`st-train server` on the command line: light to discover, localhost by default, a token when exposed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from stune.testing import offline_env, run_cli

PROBE = """
import sys
from stune.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "starlette", "uvicorn") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def test_discovering_the_command_imports_no_web_stack_and_no_torch(tmp_path: Path) -> None:
    for argv in (["--help"], ["plugins"], ["server", "--help"], ["configure", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-c", PROBE.format(argv=argv)],
            capture_output=True,
            text=True,
            env=offline_env(),
            cwd=tmp_path,
        )
        heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY=")][-1]
        assert heavy == "HEAVY=", (argv, heavy)
    listing = run_cli(["plugins"], cwd=tmp_path)
    assert '"server"' in listing.stdout  # the plugin provides the command
    usage = run_cli(["server", "--help"], cwd=tmp_path)
    assert usage.returncode == 0 and "--host" in usage.stdout and "8001" in usage.stdout


def test_a_server_on_another_address_refuses_requests_without_its_token(tmp_path: Path, start_server: Any) -> None:
    # 0.0.0.0 listens on every address; the test only ever connects through the loopback.
    server = start_server(tmp_path, "--host", "0.0.0.0")
    assert server.token and f"?token={server.token}" in server.banner
    refused = httpx.get(f"{server.url}/api/config")
    assert refused.status_code == 401 and "token" in refused.json()["error"]
    assert httpx.get(f"{server.url}/").status_code == 401
    assert httpx.get(f"{server.url}/api/config", headers={"Authorization": "Bearer nope"}).status_code == 401
    allowed = httpx.get(f"{server.url}/api/config", headers={"Authorization": f"Bearer {server.token}"})
    assert allowed.status_code == 200
    page = httpx.get(f"{server.url}/?token={server.token}")
    assert page.status_code == 200 and "stune_token" in page.headers["set-cookie"]


def test_the_default_server_is_on_localhost_without_a_token(tmp_path: Path, start_server: Any) -> None:
    server = start_server(tmp_path)
    assert server.token is None and "127.0.0.1" in server.banner
    assert httpx.get(f"{server.url}/api/config").status_code == 200
    taken = run_cli(["server", "--dir", str(tmp_path), "--port", server.url.rsplit(":", 1)[1]], cwd=tmp_path)
    assert taken.returncode == 2 and "pass another --port" in taken.stderr and "Traceback" not in taken.stderr
    nowhere = run_cli(["server", "--dir", str(tmp_path / "missing")], cwd=tmp_path)
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr
