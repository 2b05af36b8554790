"""A simulated UniAll upstream: Kling v3 tasks that go queued → in_progress → completed, with no network.

``create_sandbox_app`` answers the two routes of the upstream page (bearer auth), plus ``/sandbox/files/{id}.mp4``
(the finished "video", with HEAD and single ranges) and ``/sandbox/health``. A task's status is a pure function of
the time since submission on an injected clock (``fail_marker`` / ``fail_rate`` make it fail); state is bounded.
``serve_sandbox`` / ``serve_app`` / ``EmbeddedServer`` serve it (or any ASGI app) on a real loopback socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.bounded import LRUCache
from gateway.web.server_protocol import listener_protocol

__all__ = [
    "EmbeddedServer",
    "RunningServer",
    "SandboxOptions",
    "bind_socket",
    "byte_range",
    "create_sandbox_app",
    "mp4_bytes",
    "serve_app",
    "serve_sandbox",
]

_DEFAULT_SECONDS = 5
_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxOptions:
    """How the simulated upstream behaves: ``SandboxOptions(api_key="sk-dev", queued_s=0.2, run_s=0.5)``."""

    api_key: str | None
    """The bearer key it requires; ``None`` accepts any non-empty bearer token."""
    queued_s: float = 1.0
    """Seconds a task stays ``queued``."""
    run_s: float = 4.0
    """Seconds a task stays ``in_progress`` before it completes (or fails)."""
    fail_marker: str = "[sandbox:fail]"
    """A prompt (or multi-shot prompt) containing this ends ``failed`` instead of ``completed``."""
    fail_rate: float = 0.0
    """Fraction of the other tasks that fail at random (see ``rng`` of ``create_sandbox_app``)."""
    public_base_url: str | None = None
    """Base of ``video_url``; by default the base URL the status poll arrived on."""
    max_tasks: int = 100_000
    """Tasks remembered; beyond this the oldest are forgotten (and then answer 404)."""

    def __post_init__(self) -> None:
        if self.queued_s < 0 or self.run_s < 0:
            raise ValueError("queued_s and run_s must not be negative")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")


@dataclass(frozen=True, slots=True)
class _Task:
    id: str
    model: str
    seconds: int
    submitted: float  # by the injected (monotonic) clock
    created_at: int  # unix seconds
    fails: bool


class _SandboxState:
    """Everything one sandbox app remembers; lives on ``app.state.sandbox``."""

    def __init__(
        self,
        options: SandboxOptions,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.options = options
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng
        self.tasks: LRUCache[str, _Task] = LRUCache(options.max_tasks)  # only put touches: the oldest go first

    def submit(self, model: str, seconds: int, prompts: list[str]) -> _Task:
        opts = self.options
        marked = any(opts.fail_marker in prompt for prompt in prompts) if opts.fail_marker else False
        fails = marked or (opts.fail_rate > 0 and self.rng.random() < opts.fail_rate)
        task = _Task(
            id=f"task_{secrets.token_hex(12)}",
            model=model,
            seconds=seconds,
            submitted=self.clock(),
            created_at=int(self.wall_clock()),
            fails=fails,
        )
        self.tasks.put(task.id, task)
        return task

    def status_body(self, task: _Task, base_url: str) -> dict[str, Any]:
        """The task's status body right now (the seed page's shape)."""
        opts = self.options
        elapsed = self.clock() - task.submitted
        body: dict[str, Any] = {
            "id": task.id,
            "task_id": task.id,
            "object": "video.generation.job",
            "model": task.model,
            "created_at": task.created_at,
        }
        if elapsed < opts.queued_s:
            body.update(status="queued", progress=0)
        elif elapsed < opts.queued_s + opts.run_s:
            body.update(status="in_progress", progress=min(99, int(99 * (elapsed - opts.queued_s) / opts.run_s)))
        elif task.fails:
            body.update(
                status="failed",
                progress=99 if opts.run_s > 0 else 0,
                error={"code": "generation_failed", "message": "The video generation failed (sandbox)."},
            )
        else:
            body.update(
                status="completed",
                progress=100,
                video_url=f"{base_url}/sandbox/files/{task.id}.mp4",
                seconds=task.seconds,
                completed_at=task.created_at + round(opts.queued_s + opts.run_s),
            )
        return body

    def is_completed(self, task: _Task) -> bool:
        elapsed = self.clock() - task.submitted
        return not task.fails and elapsed >= self.options.queued_s + self.options.run_s


def _error(status: int, message: str, type_: str, code: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body, as UniAll answers them."""
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


def _state(request: Request) -> _SandboxState:
    state: _SandboxState = request.app.state.sandbox
    return state


def _authenticate(request: Request, api_key: str | None) -> JSONResponse | None:
    """None when the bearer key is acceptable, else the 401 to answer."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return _error(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            "authentication_error",
            "invalid_api_key",
        )
    if api_key is not None and not hmac.compare_digest(token.encode(), api_key.encode()):
        return _error(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
    return None


def _output_seconds(duration: object) -> int:
    """The requested duration as UniAll would read it; 5 when absent or unreadable."""
    if isinstance(duration, bool):
        return _DEFAULT_SECONDS
    if isinstance(duration, int):
        return duration
    if isinstance(duration, float) and duration.is_integer():
        return int(duration)
    if isinstance(duration, str) and duration.strip().isdigit():
        return int(duration.strip())
    return _DEFAULT_SECONDS


def _prompts(body: dict[str, Any]) -> list[str]:
    """The main prompt and every multi-shot prompt (empty when there are none)."""
    prompts = [body["prompt"]] if isinstance(body.get("prompt"), str) else []
    extra = body.get("extra_body")
    shots = extra.get("multi_prompt") if isinstance(extra, dict) else None
    if isinstance(shots, list):
        prompts.extend(s["prompt"] for s in shots if isinstance(s, dict) and isinstance(s.get("prompt"), str))
    return prompts


def _has_multi_prompt(body: dict[str, Any]) -> bool:
    extra = body.get("extra_body")
    return isinstance(extra, dict) and isinstance(extra.get("multi_prompt"), list)


async def _create(request: Request) -> Response:
    state = _state(request)
    if (denied := _authenticate(request, state.options.api_key)) is not None:
        return denied
    raw = await request.body()
    if len(raw) > _MAX_BODY_BYTES:
        return _error(413, "Request body too large.", "invalid_request_error", "request_too_large")
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "The request body is not valid JSON.", "invalid_request_error", "invalid_json")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", "invalid_request_error", "invalid_json")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _error(
            400,
            "Missing required parameter: 'model'.",
            "invalid_request_error",
            "missing_required_parameter",
            "model",
        )
    if not isinstance(body.get("prompt"), str) and not _has_multi_prompt(body):
        return _error(
            400,
            "Missing required parameter: 'prompt'.",
            "invalid_request_error",
            "missing_required_parameter",
            "prompt",
        )
    task = state.submit(body["model"], _output_seconds(body.get("duration")), _prompts(body))
    return JSONResponse(
        {
            "id": task.id,
            "task_id": task.id,
            "object": "video.generation.job",
            "model": task.model,
            "status": "queued",
            "progress": 0,
            "created_at": task.created_at,
        }
    )


async def _status(request: Request) -> Response:
    state = _state(request)
    if (denied := _authenticate(request, state.options.api_key)) is not None:
        return denied
    task = state.tasks.peek(request.path_params["task_id"])
    if task is None:
        return _error(404, "Task not found.", "invalid_request_error", "task_not_found", "task_id")
    base = state.options.public_base_url or str(request.base_url)
    return JSONResponse(state.status_body(task, base.rstrip("/")))


async def _file(request: Request) -> Response:
    """GET or HEAD a completed task's video; a single byte ``Range`` answers 206 (unsatisfiable: 416)."""
    state = _state(request)
    task = state.tasks.peek(request.path_params["name"])
    if task is None or not state.is_completed(task):
        return _error(404, "File not found.", "invalid_request_error", "file_not_found")
    data = mp4_bytes(task.seconds)
    headers = {"Accept-Ranges": "bytes"}
    wanted = byte_range(request.headers.get("range"), len(data))
    if wanted == "unsatisfiable":
        headers["Content-Range"] = f"bytes */{len(data)}"
        return Response(status_code=416, headers=headers)
    if wanted is None:
        return Response(data, media_type="video/mp4", headers=headers)
    first, last = wanted
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    return Response(data[first : last + 1], status_code=206, media_type="video/mp4", headers=headers)


def byte_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The inclusive ``(first, last)`` of a single ``bytes=`` range over ``size`` bytes (RFC 9110 section 14).

    None means "send it all": no header, a malformed one, or several ranges (which a server may ignore).

    >>> byte_range("bytes=0-9", 100), byte_range("bytes=-10", 100), byte_range("bytes=95-", 100)
    ((0, 9), (90, 99), (95, 99))
    >>> byte_range("bytes=100-", 100), byte_range("bytes=0-1,5-6", 100)
    ('unsatisfiable', None)
    """
    unit, _, spec = (header or "").partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    start, dash, end = spec.strip().partition("-")
    if not dash or not (start.isdigit() or end.isdigit()) or (start and not start.isdigit()):
        return None
    if end and not end.isdigit():
        return None
    if not start:  # the last `end` bytes
        suffix = int(end)
        return (max(0, size - suffix), size - 1) if suffix > 0 and size > 0 else "unsatisfiable"
    first, last = int(start), int(end) if end else size - 1
    if end and last < first:
        return None  # invalid, so ignored
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "sandbox": True})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods answer in the same JSON shape as everything else."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal error."
    return _error(status, str(detail), "invalid_request_error", "not_found" if status == 404 else "http_error")


def create_sandbox_app(
    options: SandboxOptions,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> Starlette:
    """Build the simulated upstream.

    ``clock`` drives the task lifecycle (inject a fake one in tests); ``wall_clock`` gives the unix
    ``created_at``; ``rng`` decides ``fail_rate`` failures (seed it for reproducible runs).
    """
    app = Starlette(
        routes=[
            Route("/v1/video/generations", _create, methods=["POST"]),
            Route("/v1/videos/{task_id}", _status, methods=["GET"]),
            Route("/sandbox/files/{name}.mp4", _file, methods=["GET"]),
            Route("/sandbox/health", _health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    # Not security-relevant: the coin that decides simulated failures.
    app.state.sandbox = _SandboxState(options, clock, wall_clock, rng or random.Random())  # noqa: S311
    return app


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def mp4_bytes(seconds: int = _DEFAULT_SECONDS) -> bytes:
    """A tiny, structurally valid MP4 (ftyp + moov/mvhd + empty mdat) claiming ``seconds`` of duration."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41")
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(
        b"mvhd",
        # version/flags, creation and modification times, timescale (ms), duration
        struct.pack(">IIIII", 0, 0, 0, 1000, max(seconds, 0) * 1000)
        + struct.pack(">IH", 0x10000, 0x100)  # rate 1.0, volume 1.0
        + bytes(10)  # reserved
        + identity
        + bytes(24)  # pre_defined
        + struct.pack(">I", 1),  # next_track_ID
    )
    return ftyp + _box(b"moov", mvhd) + _box(b"mdat", b"")


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port``; with port 0 the OS picks one (read ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host (another server or the program itself).

    Run it with ``await server.serve(sockets=[sock])`` next to a main server in the same event loop; stop
    it by setting ``should_exit``.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class RunningServer:
    """An app being served on loopback by ``serve_app`` / ``serve_sandbox``."""

    app: ASGIApp
    server: uvicorn.Server
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash (``http://127.0.0.1:54321``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@contextlib.asynccontextmanager
async def serve_app(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    lifespan: Literal["auto", "on", "off"] = "auto",
    log_level: str = "warning",
    http: Any = None,
    timeout_keep_alive: float = 5,
) -> AsyncIterator[RunningServer]:
    """Serve ``app`` in the current event loop for the duration of the block (port 0: the OS picks one).

    The server installs no signal handlers and does not reconfigure logging; leaving the block stops it.
    """
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app,
        lifespan=lifespan,
        log_level=log_level,
        log_config=None,
        access_log=False,
        ws="none",
        # the gateway's own protocol (any factory works), so apps run here exactly as under `kling-gateway serve`
        http=http or listener_protocol(),  # type: ignore[arg-type]
        timeout_graceful_shutdown=1,
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  # a float works; the hint says int
    )
    server = EmbeddedServer(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()  # re-raises what stopped it
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.005)
        yield RunningServer(app=app, server=server, host=host, port=sock.getsockname()[1])
    finally:
        server.should_exit = True
        if not serving.done():
            await serving
        sock.close()


@contextlib.asynccontextmanager
async def serve_sandbox(
    options: SandboxOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Callable[[], float] = time.monotonic,
    log_level: str = "warning",
) -> AsyncIterator[RunningServer]:
    """Serve a fresh sandbox app for the duration of the block; ``running.url`` is its base URL."""
    app = create_sandbox_app(options, clock=clock)
    async with serve_app(app, host=host, port=port, lifespan="off", log_level=log_level) as running:
        yield running
