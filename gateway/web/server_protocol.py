"""uvicorn's httptools protocol with one change: a response's writes leave in one system call.

uvicorn writes a response's status line and headers, then its body, with two ``transport.write`` calls, and on
uvloop each is its own ``send``: profiles of a cached status poll put 29% of the gateway's CPU on those two
lines (``bench/profiles/poll-cached-top.txt``). ``CoalescingHttpToolsProtocol`` hands the protocol a transport
wrapper that gathers the writes made during one event-loop turn and sends them together at the end of that turn
(``loop.call_soon``): the head and body of a response become one ``send``, with no added wait. ``close`` sends
anything gathered first; every other transport method is the real transport's. It is passed to uvicorn as its
``http`` protocol class (``kling-gateway serve`` does this); nothing else about uvicorn changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescedWrites:
    """A transport whose writes within one event-loop turn go out as one write of the real transport."""

    __slots__ = ("_chunks", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._chunks: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._chunks.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what was gathered (called at the end of the turn, and before closing)."""
        self._scheduled = False
        chunks = self._chunks
        if not chunks:
            return
        self._chunks = []
        if self._transport.is_closing():
            return
        self._transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._chunks)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._chunks = []
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` on a ``CoalescedWrites`` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport, self.loop))  # type: ignore[arg-type]


#: uvicorn's ``http`` setting for this protocol (an import string also works in ``--workers N`` subprocesses).
HTTP_PROTOCOL = f"{__name__}:CoalescingHttpToolsProtocol"
