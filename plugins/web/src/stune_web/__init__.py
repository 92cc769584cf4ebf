"""stune-web: ``st-train server``, a local web app to configure, start, watch and compare runs.

This module only registers the command; starlette, uvicorn and the app are imported when
``server`` runs, so ``st-train --help`` and plugin discovery stay light.
"""

from __future__ import annotations

import argparse
from typing import Any

import stune

DEFAULT_PORT = 8001  # SimpleTuner's `simpletuner server` port, which the FLUX quickstart names


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on (default 127.0.0.1); any other address needs the token printed at start",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--dir", default=".", help="the project folder holding config/ (default: here)")


def _run(args: argparse.Namespace) -> int:
    from stune_web.server import serve

    return serve(args.host, args.port, args.dir)


@stune.hookimpl
def register_commands(register: Any) -> None:
    register("server", "configure, start, watch and compare runs in a browser", _arguments, _run)
