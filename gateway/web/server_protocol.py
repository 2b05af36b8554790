"""uvicorn's httptools protocol for the gateway: one system call per response, bounded request heads."""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.errors import GatewayError, InvalidRequest
from gateway.web.listener import (
    HeaderWatch,
    HttpVersionNotSupported,
    ListenerLimits,
    Refused,
    head_timed_out,
    head_too_long,
    malformed,
    refusal_bytes,
    target_too_long,
)


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
    """``HttpToolsProtocol`` on a ``CoalescedWrites`` transport.

    uvicorn writes a response's status line and headers, then its body, with two ``transport.write`` calls, and on
    uvloop each is its own ``send``: profiles of a cached status poll put 29% of the gateway's CPU on those two
    lines (``bench/profiles/poll-cached-top.txt``). ``CoalescingHttpToolsProtocol`` hands the protocol a transport
    wrapper that gathers the writes made during one event-loop turn and sends them together at the end of that turn
    (``loop.call_soon``): the head and body of a response become one ``send``, with no added wait. ``close`` sends
    anything gathered first; every other transport method is the real transport's. It is passed to uvicorn as its
    ``http`` protocol class (``kling-gateway serve`` does this).

    ``GatewayHttpProtocol`` adds the listener's limits (``gateway.web.listener``): a deadline and a cap for request
    heads, the request target counted in the header limit, ``Host`` and version checks, refusals answered in order
    after the requests read before them, and requests pipelined after an ``Upgrade`` request answered (upgrades are
    ignored, as RFC 9110 allows). ``listener_protocol(limits)`` is what uvicorn's ``http`` option gets.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport, self.loop))  # type: ignore[arg-type]


class GatewayHttpProtocol(CoalescingHttpToolsProtocol):
    """``CoalescingHttpToolsProtocol`` with the listener's limits (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ListenerLimits,
        watch: HeaderWatch,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._max_head = limits.max_header_bytes
        self._watch = watch
        self._watched = False  # in the watch: a connection with nothing yet, or a head spread over reads
        self._in_head = False  # a byte of the current request has arrived, its head is not complete
        self._heads = 0  # heads begun on this connection
        self._head_room = limits.max_header_bytes  # what the current head's target and fields may still add
        self._head_spill = 0  # bytes of reads that fell wholly inside the current head
        self._hosts = 0
        self._refused = False  # nothing more is read; a refusal is written or waits for earlier answers
        self._refusal: bytes | None = None

    # -- connection ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watched = True
        self._watch.begin(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watched:
            self._watched = False
            self._watch.done(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        heads = self._heads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._after_upgrade(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            self._refuse(refused.error if isinstance(refused, Refused) else malformed())
            return
        except httptools.HttpParserError:
            self._refuse(malformed())
            return
        if self._in_head:
            # A head spread over reads (never the case for a head that arrives whole: no cost on the hot path).
            if not self._watched:
                self._watched = True
                self._watch.begin(self, self.loop)
            elif heads == self._heads:
                # The whole read was inside one head; httptools buffers an unfinished header line whole.
                self._head_spill += len(data)
                if self._head_spill > self._max_head:
                    self._refuse(head_too_long(self._limits))

    def _after_upgrade(self, rest: bytes) -> None:
        """The request asked for an upgrade, which the gateway ignores: parse what follows as HTTP/1.1 again."""
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        if rest:
            self.data_received(rest)

    # -- parser callbacks ---------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heads += 1
        self._in_head = True
        self._head_room = self._max_head
        self._head_spill = 0
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_room -= len(url)
        if self._head_room < 0:
            raise Refused(target_too_long(self._limits))

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # llhttp keeps trailing OWS, which RFC 9110 section 5.5 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"host":
            self._hosts += 1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self._head_room -= len(name) + len(value)
        if self._head_room < 0:
            raise Refused(head_too_long(self._limits))
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._watched:
            self._watched = False
            self._watch.done(self)
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Refused(HttpVersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1."))
        if self._hosts != 1 and (self._hosts > 1 or version == "1.1"):
            raise Refused(InvalidRequest("An HTTP/1.1 request needs exactly one Host header.", code="invalid_host"))
        if self.parser.should_upgrade() and self._declares_body():
            # llhttp would take the body for the upgraded protocol's bytes: refuse rather than guess.
            raise Refused(InvalidRequest("Upgrade requests with a body are not supported.", code="invalid_upgrade"))
        super().on_headers_complete()

    def _should_upgrade_to_ws(self) -> bool:
        return False  # the gateway has no WebSocket routes, whatever libraries are installed

    def _declares_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" \t0")):
                return True
        return False

    # -- refusals -----------------------------------------------------------------------------------------------

    def head_timed_out(self) -> None:
        """Called by the watch: the head took too long, or the cap needed this connection's place."""
        self._watched = False
        if self.transport.is_closing():
            return
        if not self._in_head:
            self.transport.close()  # not one byte of a request: nothing to answer
            return
        self._refuse(head_timed_out(self._limits))

    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` and close, after the answers to the requests read before it."""
        self._refused = True
        if self._watched:
            self._watched = False
            self._watch.done(self)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # The error is in this request's own body.
            queued = [entry for entry in self.pipeline if entry[0] is not cycle]
            if len(queued) == len(self.pipeline):
                self.transport.write(refusal_bytes(error, self.server_state.default_headers))
                self.transport.close()  # the app reading it sees a disconnect
                return
            self.pipeline = deque(queued)
        response = refusal_bytes(error, self.server_state.default_headers)
        if (cycle is None or cycle.response_complete) and not self.pipeline:
            self.transport.write(response)
            self.transport.close()
            return
        self._refusal = response
        self.flow.pause_reading()

    def on_response_complete(self) -> None:
        if self._refusal is not None and not self.pipeline:
            self.server_state.total_requests += 1
            if not self.transport.is_closing():
                self.transport.write(self._refusal)
                self.transport.close()
            self._refusal = None
            return
        super().on_response_complete()


class ListenerProtocolFactory:
    """uvicorn's ``http`` option: builds a ``GatewayHttpProtocol`` per connection, one ``HeaderWatch`` per server.

    Picklable (only the limits travel), so ``--workers N`` subprocesses each get their own watch.
    """

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self._watches: weakref.WeakKeyDictionary[ServerState, HeaderWatch] = weakref.WeakKeyDictionary()

    def __call__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> GatewayHttpProtocol:
        watch = self._watches.get(server_state)
        if watch is None:
            watch = self._watches[server_state] = HeaderWatch(self.limits)
        return GatewayHttpProtocol(config, server_state, app_state, _loop, limits=self.limits, watch=watch)

    def __getstate__(self) -> dict[str, Any]:
        return {"limits": self.limits}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limits"])  # type: ignore[misc]


def listener_protocol(limits: ListenerLimits | None = None) -> ListenerProtocolFactory:
    """What uvicorn's ``http`` option gets (``kling-gateway serve``, ``serve_app``)."""
    return ListenerProtocolFactory(limits or ListenerLimits())
