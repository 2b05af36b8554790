"""Overload protection: a bound on requests handled at once and on requests waiting, then a fast 503."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ServiceUnavailable
from gateway.metrics import Metrics
from gateway.web.middleware import log_fields, request_id_of

#: Paths answered however busy the gateway is: they are cheap and tell operators about the overload.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_S = 1


class ConcurrencyLimiter:
    """At most ``limit`` holders; up to ``max_waiting`` more wait (FIFO) at most ``timeout_s`` for a slot.

    A released slot is handed straight to the longest waiter, so a queued request never loses its turn to a newcomer.
    Not thread-safe: one per event loop.
    """

    def __init__(self, limit: int, max_waiting: int, timeout_s: float) -> None:
        if limit < 1 or max_waiting < 0 or timeout_s < 0:
            raise ValueError("limit must be at least 1; max_waiting and timeout_s must not be negative")
        self.limit = limit
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        """Slots held now."""
        return self._held

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return len(self._waiters)

    async def acquire(self) -> bool:
        """True with a slot held (release it with ``release``); False when refused (queue full or wait timed out)."""
        if self._held < self.limit and not self._waiters:
            self._held += 1
            return True
        if len(self._waiters) >= self.max_waiting or self.timeout_s == 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout_s):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return True  # handed a slot just as the wait ran out: keep it
            self._drop(waiter)
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, but the request is gone: pass it on
            else:
                self._drop(waiter)
            raise
        return True

    def release(self) -> None:
        """Give the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held -= 1

    def _drop(self, waiter: asyncio.Future[None]) -> None:
        """Take a waiter that gave up off the queue."""
        waiter.cancel()
        with contextlib.suppress(ValueError):  # already taken off by ``release``
            self._waiters.remove(waiter)


class Overload:
    """The app's in-flight bound and its fast refusal (shared by ``OverloadMiddleware`` and the fast lane)."""

    def __init__(self, metrics: Metrics, *, max_in_flight: int, max_queued: int, queue_timeout_s: float) -> None:
        self.limiter = ConcurrencyLimiter(max_in_flight, max_queued, queue_timeout_s)
        self._metrics = metrics

    async def refuse(self, scope: Scope, send: Send) -> int:
        """Answer 503 overloaded without reading the request, count it, and return the status sent."""
        error = ServiceUnavailable(
            "The gateway is handling as many requests as it can; retry shortly.",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
        self._metrics.rejections.labels(error.code).inc()
        log_fields(scope)["rejected"] = error.code
        body = error.render(request_id_of(scope))
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"retry-after", b"%d" % RETRY_AFTER_S),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return error.status


class OverloadMiddleware:
    """Bounds in-flight and queued HTTP requests; past the bounds, 503 ``overloaded`` within a few milliseconds.

    ``OverloadMiddleware`` is plain ASGI, placed inside ``RequestContextMiddleware`` (so a refusal still carries its
    request id, access-log line and request metrics) and before routing. At most ``[server] max_in_flight`` requests are
    handled at once; up to ``max_queued`` more wait, first come first served, at most ``queue_timeout_s`` for a slot.
    Anything beyond, or a wait that times out, is answered at once with 503 ``overloaded`` (``Retry-After: 1``) in the
    gateway's error shape and counted in ``kling_gateway_rejections_total{code="overloaded"}``, so latency under
    overload stays bounded instead of growing with the backlog. ``/healthz``, ``/readyz`` and ``/metrics`` are never
    held back, so probes and scrapes still see a saturated gateway.

    Upstream calls have their own bound: the aiohttp connector's ``[upstream] max_connections``. A call that finds every
    connection busy waits for one, and that wait counts against ``pool_timeout_s`` (it is part of aiohttp's ``connect``
    bound), after which it fails as a connect error (502 ``upstream_unavailable``).
    """

    def __init__(self, app: ASGIApp, *, overload: Overload, exempt: frozenset[str] = EXEMPT_PATHS) -> None:
        self.app = app
        self.limiter = overload.limiter
        self._overload = overload
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit, queue or refuse one HTTP request; other scopes and exempt paths pass straight through."""
        if scope["type"] != "http" or scope["path"] in self._exempt:
            await self.app(scope, receive, send)
            return
        if not await self.limiter.acquire():
            await self._overload.refuse(scope, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release()
