"""LeanTransport against real loopback servers: framing, pooling, timeouts, failures and cancellation.

Most cases use the scripted ``FakeUpstream``; the byte-exact ones (chunked, read-until-close, trickling,
interim answers, a server that keeps a connection open after ``Connection: close``) use ``RawServer``, a tiny
asyncio server started in the test's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import io
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support.upstream_fake import FakeUpstream, Respond, garbage, hang, huge, json, refuse, reset, slow, text, truncate

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamUnavailable
from gateway.logs import make_logger
from gateway.metrics import create_metrics
from gateway.upstream import lean as upstream_lean
from gateway.upstream.client import BadResponse, ConnectFailed, TimedOut, UpstreamClient, UpstreamResponse
from gateway.upstream.lean import LeanTransport

KEY = "sk-upstream-canary"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def settings(base_url: str = "http://127.0.0.1", **overrides: Any) -> UpstreamSettings:
    values: dict[str, Any] = {
        "base_url": base_url,
        "timeout_s": 2.0,
        "connect_timeout_s": 0.5,
        "read_timeout_s": 1.0,
        "pool_timeout_s": 0.5,
        "max_connections": 8,
        **overrides,
    }
    return UpstreamSettings(**values)


@contextlib.asynccontextmanager
async def lean(**overrides: Any) -> AsyncIterator[LeanTransport]:
    transport = LeanTransport(settings(**overrides))
    try:
        yield transport
    finally:
        await transport.aclose()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """One request head (the raw-server requests in these tests carry no body)."""
    return await reader.readuntil(b"\r\n\r\n")


class RawServer:
    """An asyncio server in the test loop; counts connections and the most that were open at once."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.open_now -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def serve_each(answer: Callable[[bytes], bytes], counter: list[int] | None = None) -> Handler:
    """A keep-alive handler: for every request head, write ``answer(head)``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            if counter is not None:
                counter[0] += 1
            writer.write(answer(head))
            await writer.drain()

    return handler


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# --- round trips


async def test_get_and_post_round_trip_preserve_headers_and_body(fake_upstream: FakeUpstream) -> None:
    """Request headers arrive in order (duplicates kept), the body exactly; response headers come back as sent."""
    fake_upstream.script(
        "POST",
        "/v1/video/generations",
        Respond(201, b'{"id":"t1"}', (("Content-Type", "application/json"), ("X-Dup", "a"), ("X-Dup", "b"))),
    )
    fake_upstream.always("GET", "/v1/videos/", json(200, {"status": "queued"}))
    async with lean(base_url=fake_upstream.url) as transport:
        sent = [("Authorization", f"Bearer {KEY}"), ("X-Twice", "1"), ("X-Twice", "2"), ("Content-Type", "a/b")]
        posted = await transport.send("POST", fake_upstream.url + "/v1/video/generations", sent, b'{"a":1}')
        got = await transport.send("GET", fake_upstream.url + "/v1/videos/t1?x=1&y=2", sent[:1], None)
    assert isinstance(posted, UpstreamResponse)
    assert (posted.status, posted.body) == (201, b'{"id":"t1"}')
    assert [(k, v) for k, v in posted.headers if k == "X-Dup"] == [("X-Dup", "a"), ("X-Dup", "b")]
    assert posted.header("content-length") == "11" and posted.elapsed_s > 0
    assert (got.status, got.body) == (200, b'{"status": "queued"}')
    post, get = fake_upstream.requests
    assert post.headers == [("Host", f"127.0.0.1:{fake_upstream.port}"), *sent, ("Content-Length", "7")]
    assert post.body == b'{"a":1}'
    assert (get.method, get.target, get.body) == ("GET", "/v1/videos/t1?x=1&y=2", b"")
    assert get.header("content-length") is None


async def test_post_without_body_sends_content_length_zero(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("*", "/", json(200, {}))
    async with lean() as transport:
        await transport.send("POST", fake_upstream.url + "/v1/a", [], None)
        await transport.send("DELETE", fake_upstream.url + "/v1/a", [], None)
    post, delete = fake_upstream.requests
    assert post.header("content-length") == "0"
    assert delete.header("content-length") is None


async def test_keep_alive_reuses_one_connection(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(200, {"status": "queued"}))
    async with lean() as transport:
        for _ in range(10):
            assert (await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)).status == 200
    assert fake_upstream.connections == 1
    assert len(fake_upstream.requests) == 10


async def test_chunked_body() -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\n"
    async with RawServer(serve_each(lambda head: answer)) as server, lean() as transport:
        for _ in range(2):
            response = await transport.send("GET", server.url + "/", [], None)
            assert (response.status, response.body) == (200, b"hello world")
    assert server.connections == 1


async def test_read_until_close_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"part two")

    async with RawServer(handler) as server, lean() as transport:
        response = await transport.send("GET", server.url + "/", [], None)
        assert (response.status, response.body) == (200, b"part one, part two")
        response = await transport.send("GET", server.url + "/", [], None)  # never reused: a new connection
    assert server.connections == 2


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_and_connection_reused(status: int) -> None:
    """204/304 carry no body even with a Content-Length; the connection stays usable."""
    counter = [0]

    def answer(head: bytes) -> bytes:
        if counter[0] == 1:
            return b"HTTP/1.1 %d X\r\nContent-Length: 10\r\nETag: e\r\n\r\n" % status
        return ok()

    async with RawServer(serve_each(answer, counter)) as server, lean() as transport:
        first = await transport.send("GET", server.url + "/", [], None)
        second = await transport.send("GET", server.url + "/", [], None)
    assert (first.status, first.body, first.header("etag")) == (status, b"", "e")
    assert (second.status, second.body) == (200, b"ok")
    assert server.connections == 1


async def test_head_has_no_body_and_keeps_the_connection(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("*", "/v1/videos/", json(200, {"status": "queued"}))
    async with lean() as transport:
        head = await transport.send("HEAD", fake_upstream.url + "/v1/videos/t", [], None)
        get = await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "20")
    assert (get.status, get.body) == (200, b'{"status": "queued"}')
    assert fake_upstream.connections == 1


async def test_interim_100_continue_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + ok(b"final", b"X-Final: 1\r\n")
    async with RawServer(serve_each(lambda head: answer)) as server, lean() as transport:
        response = await transport.send("POST", server.url + "/", [], b"{}")
    assert (response.status, response.body) == (200, b"final")
    assert response.headers == [("Content-Length", "5"), ("X-Final", "1")]


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some servers send it
    ],
)
async def test_compressed_bodies_are_decompressed(
    fake_upstream: FakeUpstream, coding: str, compress: Callable[[bytes], bytes]
) -> None:
    plain = b'{"status": "succeeded", "pad": "' + b"x" * 5000 + b'"}'
    fake_upstream.always("GET", "/v1/", text(200, compress(plain), "application/json", {"Content-Encoding": coding}))
    async with lean() as transport:
        response = await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert response.body == plain
    assert response.header("content-encoding") == coding


# --- pooling


async def test_pool_bound_holds_under_concurrency(fake_upstream: FakeUpstream) -> None:
    """max_connections=2 and 5 concurrent slow calls: every call answered, never more than 2 connections."""
    fake_upstream.always("GET", "/v1/videos/", slow(0.1, json(200, {"status": "queued"})))
    async with lean(max_connections=2, pool_timeout_s=2.0) as transport:
        url = fake_upstream.url + "/v1/videos/t"
        responses = await asyncio.gather(*(transport.send("GET", url, [], None) for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    assert fake_upstream.connections == 2


async def test_pool_bound_counts_concurrent_connections() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            await asyncio.sleep(0.05)
            writer.write(ok())

    async with RawServer(handler) as server, lean(max_connections=2, pool_timeout_s=2.0) as transport:
        await asyncio.gather(*(transport.send("GET", server.url + "/", [], None) for _ in range(5)))
    assert server.max_open == 2


async def test_pool_wait_timeout_is_connect_failed(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/slow", slow(0.4, json(200, {})))
    async with lean(max_connections=1, pool_timeout_s=0.1) as transport:
        busy = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/slow", [], None))
        await fake_upstream.wait_for_calls_async("GET", "/v1/slow")
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            await transport.send("GET", fake_upstream.url + "/v1/slow", [], None)
        assert type(info.value) is ConnectFailed
        assert 0.05 < time.monotonic() - started < 0.35
        assert (await busy).status == 200
    assert fake_upstream.calls("GET", "/v1/slow") == 1


async def test_waiters_are_served_first_come_first_served(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/", slow(0.05, json(200, {})))
    order: list[int] = []
    async with lean(max_connections=1, pool_timeout_s=2.0) as transport:

        async def call(i: int) -> None:
            await transport.send("GET", f"{fake_upstream.url}/v1/{i}", [], None)
            order.append(i)

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(call(i)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert [r.path for r in fake_upstream.requests] == ["/v1/0", "/v1/1", "/v1/2", "/v1/3"]


async def test_connection_close_answer_is_not_reused() -> None:
    """The server keeps the socket open after ``Connection: close``; the client must still not reuse it."""
    answers = [ok(extra=b"Connection: close\r\n"), ok(b"second")]
    async with RawServer(serve_each(lambda head: answers.pop(0) if answers else ok())) as server:
        async with lean() as transport:
            await transport.send("GET", server.url + "/", [], None)
            await transport.send("GET", server.url + "/", [], None)
        assert server.connections == 2


async def test_http10_answer_without_keep_alive_is_not_reused() -> None:
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(serve_each(lambda head: answer)) as server, lean() as transport:
        for _ in range(2):
            assert (await transport.send("GET", server.url + "/", [], None)).body == b"ok"
    assert server.connections == 2


async def test_idle_connections_are_closed_after_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_lean, "IDLE_TIMEOUT_S", 0.05)
    async with RawServer(serve_each(lambda head: ok())) as server, lean() as transport:
        await transport.send("GET", server.url + "/", [], None)
        assert server.open_now == 1
        for _ in range(100):
            await asyncio.sleep(0.01)
            if server.open_now == 0:
                break
        assert server.open_now == 0  # the client closed it
        await transport.send("GET", server.url + "/", [], None)
    assert server.connections == 2


async def test_stale_pooled_connection_closed_by_server_is_not_used() -> None:
    """The server closes the idle connection between calls: the next GET opens a new one and succeeds."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(ok())
        await writer.drain()

    async with RawServer(handler) as server, lean() as transport:
        assert (await transport.send("GET", server.url + "/", [], None)).status == 200
        await asyncio.sleep(0.05)  # the FIN reaches the client while the connection is idle
        assert (await transport.send("POST", server.url + "/", [], b"{}")).status == 200
    assert server.connections == 2


async def test_reused_connection_closed_as_get_is_written_is_retried_once(fake_upstream: FakeUpstream) -> None:
    """The race the idle check cannot see: the peer closes a reused connection without answering the GET."""
    fake_upstream.script("GET", "/v1/videos/", json(200, {"n": 1}), refuse(), json(200, {"n": 2}))
    async with lean() as transport:
        await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
        response = await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert response.body == b'{"n": 2}'
    assert fake_upstream.calls("GET", "/v1/videos/t") == 3
    assert fake_upstream.connections == 2


async def test_reused_connection_closed_on_post_is_bad_response_not_retried(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script("POST", "/v1/video/generations", json(200, {"id": "a"}), refuse(), json(200, {"id": "b"}))
    async with lean() as transport:
        url = fake_upstream.url + "/v1/video/generations"
        await transport.send("POST", url, [], b"{}")
        with pytest.raises(BadResponse) as info:
            await transport.send("POST", url, [], b"{}")
    assert type(info.value) is BadResponse
    assert fake_upstream.calls("POST", "/v1/video/generations") == 2  # one per call: the second not retried


async def test_fresh_connection_closed_without_answer_is_bad_response(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script("GET", "/v1/videos/", refuse())
    async with lean() as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert type(info.value) is BadResponse
    assert fake_upstream.calls("GET", "/v1/videos/t") == 1


# --- connect failures and timeouts


async def test_connection_refused_is_connect_failed() -> None:
    async with lean() as transport:
        with pytest.raises(ConnectFailed) as info:
            await transport.send("GET", FakeUpstream.closed_port() + "/v1/videos/t", [], None)
    assert type(info.value) is ConnectFailed


async def test_dns_failure_is_connect_failed() -> None:
    async with lean() as transport:
        with pytest.raises(ConnectFailed) as info:
            await transport.send("GET", "http://does-not-exist.invalid/v1/videos/t", [], None)
    assert type(info.value) is ConnectFailed


async def test_connect_timeout_is_connect_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handshake that never completes (patched: no loopback address blackholes reliably)."""
    loop = asyncio.get_running_loop()

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(loop, "create_connection", never)
    async with lean(connect_timeout_s=0.1) as transport:
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            await transport.send("GET", "http://127.0.0.1:9/v1/videos/t", [], None)
        assert time.monotonic() - started < 0.5
        assert type(info.value) is ConnectFailed
        # the slot was given back: a second attempt times out the same way instead of waiting for the pool
        with pytest.raises(ConnectFailed):
            await transport.send("GET", "http://127.0.0.1:9/v1/videos/t", [], None)


async def test_read_silence_is_timed_out(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/videos/", hang())
    async with lean(read_timeout_s=0.15) as transport:
        started = time.monotonic()
        with pytest.raises(TimedOut) as info:
            await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert type(info.value) is TimedOut
    assert 0.1 < time.monotonic() - started < 0.6


async def test_total_timeout_with_trickling_server() -> None:
    """A byte every 30 ms never trips the read bound, but the whole exchange is bounded by timeout_s."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.03)

    async with RawServer(handler) as server, lean(read_timeout_s=0.2, timeout_s=0.4) as transport:
        started = time.monotonic()
        with pytest.raises(TimedOut) as info:
            await transport.send("GET", server.url + "/", [], None)
        assert type(info.value) is TimedOut
        assert 0.35 < time.monotonic() - started < 0.8


# --- broken answers


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(reset(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial'), id="reset-mid-body"),
        pytest.param(reset(), id="reset-before-answer"),
        pytest.param(truncate(200, b"x" * 100, 10), id="truncated-content-length"),
        pytest.param(garbage(), id="garbage"),
        pytest.param(Respond(200, b"x" * 2000), id="declared-too-large"),
        pytest.param(huge(200, 5000), id="streamed-too-large"),
    ],
)
async def test_broken_answers_are_bad_response(fake_upstream: FakeUpstream, behaviour: Any) -> None:
    fake_upstream.script("GET", "/v1/videos/", behaviour)
    fake_upstream.always("GET", "/v1/after", json(200, {}))
    async with lean(max_response_bytes=1000, max_connections=1) as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
        assert type(info.value) is BadResponse
        assert (await transport.send("GET", fake_upstream.url + "/v1/after", [], None)).status == 200


async def test_garbage_status_line_is_bad_response() -> None:
    answer = b"HTTP/1.1 2x0 NOPE\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(serve_each(lambda head: answer)) as server, lean() as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", server.url + "/", [], None)
    assert type(info.value) is BadResponse


async def test_chunked_too_large_is_bad_response() -> None:
    chunk = b"x" * 600
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n%s\r\n258\r\n%s\r\n0\r\n\r\n" % (
        chunk,
        chunk,
    )
    async with RawServer(serve_each(lambda head: answer)) as server, lean(max_response_bytes=1000) as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", server.url + "/", [], None)
    assert type(info.value) is BadResponse


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_decompression_bomb_is_bad_response(fake_upstream: FakeUpstream, coding: str) -> None:
    bomb = (gzip.compress if coding == "gzip" else zlib.compress)(b"0" * 1_000_000)
    assert len(bomb) < 5000
    fake_upstream.always("GET", "/v1/", text(200, bomb, "application/json", {"Content-Encoding": coding}))
    async with lean(max_response_bytes=10_000) as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert type(info.value) is BadResponse
    assert "exceeds" in str(info.value)


async def test_corrupt_gzip_is_bad_response(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/", text(200, b"not gzip at all", "application/json", {"Content-Encoding": "gzip"}))
    async with lean() as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", fake_upstream.url + "/v1/videos/t", [], None)
    assert type(info.value) is BadResponse


async def test_unsolicited_bytes_after_an_answer_close_the_connection() -> None:
    answer = ok() + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    async with RawServer(serve_each(lambda head: answer)) as server, lean() as transport:
        for _ in range(2):
            assert (await transport.send("GET", server.url + "/", [], None)).body == b"ok"
    assert server.connections == 2


# --- refused requests


@pytest.mark.parametrize(
    "headers",
    [
        [("X-A", "v\r\nX-Injected: 1")],
        [("X-A", "v\nX-Injected: 1")],
        [("X-A", "v\rx")],
        [("X-A", "v\0x")],
        [("X-A\r\nX-Injected", "1")],
        [("X-A", "caf\u20ac")],
    ],
)
async def test_unsafe_headers_are_refused_unsent(fake_upstream: FakeUpstream, headers: list[tuple[str, str]]) -> None:
    async with lean() as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", fake_upstream.url + "/v1/videos/t", [("Authorization", KEY), *headers], None)
    assert type(info.value) is BadResponse
    assert KEY not in str(info.value) and "Injected" not in str(info.value)
    assert fake_upstream.connections == 0


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/x", "http:///x"])
async def test_unsupported_urls_are_refused(url: str) -> None:
    async with lean() as transport:
        with pytest.raises(BadResponse) as info:
            await transport.send("GET", url, [], None)
    assert type(info.value) is BadResponse
    assert "pw" not in str(info.value)


async def test_target_with_control_characters_is_refused(fake_upstream: FakeUpstream) -> None:
    async with lean() as transport:
        with pytest.raises(BadResponse):
            await transport.send("GET", fake_upstream.url + "/v1/a b", [], None)
        with pytest.raises(BadResponse):
            await transport.send("GET", fake_upstream.url + "/v1/a\r\nX: y", [], None)
    assert fake_upstream.connections == 0


# --- cancellation and closing


async def test_cancelled_call_releases_its_slot_without_warnings(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/hang", hang())
    fake_upstream.always("GET", "/v1/ok", json(200, {}))
    async with lean(max_connections=1, pool_timeout_s=0.3) as transport:
        task = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/hang", [], None))
        await fake_upstream.wait_for_calls_async("GET", "/v1/hang")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        response = await transport.send("GET", fake_upstream.url + "/v1/ok", [], None)
        assert response.status == 200
        # a cancelled waiter gives its place up too
        hung = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/hang", [], None))
        await fake_upstream.wait_for_calls_async("GET", "/v1/hang", 2)
        waiter = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/ok", [], None))
        await asyncio.sleep(0.02)
        waiter.cancel()
        hung.cancel()
        await asyncio.gather(waiter, hung, return_exceptions=True)
        assert (await transport.send("GET", fake_upstream.url + "/v1/ok", [], None)).status == 200
    assert fake_upstream.connections == 3  # the cancelled connections were closed, not pooled
    gc.collect()


async def test_cancelled_connect_releases_its_slot(
    monkeypatch: pytest.MonkeyPatch, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.always("GET", "/v1/ok", json(200, {}))
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    gate = asyncio.Event()

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", slow_connect)
    async with lean(max_connections=1, pool_timeout_s=0.3) as transport:
        task = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/ok", [], None))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        assert (await transport.send("GET", fake_upstream.url + "/v1/ok", [], None)).status == 200


async def test_aclose_then_send_is_connect_failed(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/", json(200, {}))
    transport = LeanTransport(settings())
    await transport.send("GET", fake_upstream.url + "/v1/a", [], None)
    await transport.aclose()
    with pytest.raises(ConnectFailed) as info:
        await transport.send("GET", fake_upstream.url + "/v1/a", [], None)
    assert type(info.value) is ConnectFailed and str(info.value) == "client closed"
    await transport.aclose()  # idempotent


async def test_aclose_fails_in_flight_calls_and_waiters(fake_upstream: FakeUpstream) -> None:
    fake_upstream.always("GET", "/v1/hang", hang())
    transport = LeanTransport(settings(max_connections=1, pool_timeout_s=2.0))
    busy = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/hang", [], None))
    await fake_upstream.wait_for_calls_async("GET", "/v1/hang")
    waiting = asyncio.create_task(transport.send("GET", fake_upstream.url + "/v1/hang", [], None))
    await asyncio.sleep(0.02)
    await transport.aclose()
    with pytest.raises(BadResponse):
        await busy
    with pytest.raises(ConnectFailed):
        await waiting


# --- behind UpstreamClient (the production wiring)


async def test_upstream_client_over_lean_transport(fake_upstream: FakeUpstream) -> None:
    """Key injection, the client's credentials dropped, and GET retries on connect errors end to end."""
    fake_upstream.always("POST", "/v1/video/generations", json(200, {"id": "t1"}))
    cfg = settings(base_url=fake_upstream.url)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = UpstreamClient(
        cfg,
        KEY,
        LeanTransport(cfg),
        create_metrics(),
        sleep=sleep,
        jitter=lambda: 1.0,
        log=make_logger(stream=io.StringIO()),
    )
    response = await client.request(
        "POST",
        "/v1/video/generations",
        route="r",
        request_id="rid-1",
        client_headers=[("Authorization", "Bearer gk_client"), ("Content-Type", "application/json")],
        body=b'{"a":1}',
    )
    await client.aclose()
    assert (response.status, response.body) == (200, b'{"id": "t1"}')
    seen = fake_upstream.requests[0]
    assert seen.header_values("authorization") == [f"Bearer {KEY}"]
    assert seen.header("x-request-id") == "rid-1" and seen.body == b'{"a":1}'

    closed = settings(base_url=FakeUpstream.closed_port())
    client = UpstreamClient(
        closed,
        KEY,
        LeanTransport(closed),
        create_metrics(),
        sleep=sleep,
        jitter=lambda: 1.0,
        log=make_logger(stream=io.StringIO()),
    )
    with pytest.raises(UpstreamUnavailable):
        await client.request("GET", "/v1/videos/t", route="r", request_id="rid-2")
    assert len(sleeps) == closed.get_retries
    await client.aclose()
