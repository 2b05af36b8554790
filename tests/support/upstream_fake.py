"""Real loopback servers for tests: a scripted, byte-level fake upstream and a threaded uvicorn runner.

``FakeUpstream`` is an HTTP/1.1 server written on raw asyncio streams, running its own event loop in a
background thread, so sync and async tests alike can point a real client at ``fake.url``. Each route (a
method and a path prefix; the longest matching prefix wins) has a queue of behaviours, used once each, and
an optional default used once the queue is empty; anything unscripted answers 404 ``not_scripted``::

    with FakeUpstream() as fake:
        fake.script("POST", "/v1/video/generations", json(200, {"id": "task_1"}), reset())
        fake.always("GET", "/v1/videos/", slow(0.5, then=json(200, {"status": "queued"})))
        ...
        assert fake.calls("POST", "/v1/video/generations") == 2
        assert fake.requests[0].header("authorization") == "Bearer sk-upstream"

Behaviours (module-level constructors): ``json``, ``text``, ``invalid_json``, ``huge`` (well-behaved: the
connection is kept alive), ``video`` (a file of deterministic bytes with ranges and HEAD that can be expired),
``redirect``, and the misbehaving ``raw``, ``garbage``, ``truncate``, ``reset`` (RST, before or
mid-response), ``refuse`` (close without answering), ``hang``, ``slow`` (delay, then another behaviour) and
``dynamic`` (a function of the request). ``FakeUpstream.closed_port()`` is a URL nobody listens on;
``stop_listening()`` / ``start_listening()`` take a running fake's port down and back up.

``ServerThread`` serves any ASGI app (the sandbox, the gateway) with uvicorn in a background thread;
``SandboxServer`` is what the ``sandbox_server`` fixture yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import json as jsonlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from starlette.types import ASGIApp

from gateway.sandbox import RunningServer, SandboxOptions, serve_app

_CHUNK = 64 * 1024
_MAX_HEAD = 1 << 20
_START_TIMEOUT_S = 10.0


# --- requests


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it: headers keep their case, order and duplicates."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    version: str = "HTTP/1.1"

    @property
    def path(self) -> str:
        """The target without its query string."""
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return jsonlib.loads(self.body)


class _BadRequest(Exception):
    """The client sent something that is not an HTTP/1.x request."""


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RecordedRequest | None:
    """The next request on the connection, or None when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("connection closed mid-request") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("request head too large") from exc
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line {request_line!r}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    request = RecordedRequest(method, target, headers, b"", version)
    if (request.header("expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if "chunked" in (request.header("transfer-encoding") or "").lower():
        body = await _read_chunked(reader)
    else:
        try:
            length = int(request.header("content-length") or "0")
        except ValueError as exc:
            raise _BadRequest("bad content-length") from exc
        body = await reader.readexactly(length) if length > 0 else b""
    return RecordedRequest(method, target, headers, body, version)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise _BadRequest("bad chunk size") from exc
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _wants_keep_alive(request: RecordedRequest) -> bool:
    connection = (request.header("connection") or "").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def _response_head(status: int, headers: list[tuple[str, str]], content_length: int, keep_alive: bool) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"Content-Length: {content_length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- behaviours


@dataclass
class _Conn:
    """What a behaviour may use to answer: the streams and whether the client wants keep-alive."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    keep_alive: bool


class Behaviour:
    """How the fake answers one request. ``run`` returns True if the connection may serve another one."""

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Respond(Behaviour):
    """A complete, well-formed response with Content-Length."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        head = _response_head(self.status, list(self.headers), len(self.body), conn.keep_alive)
        conn.writer.write(head + (b"" if request.method == "HEAD" else self.body))
        await conn.writer.drain()
        return conn.keep_alive


@dataclass(frozen=True)
class Huge(Behaviour):
    """A well-formed JSON response of exactly ``n_bytes`` body bytes, streamed in chunks."""

    status: int
    n_bytes: int

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        conn.writer.write(
            _response_head(self.status, [("Content-Type", "application/json")], self.n_bytes, conn.keep_alive)
        )
        prefix, suffix = (b'{"pad": "', b'"}') if self.n_bytes >= 11 else (b"", b"")
        remaining = self.n_bytes - len(prefix) - len(suffix)
        conn.writer.write(prefix)
        while remaining > 0:
            step = min(remaining, _CHUNK)
            conn.writer.write(b"x" * step)
            remaining -= step
            await conn.writer.drain()
        conn.writer.write(suffix)
        await conn.writer.drain()
        return conn.keep_alive


@dataclass(frozen=True)
class Raw(Behaviour):
    """Exactly these bytes, then close."""

    data: bytes

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        conn.writer.write(self.data)
        await conn.writer.drain()
        return False


@dataclass(frozen=True)
class Truncate(Behaviour):
    """Content-Length promises ``full_body`` but only its first ``send_bytes`` arrive before the close."""

    status: int
    full_body: bytes
    send_bytes: int

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        head = _response_head(self.status, [("Content-Type", "application/json")], len(self.full_body), True)
        conn.writer.write(head + self.full_body[: self.send_bytes])
        await conn.writer.drain()
        return False


@dataclass(frozen=True)
class Reset(Behaviour):
    """Send ``partial`` (if any), then abort the connection with a TCP RST (SO_LINGER 0)."""

    partial: bytes = b""

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        if self.partial:
            conn.writer.write(self.partial)
            await conn.writer.drain()
            await asyncio.sleep(0.05)  # let the client read the partial response before the reset
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()
        return False


@dataclass(frozen=True)
class Refuse(Behaviour):
    """Close the connection (FIN) without answering."""

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        return False


@dataclass(frozen=True)
class Hang(Behaviour):
    """Never answer; hold the connection until the client gives up or the fake stops."""

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        while await conn.reader.read(_CHUNK):
            pass
        return False


@dataclass(frozen=True)
class Slow(Behaviour):
    """Wait ``delay_s``, then behave as ``then``."""

    delay_s: float
    then: Behaviour

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        await asyncio.sleep(self.delay_s)
        return await self.then.run(conn, request)


@dataclass(frozen=True)
class Dynamic(Behaviour):
    """Behave as ``fn(request)`` says (called in the fake's thread)."""

    fn: Callable[[RecordedRequest], Behaviour]

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        return await self.fn(request).run(conn, request)


def _headers(headers: dict[str, str] | None, content_type: str) -> tuple[tuple[str, str], ...]:
    given = dict(headers or {})
    if not any(k.lower() == "content-type" for k in given):
        given = {"Content-Type": content_type, **given}
    return tuple(given.items())


def json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Respond:
    """A JSON response."""
    return Respond(status, jsonlib.dumps(obj).encode(), _headers(headers, "application/json"))


def text(
    status: int,
    body: str | bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
) -> Respond:
    """A response with any body (an HTML error page from a load balancer, say)."""
    data = body.encode() if isinstance(body, str) else body
    return Respond(status, data, _headers(headers, content_type))


def invalid_json(status: int = 200) -> Respond:
    """A well-formed response whose ``application/json`` body does not parse."""
    return Respond(status, b'{"id": "task_broken", "status": ', (("Content-Type", "application/json"),))


def huge(status: int, n_bytes: int) -> Huge:
    """A well-formed JSON response with a body of ``n_bytes`` bytes."""
    return Huge(status, n_bytes)


def raw(data: bytes) -> Raw:
    """Send exactly ``data`` and close."""
    return Raw(data)


def garbage() -> Raw:
    """Bytes that are not an HTTP response at all, then close."""
    return Raw(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 definitely not HTTP \xff\xfe\r\n\r\n")


def truncate(status: int, full_body: bytes, send_bytes: int) -> Truncate:
    """Promise ``len(full_body)`` bytes, send ``send_bytes`` of them, close."""
    return Truncate(status, full_body, send_bytes)


def reset(partial: bytes = b"") -> Reset:
    """Reset the connection (RST), after sending ``partial`` bytes of a response if given."""
    return Reset(partial)


def refuse() -> Refuse:
    """Read the request, then close without a response."""
    return Refuse()


def hang() -> Hang:
    """Read the request and never answer."""
    return Hang()


def slow(delay_s: float, then: Behaviour) -> Slow:
    """Answer as ``then`` after ``delay_s`` seconds."""
    return Slow(delay_s, then)


def dynamic(fn: Callable[[RecordedRequest], Behaviour]) -> Dynamic:
    """Pick the behaviour from the request (e.g. echo the task id of the path)."""
    return Dynamic(fn)


def fresh_task(prefix: str = "task", status: str = "queued") -> Dynamic:
    """Accept a submission with a new task id each time (an upstream never hands out one id twice)."""
    counter = itertools.count(1)

    def answer(request: RecordedRequest) -> Behaviour:
        task_id = f"{prefix}_{next(counter)}"
        return json(200, {"id": task_id, "task_id": task_id, "status": status})

    return Dynamic(answer)


_PATTERN = bytes(range(251)) * 263  # a cycle of 251 bytes, longer than any offset plus one chunk


def video_bytes(start: int, end: int) -> bytes:
    """Bytes ``start``..``end`` (exclusive) of ``video(size)``'s deterministic content (offset o holds o % 251)."""
    out = bytearray()
    while start < end:
        step = min(end - start, _CHUNK)
        offset = start % 251
        out += _PATTERN[offset : offset + step]
        start += step
    return bytes(out)


@dataclass
class Video(Behaviour):
    """A video file of ``size`` deterministic bytes, streamed, with HEAD and single byte ranges (206/416).

    ``expired`` (settable while running) turns every answer into 403, as an expired signed URL does;
    ``ranges=False`` ignores Range headers (200 with everything); ``etag`` is sent when set.
    """

    size: int
    ranges: bool = True
    expired: bool = False
    etag: str | None = None
    content_type: str = "video/mp4"

    async def run(self, conn: _Conn, request: RecordedRequest) -> bool:
        if self.expired:
            body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            head = _response_head(403, [("Content-Type", "application/xml")], len(body), conn.keep_alive)
            conn.writer.write(head + (b"" if request.method == "HEAD" else body))
            await conn.writer.drain()
            return conn.keep_alive
        headers = [("Content-Type", self.content_type), ("Accept-Ranges", "bytes" if self.ranges else "none")]
        if self.etag:
            headers.append(("ETag", self.etag))
        status, start, end = 200, 0, self.size
        wanted = request.header("range") if self.ranges else None
        if wanted:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            if first:
                start, end = int(first), min(self.size, int(last) + 1 if last else self.size)
            else:
                start, end = max(0, self.size - int(last)), self.size
            if start >= self.size:
                headers.append(("Content-Range", f"bytes */{self.size}"))
                conn.writer.write(_response_head(416, headers, 0, conn.keep_alive))
                await conn.writer.drain()
                return conn.keep_alive
            status = 206
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{self.size}"))
        conn.writer.write(_response_head(status, headers, end - start, conn.keep_alive))
        if request.method != "HEAD":
            position = start
            while position < end:
                step = min(end - position, _CHUNK)
                conn.writer.write(video_bytes(position, position + step))
                position += step
                await conn.writer.drain()
        await conn.writer.drain()
        return conn.keep_alive


def video(size: int, **options: Any) -> Video:
    """A video of ``size`` deterministic bytes with ranges and HEAD (see ``Video``); keep it to expire it later."""
    return Video(size, **options)


def redirect(location: str, status: int = 302) -> Respond:
    """A redirect to ``location``."""
    return Respond(status, b"", (("Location", location),))


def _not_scripted(request: RecordedRequest) -> Respond:
    message = f"fake upstream: nothing scripted for {request.method} {request.path}"
    return json(404, {"error": {"message": message, "type": "invalid_request_error", "code": "not_scripted"}})


# --- threads and loops


class _LoopThread:
    """Runs ``_serve`` in a fresh event loop on a daemon thread; ``start`` returns once it is listening."""

    _thread_name = "loop-thread"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _serve(self) -> None:
        """Start listening, call ``self._ready.set()``, then run until ``self._stop`` is set."""
        raise NotImplementedError

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self._serve()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the starting thread, never lost in this one
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._main, name=self._thread_name, daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError(f"{self._thread_name} did not start")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"{self._thread_name} failed to start") from self._error

    def close(self) -> None:
        """Stop the loop and join the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(stop.set)
        thread.join(_START_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"{self._thread_name} did not stop")

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function in the server's loop and wait for its result."""
        if self._loop is None:
            raise RuntimeError("not started")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(_START_TIMEOUT_S)


@dataclass
class _Route:
    method: str
    prefix: str
    queue: list[Behaviour] = field(default_factory=list)
    default: Behaviour | None = None


class FakeUpstream(_LoopThread):
    """A scripted HTTP/1.1 server on loopback; see the module docstring."""

    _thread_name = "fake-upstream"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], _Route] = {}
        self._requests: list[RecordedRequest] = []
        self._connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # --- lifecycle

    def __enter__(self) -> FakeUpstream:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def closed_port(host: str = "127.0.0.1") -> str:
        """A base URL on a port nothing listens on (connections are refused)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        return f"http://{host}:{port}"

    async def _serve(self) -> None:
        assert self._stop is not None
        await self._listen()
        self._ready.set()
        await self._stop.wait()
        await self._unlisten()

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._on_connection, sock=sock, limit=_MAX_HEAD)

    async def _unlisten(self) -> None:
        """Stop accepting and drop every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def stop_listening(self) -> None:
        """Close the port (connections are refused) and drop open connections; scripts and records stay."""
        self._call(self._unlisten)

    def start_listening(self) -> None:
        """Listen again on the same port after ``stop_listening``."""
        if self._server is None:
            self._call(self._listen)

    # --- script

    def script(self, method: str, path: str, *behaviours: Behaviour, default: Behaviour | None = None) -> None:
        """Queue ``behaviours`` (used once each, in order) for requests whose path starts with ``path``.

        ``method`` may be ``"*"``. ``default`` (if given) answers once the queue is empty.
        """
        with self._lock:
            route = self._routes.setdefault((method.upper(), path), _Route(method.upper(), path))
            route.queue.extend(behaviours)
            if default is not None:
                route.default = default

    def always(self, method: str, path: str, behaviour: Behaviour) -> None:
        """Answer every (not otherwise queued) request of this route with ``behaviour``."""
        self.script(method, path, default=behaviour)

    def _behaviour_for(self, request: RecordedRequest) -> Behaviour:
        with self._lock:
            routes = sorted(
                (
                    r
                    for r in self._routes.values()
                    if r.method in ("*", request.method) and request.path.startswith(r.prefix)
                ),
                key=lambda r: (len(r.prefix), r.method != "*"),
                reverse=True,
            )
            for route in routes:
                if route.queue:
                    return route.queue.pop(0)
                if route.default is not None:
                    return route.default
        return _not_scripted(request)

    # --- records

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (keep-alive reuse shows as fewer connections than requests)."""
        with self._lock:
            return self._connections

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Requests with exactly this method and path (query string ignored)."""
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def calls(self, method: str, path: str) -> int:
        """How many requests had exactly this method and path (query string ignored)."""
        return len(self.requests_to(method, path))

    def wait_for_calls(self, method: str, path: str, n: int = 1, within_s: float = 5.0) -> None:
        """Block until ``calls(method, path) >= n``; AssertionError after ``within_s`` seconds."""
        deadline = time.monotonic() + within_s
        while self.calls(method, path) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: {self.calls(method, path)} calls, wanted {n}")
            time.sleep(0.005)

    async def wait_for_calls_async(self, method: str, path: str, n: int = 1, within_s: float = 5.0) -> None:
        """``wait_for_calls`` for async tests (does not block the test's event loop)."""
        deadline = time.monotonic() + within_s
        while self.calls(method, path) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: {self.calls(method, path)} calls, wanted {n}")
            await asyncio.sleep(0.005)

    # --- connections

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self._lock:
            self._connections += 1
        try:
            while True:
                try:
                    request = await _read_request(reader, writer)
                except _BadRequest:
                    writer.write(_response_head(400, [], 0, keep_alive=False))
                    await writer.drain()
                    break
                if request is None:
                    break
                with self._lock:
                    self._requests.append(request)
                conn = _Conn(reader, writer, _wants_keep_alive(request))
                if not await self._behaviour_for(request).run(conn, request):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away; that is its right
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


# --- ASGI servers


class ServerThread(_LoopThread):
    """Serve an ASGI app with uvicorn on loopback (ephemeral port) in a background thread.

    ``with ServerThread(app) as server: httpx.get(server.url + "/healthz")`` — usable from sync and async
    tests, since the app runs in its own event loop.
    """

    _thread_name = "asgi-server"

    def __init__(self, app: ASGIApp, *, lifespan: Literal["auto", "on", "off"] = "auto", **options: Any) -> None:
        super().__init__()
        self.app = app
        self.lifespan: Literal["auto", "on", "off"] = lifespan
        self.options = options  # more of serve_app's arguments (http, timeout_keep_alive)
        self._running: RunningServer | None = None

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        if self._running is None:
            raise RuntimeError("not started")
        return self._running.url

    @property
    def port(self) -> int:
        if self._running is None:
            raise RuntimeError("not started")
        return self._running.port

    async def _serve(self) -> None:
        assert self._stop is not None
        async with serve_app(self.app, lifespan=self.lifespan, **self.options) as running:
            self._running = running
            self._ready.set()
            await self._stop.wait()


@dataclass(frozen=True)
class SandboxServer:
    """A running sandbox upstream (the ``sandbox_server`` fixture): base URL, required key, options."""

    url: str
    api_key: str
    options: SandboxOptions


# --- accounts


class KlingAccounts:
    """UniAll's per-key behaviour, for a ``FakeUpstream``: each key is an account with its own tasks and limit.

    * a submission with an unknown or revoked key is 401; over the key's concurrency limit it is 429 with Kling's
      code 1303 and ``Retry-After``; otherwise a task owned by that key is created (``queued``);
    * a status poll with another key than the task's is 404 (as UniAll answers), with the owner's key the status;
    * ``finish(task_id)`` completes a task (it stops counting against its key's limit); its ``video_url`` is on
      the fake's own origin (``/videos/<task_id>.mp4``), served only with the owner's key (else 404).

        accounts = KlingAccounts({"sk-a": 1, "sk-b": 0}).install(fake)   # limit 0: none
    """

    def __init__(self, limits: dict[str, int], *, retry_after_s: int = 7) -> None:
        self._lock = threading.Lock()
        self.limits = dict(limits)
        self.revoked: set[str] = set()
        self.retry_after_s = retry_after_s
        self.owner: dict[str, str] = {}
        self.status: dict[str, str] = {}
        self.refusals: list[tuple[str, int]] = []
        self.origin = ""
        self._next = 0

    def install(self, fake: FakeUpstream) -> KlingAccounts:
        self.origin = fake.url
        fake.always("POST", "/v1/video/generations", dynamic(self._submit))
        fake.always("GET", "/v1/videos/", dynamic(self._poll))
        fake.always("GET", "/videos/", dynamic(self._video))
        return self

    def _video(self, request: RecordedRequest) -> Behaviour:
        task_id = request.path.rsplit("/", 1)[-1].removesuffix(".mp4")
        with self._lock:
            if self.owner.get(task_id) != self._key(request) or self.status.get(task_id) != "completed":
                return json(404, {"error": {"message": "not found"}})
        return Respond(200, b"\x00\x00\x00\x18ftypmp42" + task_id.encode(), (("Content-Type", "video/mp4"),))

    @staticmethod
    def _key(request: RecordedRequest) -> str:
        auth = request.header("authorization") or ""
        return auth.removeprefix("Bearer ")

    def running(self, key: str) -> int:
        with self._lock:
            return sum(1 for task, owner in self.owner.items() if owner == key and self.status[task] != "completed")

    def _submit(self, request: RecordedRequest) -> Behaviour:
        key = self._key(request)
        with self._lock:
            if key not in self.limits or key in self.revoked:
                self.refusals.append((key, 401))
                return json(401, {"error": {"message": "invalid api key", "code": "invalid_api_key"}})
            limit = self.limits[key]
            running = sum(1 for t, owner in self.owner.items() if owner == key and self.status[t] != "completed")
            if limit and running >= limit:
                self.refusals.append((key, 429))
                return json(
                    429,
                    {"code": 1303, "message": "parallel task over resource pack limit"},
                    {"Retry-After": str(self.retry_after_s)},
                )
            self._next += 1
            task_id = f"task_{self._next}"
            self.owner[task_id] = key
            self.status[task_id] = "queued"
        return json(200, {"id": task_id, "task_id": task_id, "status": "queued", "progress": 0})

    def _poll(self, request: RecordedRequest) -> Behaviour:
        task_id = request.path.rsplit("/", 1)[-1]
        key = self._key(request)
        with self._lock:
            if self.owner.get(task_id) != key or key in self.revoked:
                return json(404, {"error": {"message": "task not found", "code": "task_not_found"}})
            status = self.status[task_id]
        body: dict[str, Any] = {"id": task_id, "task_id": task_id, "status": status, "progress": 100}
        if status == "completed":
            body["video_url"] = f"{self.origin}/videos/{task_id}.mp4"
            body["seconds"] = 5
        return json(200, body)

    def finish(self, task_id: str) -> None:
        with self._lock:
            self.status[task_id] = "completed"
