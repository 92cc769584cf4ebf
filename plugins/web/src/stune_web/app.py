"""The web app: a JSON API over the project's files and runs, the page (static HTML/JS/CSS) and
a server-sent event stream of the run's progress.

Requests are guarded: a server listening on a loopback address answers only requests naming a
loopback host (a web page elsewhere cannot reach it through DNS rebinding); one listening on any
other address answers only requests that carry its token. Writes must be JSON from the page's own
origin, so another site open in the browser cannot post to it either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stune.config import parse_overrides
from stune.errors import UserError
from stune.plugins import PluginHost
from stune_web import devices, outputs
from stune_web.files import Invalid, ProjectFiles, lycoris_vocabulary
from stune_web.runs import Busy, Runner
from stune_web.schema import form_schema

STATIC = Path(__file__).with_name("static")
TOKEN_COOKIE = "stune_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class Web:
    """What the handlers share: the project, its plugins, its files and its run."""

    def __init__(self, project: Path, host: PluginHost) -> None:
        self.project = project
        self.host = host
        self.files = ProjectFiles(project, host)
        self.runner = Runner(project)
        self.schema = form_schema(host)
        # Slow to learn (child processes that import torch): asked once, when first needed, and
        # shared by every request waiting for them.
        self._gpus: asyncio.Future[tuple[list[dict[str, Any]], str]] | None = None
        self._lycoris: asyncio.Future[tuple[list[str], list[str]]] | None = None

    async def gpus(self) -> tuple[list[dict[str, Any]], str]:
        if self._gpus is None:
            self._gpus = asyncio.ensure_future(asyncio.to_thread(devices.detect_gpus))
        return await asyncio.shield(self._gpus)

    async def lycoris(self) -> tuple[list[str], list[str]]:
        if self._lycoris is None:
            self._lycoris = asyncio.ensure_future(asyncio.to_thread(lycoris_vocabulary))
        return await asyncio.shield(self._lycoris)

    def output_dir(self, override: str | None = None) -> Path:
        return self.files.local(override or str(self.files.setting("output_dir") or "output")).resolve()

    def runs(self) -> dict[str, Path]:
        also = [self.output_dir()]
        if self.runner.run is not None:
            also.append(self.runner.run.output_dir)
        return outputs.discover(self.project, also)

    def run_folder(self, name: str | None) -> Path:
        runs = self.runs()
        if not name or name not in runs:
            raise NotFound(f"No run `{name}` in this project.")
        return runs[name]


class NotFound(UserError):
    pass


Handler = Callable[[Request], Awaitable[Response]]


def _json_errors(handler: Handler) -> Handler:
    """User mistakes become JSON errors with the loader's one sentence (and the key it names)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Invalid as exc:
            return JSONResponse({"error": str(exc), "key": exc.key, "index": exc.index}, status_code=400)
        except Busy as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return wrapped


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise UserError("The request body is not JSON.") from None
    if not isinstance(data, dict):
        raise UserError("The request body must be a JSON object.")
    return data


def create_app(
    project: Path,
    host: PluginHost | None = None,
    *,
    token: str | None = None,
    allowed_hosts: set[str] | None = None,
) -> Starlette:
    """The app for ``project``. ``token``: required on every request (a server on a non-loopback
    address); ``allowed_hosts``: the Host names accepted (a loopback server), None for any."""
    web = Web(project.resolve(), host or PluginHost.build())

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    async def schema(request: Request) -> Response:
        return JSONResponse({**web.schema, "project": str(web.project)})

    async def get_config(request: Request) -> Response:
        return JSONResponse(web.files.read_config())

    async def put_config(request: Request) -> Response:
        body = await _body(request)
        changes = body.get("set") or {}
        removed = body.get("unset") or []
        if not isinstance(changes, dict) or not isinstance(removed, list):
            raise UserError('Send {"set": {key: value}, "unset": [key, …]}.')
        return JSONResponse(web.files.save_config(changes, [str(k) for k in removed]))

    async def get_datasets(request: Request) -> Response:
        return JSONResponse(web.files.read_datasets())

    async def put_datasets(request: Request) -> Response:
        body = await _body(request)
        datasets = body.get("datasets")
        if not isinstance(datasets, list):
            raise UserError('Send {"datasets": [ {dataset keys}, … ]}.')
        return JSONResponse(web.files.save_datasets(datasets))

    async def get_lycoris(request: Request) -> Response:
        return JSONResponse(web.files.read_lycoris())

    async def lycoris_algorithms(request: Request) -> Response:
        algorithms, preset_keys = await web.lycoris()
        return JSONResponse({"algorithms": algorithms, "preset_keys": preset_keys})

    async def put_lycoris(request: Request) -> Response:
        body = await _body(request)
        algorithms, preset_keys = await web.lycoris()
        return JSONResponse(web.files.save_lycoris(body.get("settings"), algorithms, preset_keys))

    async def check(request: Request) -> Response:
        """``st-train check --json`` on the saved files: the dataset report, or the loader's sentence."""
        process = await asyncio.create_subprocess_exec(
            *_st_train("check", "--json"),
            cwd=web.project,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        text = stdout.decode("utf-8", "replace")
        report = None
        start = text.find("{")
        if start >= 0:
            with contextlib.suppress(ValueError):
                report = json.loads(text[start:])
        errors = [
            line for line in stderr.decode("utf-8", "replace").splitlines() if line.startswith("st-train: error:")
        ]
        return JSONResponse(
            {
                "ok": process.returncode == 0,
                "returncode": process.returncode,
                "report": report,
                "error": errors[-1][len("st-train: error: ") :] if errors else None,
                "stderr": stderr.decode("utf-8", "replace")[-4000:] if process.returncode else "",
            }
        )

    async def get_devices(request: Request) -> Response:
        gpus, how = await web.gpus()
        return JSONResponse({"gpus": gpus, "detected_with": how, "modes": list(devices.MODES)})

    async def get_run(request: Request) -> Response:
        run = web.runner.run
        return JSONResponse(
            {"run": run.summary() if run else None, "last_event": web.runner.events.last_id, "id": _id_of(run)}
        )

    def _id_of(run: Any) -> str | None:
        return outputs.run_id(web.project, run.output_dir) if run is not None else None

    async def start_run(request: Request) -> Response:
        body = await _body(request)
        choice = body.get("devices") or {}
        gpus, _ = await web.gpus()
        mode = str(choice.get("mode") or ("auto" if gpus else "cpu"))
        chosen = [int(i) for i in choice.get("gpus") or []]
        processes = int(choice["processes"]) if choice.get("processes") not in (None, "") else None
        place = devices.placement(mode, gpus, chosen, processes)
        args = []
        if "num_processes" in web.files.model.model_fields:  # st-train relaunches itself under accelerate above 1
            args.append(f"--num_processes={place.processes}")
        elif place.processes > 1:
            raise UserError("This stune cannot start several processes itself (no num_processes option); use one.")
        resume = body.get("resume")
        if resume not in (None, ""):
            args.append(f"--resume_from_checkpoint={resume}")
        output_override = body.get("output_dir") or None
        if output_override:
            args.append(f"--output_dir={output_override}")
        extra = str(body.get("extra") or "").strip()
        if extra:
            overrides = parse_overrides(shlex.split(extra))  # the CLI's own --key=value reading
            args += [f"--{key}={value}" for key, value in overrides.items()]
        run = await web.runner.start(args, place.env, web.output_dir(output_override))
        return JSONResponse({"run": run.summary(), "id": _id_of(run), "devices": place.as_dict()})

    async def stop_run(request: Request) -> Response:
        body = await _body(request)
        run = await web.runner.stop(force=bool(body.get("force")))
        return JSONResponse({"run": run.summary()})

    async def events(request: Request) -> Response:
        last = request.headers.get("last-event-id") or request.query_params.get("after")
        try:
            after = int(last) if last else web.runner.events.run_start - 1  # a new page: the latest run's events
        except ValueError:
            after = 0

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            async for item in web.runner.events.stream(after):
                if item is None:
                    yield ": keepalive\n\n"
                else:
                    yield f"id: {item['id']}\nevent: {item['event']}\ndata: {json.dumps(item['data'])}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def list_runs(request: Request) -> Response:
        runs = web.runs()
        active = _id_of(web.runner.run) if web.runner.run is not None and web.runner.run.alive() else None
        rows = []
        for name, folder in runs.items():
            metrics = [r for r in outputs.metrics_of(folder) if "loss" in r]
            rows.append(
                {
                    "id": name,
                    "path": str(folder),
                    "steps": len(metrics),
                    "last_loss": metrics[-1]["loss"] if metrics else None,
                    "active": name == active,
                }
            )
        return JSONResponse({"runs": rows, "configured": outputs.run_id(web.project, web.output_dir())})

    async def run_details(request: Request) -> Response:
        folder = web.run_folder(request.query_params.get("run"))
        return JSONResponse(outputs.details(web.project, folder))

    async def run_charts(request: Request) -> Response:
        name = request.query_params.get("run")
        runs = web.runs()
        folder = runs.get(name or "")
        if folder is None and web.runner.run is not None and name == _id_of(web.runner.run):
            folder = web.runner.run.output_dir
        if folder is None:
            raise NotFound(f"No run `{name}` in this project.")
        return JSONResponse({"charts": outputs.charts(folder)})

    async def compare(request: Request) -> Response:
        names = request.query_params.getlist("run")
        metric = request.query_params.get("metric", "loss")
        if metric not in outputs.METRICS:
            raise UserError(f"Unknown metric `{metric}`; choose one of {', '.join(outputs.METRICS)}.")
        folders = {name: web.run_folder(name) for name in names}
        return JSONResponse({"svg": outputs.compare(web.project, folders, metric), "metrics": outputs.METRICS})

    async def run_file(request: Request) -> Response:
        folder = web.run_folder(request.query_params.get("run"))
        target = outputs.resolve_file(folder, request.query_params.get("path", ""))
        if target is None:
            raise NotFound("No such file in this run.")
        if request.query_params.get("download"):
            return FileResponse(target, filename=target.name)
        return FileResponse(target, headers={"Cache-Control": "no-cache"})

    api = [
        Route("/api/schema", _json_errors(schema)),
        Route("/api/config", _json_errors(get_config), methods=["GET"]),
        Route("/api/config", _json_errors(put_config), methods=["PUT"]),
        Route("/api/datasets", _json_errors(get_datasets), methods=["GET"]),
        Route("/api/datasets", _json_errors(put_datasets), methods=["PUT"]),
        Route("/api/lycoris", _json_errors(get_lycoris), methods=["GET"]),
        Route("/api/lycoris", _json_errors(put_lycoris), methods=["PUT"]),
        Route("/api/lycoris/algorithms", _json_errors(lycoris_algorithms)),
        Route("/api/check", _json_errors(check), methods=["POST"]),
        Route("/api/devices", _json_errors(get_devices)),
        Route("/api/run", _json_errors(get_run), methods=["GET"]),
        Route("/api/run", _json_errors(start_run), methods=["POST"]),
        Route("/api/run/stop", _json_errors(stop_run), methods=["POST"]),
        Route("/api/events", events),
        Route("/api/runs", _json_errors(list_runs)),
        Route("/api/runs/details", _json_errors(run_details)),
        Route("/api/runs/charts", _json_errors(run_charts)),
        Route("/api/runs/file", _json_errors(run_file)),
        Route("/api/compare", _json_errors(compare)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        web.runner.reattach()
        yield
        await web.runner.shutdown()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/favicon.ico", favicon),
            *api,
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.web = web
    return Guard(app, token, allowed_hosts)  # type: ignore[return-value]


def _st_train(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "stune.cli", *args]


class Guard:
    """ASGI middleware: the token, the Host names, and same-origin JSON writes."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_hosts: set[str] | None) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    def __getattr__(self, name: str) -> Any:  # app.state, app.router, … for tests and tools
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host_header = request.headers.get("host", "")
        if self.allowed_hosts is not None and _hostname(host_header) not in self.allowed_hosts:
            await _refuse(scope, receive, send, 403, "This server answers requests for localhost only.")
            return
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin and urlparse(origin).netloc != host_header:
                await _refuse(scope, receive, send, 403, "Requests from another site are refused.")
                return
            if not request.headers.get("content-type", "").startswith("application/json"):
                await _refuse(scope, receive, send, 415, "Send JSON (Content-Type: application/json).")
                return
        set_cookie = False
        if self.token is not None:
            from_query = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
            given = (
                _bearer(request.headers.get("authorization", ""))
                or request.headers.get("x-stune-token", "")
                or request.cookies.get(TOKEN_COOKIE, "")
                or from_query
            )
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                await _refuse(
                    scope,
                    receive,
                    send,
                    401,
                    "This server needs its token: open the address st-train server printed (it ends in ?token=…).",
                )
                return
            set_cookie = bool(from_query) and request.cookies.get(TOKEN_COOKIE) != self.token

        async def send_with_cookie(message: Message) -> None:
            if set_cookie and message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _bearer(value: str) -> str:
    return value[7:].strip() if value.lower().startswith("bearer ") else ""


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    response = JSONResponse({"error": message}, status_code=status)
    await response(scope, receive, send)
