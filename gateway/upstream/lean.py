"""``LeanTransport``: the gateway's upstream HTTP/1.1 keep-alive client on asyncio protocols and httptools.

Why it exists, its semantics (those of ``AiohttpTransport``) and its hot path are described on the class.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import zlib
from collections import deque
from typing import cast
from urllib.parse import quote, urlsplit

import httptools

from gateway.config import UpstreamSettings
from gateway.upstream.client import BadResponse, ConnectFailed, Headers, TimedOut, UpstreamResponse

__all__ = ["LeanTransport"]

#: Idle keep-alive connections are closed after this long (aiohttp's ``keepalive_timeout`` in AiohttpTransport).
IDLE_TIMEOUT_S = 15.0
#: Timer handles may run a hair early (clock resolution); an expiry this close counts as reached.
_SLACK_S = 0.002
_DEFAULT_PORTS = {"http": 80, "https": 443}
_BODYLESS_METHODS = frozenset({"POST", "PUT", "PATCH"})
_RETRYABLE_METHODS = frozenset({"GET", "HEAD"})
_SAFE_TARGET = "!#$%&'()*+,/:;=?@[]~"
#: Pools kept for origins with no open connection (webhook hosts come and go).
_MAX_EMPTY_POOLS = 64


class _StaleConnection(BadResponse):
    """A reused connection was closed by the peer before any answer byte arrived (GET/HEAD are retried)."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the parser callbacks fill the current exchange, a future reports its end."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        #: The peer closed (EOF or connection lost) or we closed it: never reuse.
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        #: connection_lost has run (the socket is closed); ``lost`` is resolved then, for ``aclose``.
        self.gone = False
        self.lost: asyncio.Future[None] | None = None
        # The current exchange; ``fut`` is None between exchanges.
        self.fut: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.head = False
        self.got_bytes = False
        self.status = 0
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.size = 0
        self.coding: str | None = None
        self.framed = False
        self.until_close = False
        self.keep_alive = False
        self.renew_parser = False
        self.deadline = 0.0
        self.last_read = 0.0

    # --- exchange

    def usable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def start(self, request: bytes, head: bool, deadline: float) -> asyncio.Future[None]:
        """Write ``request`` and return the future that completes once the whole answer is parsed."""
        loop = self.loop
        fut: asyncio.Future[None] = loop.create_future()
        self.fut = fut
        self.head = head
        self.got_bytes = False
        self.status = 0
        self.headers = []
        self.body = []
        self.size = 0
        self.coding = None
        self.framed = False
        self.until_close = False
        self.keep_alive = False
        self.deadline = deadline
        now = loop.time()
        self.last_read = now
        self.timer = loop.call_at(min(deadline, now + self.pool.read_timeout_s), self._on_timer)
        assert self.transport is not None
        self.transport.write(request)
        return fut

    def _finish(self) -> None:
        fut, self.fut = self.fut, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        fut, self.fut = self.fut, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        self.abort()

    def cancel(self) -> None:
        """The caller gave up (cancelled): stop the exchange and drop the connection."""
        self.fut = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close_idle(self) -> None:
        """Close an idle connection politely (FIN after anything still buffered)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _on_timer(self) -> None:
        self.timer = None
        if self.fut is None:
            return
        now = self.loop.time() + _SLACK_S
        pool = self.pool
        if now >= self.deadline:
            self.fail(TimedOut(f"no complete upstream answer within {pool.timeout_s} s"))
        elif now >= self.last_read + pool.read_timeout_s:
            self.fail(TimedOut(f"upstream silent for {pool.read_timeout_s} s while answering"))
        else:
            self.timer = self.loop.call_at(min(self.deadline, self.last_read + pool.read_timeout_s), self._on_timer)

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self.fut is None:  # bytes nobody asked for: the connection's framing can no longer be trusted
            self.abort()
            return
        self.got_bytes = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(BadResponse("upstream switched protocols"))
        except httptools.HttpParserError:
            self.fail(BadResponse("unparseable upstream answer"))
        if self.renew_parser:
            # After a HEAD answer llhttp still expects the body its Content-Length announced.
            self.renew_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        self.closed = True
        self._peer_closed(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gone = True
        self._peer_closed(exc)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    def _peer_closed(self, exc: Exception | None) -> None:
        if self.fut is None:
            return
        if self.until_close and exc is None:
            self._finish()
        elif not self.got_bytes and self.reused:
            self.fail(_StaleConnection("upstream closed a reused connection before answering"))
        else:
            self.fail(BadResponse("upstream closed the connection mid-answer"))

    # --- httptools callbacks

    def on_message_begin(self) -> None:
        if self.fut is None:
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.fut is None:
            return
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        n = len(name)
        if n == 14 or n == 16 or n == 17:
            self._framing_header(name.lower(), value)

    def _framing_header(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            self.framed = True
            limit = self.pool.max_response_bytes
            if value.strip().isdigit() and int(value) > limit:
                self.fail(BadResponse(f"upstream declared an answer larger than {limit} bytes"))
        elif name == b"transfer-encoding":
            self.framed = True
        elif name == b"content-encoding":
            coding = value.strip().lower()
            self.coding = "gzip" if coding in (b"gzip", b"x-gzip") else "deflate" if coding == b"deflate" else None

    def on_headers_complete(self) -> None:
        if self.fut is None:
            return
        status = self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if status < 200:
            return  # interim answer: llhttp reports it complete without a body
        if self.head:
            self.renew_parser = True
            self._finish()
        elif not self.framed and status != 204 and status != 304:
            self.until_close = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self.fut is None:
            return
        self.size += len(body)
        if self.size > self.pool.max_response_bytes:
            self.fail(BadResponse(f"upstream answer exceeds {self.pool.max_response_bytes} bytes"))
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.fut is None:
            return
        if self.status < 200:
            if self.status == 101:
                self.fail(BadResponse("upstream switched protocols"))
                return
            self.headers = []
            self.framed = False
            self.coding = None
            return
        self._finish()


class _Pool:
    """Connections to one (scheme, host, port): idle ones (most recent last), a slot count and FIFO waiters."""

    def __init__(self, transport: LeanTransport, scheme: str, host: str, port: int) -> None:
        settings = transport.settings
        self.loop = asyncio.get_running_loop()
        self.scheme = scheme
        self.host = host
        self.port = port
        self.ssl: ssl.SSLContext | None = transport.ssl_context() if scheme == "https" else None
        host_part = f"[{host}]" if ":" in host else host
        self.host_header = host_part if _DEFAULT_PORTS[scheme] == port else f"{host_part}:{port}"
        self.max_connections = settings.max_connections
        self.timeout_s = settings.timeout_s
        self.read_timeout_s = settings.read_timeout_s
        self.max_response_bytes = settings.max_response_bytes
        self.connect_timeout_s = settings.connect_timeout_s
        self.pool_timeout_s = settings.pool_timeout_s
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        #: Connections open, being opened, or promised to a waiter; never above ``max_connections``.
        self.slots = 0
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def take_idle(self) -> _Connection | None:
        """A live idle connection, or None. Dead or expired ones found on the way are dropped."""
        idle = self.idle
        if not idle:
            return None
        oldest_ok = self.loop.time() - IDLE_TIMEOUT_S
        while idle:
            conn = idle.pop()
            if conn.usable() and conn.idle_since > oldest_ok:
                self.busy.add(conn)
                return conn
            conn.abort()
            self.free_slot()
        return None

    def release(self, conn: _Connection) -> None:
        """Give back a connection after a complete answer: to a waiter, to the idle list, or closed."""
        self.busy.discard(conn)
        if not (conn.keep_alive and conn.usable()):
            conn.abort()
            self.free_slot()
            return
        conn.reused = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.busy.add(conn)
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(conn.idle_since + IDLE_TIMEOUT_S, self._sweep)

    def discard(self, conn: _Connection) -> None:
        """Close a connection that failed, was cancelled or cannot be reused, and free its slot."""
        self.busy.discard(conn)
        conn.abort()
        self.free_slot()

    def free_slot(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter, who opens a connection in it
                return
        self.slots -= 1

    def _sweep(self) -> None:
        self.sweeper = None
        oldest_ok = self.loop.time() - IDLE_TIMEOUT_S
        keep: list[_Connection] = []
        for conn in self.idle:
            if conn.usable() and conn.idle_since > oldest_ok:
                keep.append(conn)
                continue
            if conn.usable():
                conn.close_idle()
            else:
                conn.abort()
            self.free_slot()
        self.idle = keep
        if keep:
            self.sweeper = self.loop.call_at(keep[0].idle_since + IDLE_TIMEOUT_S + _SLACK_S, self._sweep)

    async def acquire(self, deadline: float) -> _Connection:
        """A connection when none is idle: open one in a free slot, or wait FIFO for a slot or a connection."""
        if self.slots < self.max_connections:
            self.slots += 1
            return await self.open(deadline)
        loop = self.loop
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_at(min(deadline, loop.time() + self.pool_timeout_s), self._wait_expired, waiter)
        try:
            got = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed something just as we were cancelled
                handed = waiter.result()
                if handed is None:
                    self.free_slot()
                else:
                    self.discard(handed)
            raise
        finally:
            timer.cancel()
        if got is not None and got.usable():
            return got
        if got is not None:
            self.busy.discard(got)
            got.abort()
        return await self.open(deadline)  # in the slot we were handed

    def _wait_expired(self, waiter: asyncio.Future[_Connection | None]) -> None:
        if not waiter.done():
            waiter.set_exception(ConnectFailed(f"no free upstream connection within {self.pool_timeout_s} s"))
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    async def open(self, deadline: float) -> _Connection:
        """Open a connection in a slot the caller already holds; the slot is freed if that fails."""
        if self.closed:
            self.free_slot()
            raise ConnectFailed("client closed")
        conn = _Connection(self)
        budget = min(self.connect_timeout_s, deadline - self.loop.time())
        try:
            async with asyncio.timeout(budget):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            conn.abort()
            self.free_slot()
            raise ConnectFailed(f"could not connect to the upstream within {budget:.3g} s") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            conn.abort()
            self.free_slot()
            raise ConnectFailed(f"could not connect to the upstream ({type(exc).__name__})") from None
        except BaseException:
            conn.abort()
            self.free_slot()
            raise
        self.busy.add(conn)
        return conn

    def close(self) -> list[_Connection]:
        """Close every connection and fail every waiter; returns the connections not yet fully closed."""
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("client closed"))
        for conn in self.idle:
            conn.close_idle()
        for conn in self.busy:
            if conn.fut is not None:
                conn.fail(BadResponse("client closed during the exchange"))
            else:
                conn.abort()
        conns = [*self.idle, *self.busy]
        self.idle = []
        self.busy = set()
        return conns


async def _exchange(pool: _Pool, conn: _Connection, request: bytes, head: bool, deadline: float) -> None:
    """Run one exchange on ``conn``; on failure the connection is closed and its slot freed, except that a
    stale reused connection (``_StaleConnection``) leaves its slot to the caller, who may retry in it."""
    try:
        await conn.start(request, head, deadline)
    except _StaleConnection:
        pool.busy.discard(conn)
        raise
    except BaseException:
        conn.cancel()
        pool.discard(conn)
        raise


def _request_head(method: str, target: str, host: str, headers: Headers, body: bytes | None) -> bytes:
    """The request line and header block, refusing anything that could split or smuggle a request."""
    block = "".join([f"{name}: {value}\r\n" for name, value in headers])
    n = len(headers)
    if block.count("\n") != n or block.count("\r") != n or "\0" in block:
        raise BadResponse("request header contains CR, LF or NUL; not sent")
    if not target.isascii():
        target = quote(target, safe=_SAFE_TARGET)
    if not (target.isprintable() and method.isprintable()) or " " in target or " " in method:
        raise BadResponse("request target or method contains whitespace or control characters; not sent")
    if body is not None:
        length = f"Content-Length: {len(body)}\r\n"
    elif method in _BODYLESS_METHODS:
        length = "Content-Length: 0\r\n"
    else:
        length = ""
    try:
        return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{block}{length}\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise BadResponse("request header is not latin-1; not sent") from None


def _split_url(url: str) -> tuple[str, str]:
    """``(origin, target)``: ``http://h:1/a?b`` gives ``("http://h:1", "/a?b")``; the fragment is dropped."""
    start = url.find("://") + 3
    end = len(url)
    for stop in "/?#":
        i = url.find(stop, start)
        if 0 <= i < end:
            end = i
    target = url[end:]
    if "#" in target:
        target = target[: target.index("#")]
    if not target.startswith("/"):
        target = "/" + target
    return url[:end], target


def _decompress(data: bytes, coding: str, limit: int) -> bytes:
    """Inflate a gzip or deflate body, refusing more than ``limit`` bytes of output (zip bombs)."""
    if coding == "gzip":
        return _inflate(data, 16 + zlib.MAX_WBITS, limit)
    try:
        return _inflate(data, zlib.MAX_WBITS, limit)
    except zlib.error:
        return _inflate(data, -zlib.MAX_WBITS, limit)  # raw deflate, as some servers send it (aiohttp accepts it)


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise BadResponse(f"upstream answer exceeds {limit} bytes after decompression")
    if not inflater.eof:
        raise BadResponse("upstream sent a truncated compressed body")
    return out


class LeanTransport:
    """Pooled keep-alive HTTP/1.1 client on asyncio protocols and httptools.

    Why it exists: profiles of a forwarded request put ~35 % of the gateway's CPU inside aiohttp's client (request
    building, its stream reader, multidicts, the tracing and cookie machinery the gateway turns off), and a
    prototype on ``httptools`` (the parser uvicorn already uses) saved 60-90 µs per request. The gateway needs a
    small slice of HTTP: one upstream, pooled keep-alive connections, whole bodies buffered, explicit timeouts and
    the error tree of ``gateway.upstream.client``. This class does exactly that and nothing else (no proxies,
    redirects, cookies or streaming). Measured numbers are in ``bench/results-transport.md``.

    Semantics are those of ``AiohttpTransport`` (a drop-in ``Transport``):

    * one pool per (scheme, host, port) holding at most ``max_connections`` connections (busy or idle); a caller
      that finds them all busy waits, first come first served, at most ``pool_timeout_s``;
    * ``ConnectFailed`` -- no connection could be had: refused, DNS, ``connect_timeout_s``, ``pool_timeout_s``, or
      the whole ``timeout_s`` spent before the request was written. It always means *the request was not sent*;
    * ``TimedOut`` -- silence longer than ``read_timeout_s`` while reading, or the exchange exceeded ``timeout_s``;
    * ``BadResponse`` -- reset or EOF mid-answer, truncated or unparseable bytes, an answer (or its decompressed
      body) over ``max_response_bytes``; also a request that cannot be sent safely (CR, LF or NUL in a header or
      the target, a header that is not latin-1, an unsupported URL), as aiohttp's ``ValueError`` mapped to it;
    * a pooled connection is reused only after a complete, keep-alive answer, and is checked for a peer close
      before reuse. If a *reused* connection dies before any answer byte arrives, GET and HEAD are retried once on
      a new connection; any other method raises ``BadResponse`` (the upstream may have acted on it);
    * ``gzip`` and ``deflate`` bodies are decompressed (aiohttp's ``auto_decompress=True``), headers are returned
      as received (the caller drops ``Content-Encoding``);
    * the transport always sets ``Host`` (from the URL) and ``Content-Length``; callers must not pass either
      (``outbound_headers`` drops them).

    Hot path of a request on a warm pool: one dict lookup, pop an idle connection, one ``transport.write``, one
    timer handle (covering the read and the total bound), one future awaited until the parser has seen the whole
    answer. No task, no ``wait_for``, no stream reader.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._pools: dict[str, _Pool] = {}
        self._by_key: dict[tuple[str, str, int], _Pool] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _pool_for(self, origin: str) -> _Pool:
        try:
            parts = urlsplit(origin)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError:
            raise BadResponse("unsupported upstream URL") from None
        if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
            raise BadResponse("unsupported upstream URL (http or https, a host, no credentials)")
        key = (scheme, host, port or _DEFAULT_PORTS[scheme])
        pool = self._by_key.get(key)
        if pool is None:
            if len(self._by_key) >= _MAX_EMPTY_POOLS:
                self._forget_empty_pools()
            pool = self._by_key[key] = _Pool(self, *key)
        self._pools[origin] = pool
        return pool

    def _forget_empty_pools(self) -> None:
        empty = {key for key, pool in self._by_key.items() if pool.slots == 0 and not pool.waiters}
        for key in empty:
            pool = self._by_key.pop(key)
            if pool.sweeper is not None:
                pool.sweeper.cancel()
        self._pools = {origin: pool for origin, pool in self._pools.items() if pool.slots or pool.waiters}

    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse:
        started = time.perf_counter()
        if self._closed:
            raise ConnectFailed("client closed")
        origin, target = _split_url(url)
        pool = self._pools.get(origin) or self._pool_for(origin)
        request = _request_head(method, target, pool.host_header, headers, body)
        if body:
            request += body
        head = method == "HEAD"
        deadline = pool.loop.time() + pool.timeout_s
        conn = pool.take_idle() or await pool.acquire(deadline)
        try:
            await _exchange(pool, conn, request, head, deadline)
        except _StaleConnection:
            if method not in _RETRYABLE_METHODS:
                pool.free_slot()
                raise BadResponse("upstream closed a reused connection before answering") from None
            conn = await pool.open(deadline)  # in the slot the stale connection held
            try:
                await _exchange(pool, conn, request, head, deadline)
            except _StaleConnection:  # pragma: no cover - a new connection is never stale
                pool.free_slot()
                raise BadResponse("upstream closed the connection before answering") from None
        status, response_headers, chunks, coding = conn.status, conn.headers, conn.body, conn.coding
        pool.release(conn)
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if coding is not None and payload:
            try:
                payload = _decompress(payload, coding, pool.max_response_bytes)
            except zlib.error:
                raise BadResponse(f"upstream sent a corrupt {coding} body") from None
        return UpstreamResponse(status, response_headers, payload, time.perf_counter() - started)

    async def aclose(self) -> None:
        """Close every connection (in-flight calls fail with BadResponse, waiters with ConnectFailed)."""
        self._closed = True
        pending: list[asyncio.Future[None]] = []
        for pool in self._by_key.values():
            for conn in pool.close():
                if conn.transport is not None and not conn.gone:
                    conn.lost = pool.loop.create_future()
                    pending.append(conn.lost)
        self._pools.clear()
        self._by_key.clear()
        if pending:
            # Let connection_lost run (and the sockets close) before the caller's loop may stop.
            await asyncio.wait(pending, timeout=1.0)
