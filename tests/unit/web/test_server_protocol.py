"""The server protocol: a response's writes leave together, and HTTP/1.1 behaves exactly as before on a real socket."""

from __future__ import annotations

import asyncio
import pickle
import socket
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.sandbox import serve_app
from gateway.web.listener import HeaderWatch, ListenerLimits
from gateway.web.server_protocol import CoalescedWrites, ListenerProtocolFactory, listener_protocol


class RecordingTransport:
    """The transport methods ``CoalescedWrites`` uses, recording what reaches the socket."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)


def wrap() -> tuple[CoalescedWrites, RecordingTransport]:
    real = RecordingTransport()
    return CoalescedWrites(real, asyncio.get_running_loop()), real  # type: ignore[arg-type]


class TestCoalescedWrites:
    async def test_one_turn_one_write(self) -> None:
        """Head and body written in one turn reach the transport as one write, at the end of the turn."""
        writes, real = wrap()
        writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        writes.write(b"ok")
        assert real.writes == []
        assert writes.get_write_buffer_size() == 40
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

    async def test_later_turns_are_separate_writes(self) -> None:
        writes, real = wrap()
        writes.write(b"a")
        await asyncio.sleep(0)
        writes.writelines([b"b", bytearray(b"c"), b""])
        await asyncio.sleep(0)
        assert real.writes == [b"a", b"bc"]

    async def test_close_sends_what_was_gathered_first(self) -> None:
        writes, real = wrap()
        writes.write(b"last answer")
        writes.close()
        assert real.writes == [b"last answer"] and real.closed
        await asyncio.sleep(0)
        assert real.writes == [b"last answer"]  # the scheduled flush finds nothing left

    async def test_abort_discards(self) -> None:
        writes, real = wrap()
        writes.write(b"never sent")
        writes.abort()
        await asyncio.sleep(0)
        assert real.writes == [] and real.aborted

    async def test_write_eof_flushes(self) -> None:
        writes, real = wrap()
        writes.write(b"tail")
        writes.write_eof()
        assert real.writes == [b"tail"] and real.eof

    async def test_nothing_written_to_a_closing_transport(self) -> None:
        writes, real = wrap()
        writes.write(b"late")
        real.closed = True
        await asyncio.sleep(0)
        assert real.writes == []

    async def test_other_methods_are_the_real_transport(self) -> None:
        writes, _ = wrap()
        assert writes.get_extra_info("peername") == ("127.0.0.1", 5)


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = f"{scope['method']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _exchange(port: int, raw: bytes, answers: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(5):
            while received.count(b"HTTP/1.1 ") < answers or not received.endswith(
                tuple(f"GET /{n}".encode() for n in range(answers))
            ):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
    return received


class TestOnARealSocket:
    async def test_keep_alive_and_pipelining(self) -> None:
        """Three pipelined requests on one connection: three complete answers, in order."""
        async with serve_app(_app, lifespan="off") as server:
            raw = b"".join(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in range(3))
            received = await _exchange(server.port, raw, 3)
        answers = received.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [b"GET /0", b"GET /1", b"GET /2"]

    async def test_connection_close_answered_then_closed(self) -> None:
        """A client's ``Connection: close`` gets its whole answer before the server closes."""
        async with serve_app(_app, lifespan="off") as server:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"GET /0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                received = b""
                while chunk := await asyncio.to_thread(sock.recv, 65536):
                    received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in received.lower()
        assert received.endswith(b"\r\n\r\nGET /0")


class Reader:
    """A connection as ``HeaderWatch`` sees it, recording when it was timed out."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def head_timed_out(self) -> None:
        self.log.append(self.name)


class TestHeaderWatch:
    async def test_heads_time_out_oldest_first(self) -> None:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        watch = HeaderWatch(ListenerLimits(header_timeout_s=0.05))
        a, b, c = Reader("a", log), Reader("b", log), Reader("c", log)
        watch.begin(a, loop)
        await asyncio.sleep(0.02)
        watch.begin(b, loop)
        watch.begin(c, loop)
        watch.done(c)  # finished its head in time
        await asyncio.sleep(0.04)
        assert log == ["a"]
        await asyncio.sleep(0.04)
        assert log == ["a", "b"] and len(watch) == 0

    async def test_past_the_cap_the_oldest_makes_room(self) -> None:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        watch = HeaderWatch(ListenerLimits(header_timeout_s=60, max_connections_reading_headers=2))
        readers = [Reader(str(n), log) for n in range(4)]
        for reader in readers:
            watch.begin(reader, loop)
        assert log == ["0", "1"] and len(watch) == 2


class TestProtocolFactory:
    def test_pickles_with_its_limits_for_worker_processes(self) -> None:
        """``--workers N`` pickles uvicorn's config into each worker: the limits travel, the watches do not."""
        limits = ListenerLimits(header_timeout_s=3, max_connections_reading_headers=7, max_header_bytes=2048)
        copy = pickle.loads(pickle.dumps(listener_protocol(limits)))  # noqa: S301  # our own bytes
        assert isinstance(copy, ListenerProtocolFactory) and copy.limits == limits
