"""Plain ASGI middleware: request id, one access-log line and the request metrics for every HTTP request.

Plain ASGI (not ``BaseHTTPMiddleware``) keeps contextvars working and costs little per request. Handlers add
fields to the access line through ``log_fields(scope)`` (model, key name, upstream latency, cache result).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.catalog import REQUEST_ID_SHAPE
from gateway.errors import GatewayError, HeadersTooLarge
from gateway.logs import REQUEST_ID, Logger
from gateway.metrics import Metrics

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_SANE_REQUEST_ID = re.compile(REQUEST_ID_SHAPE)
REQUEST_ID_KEY = "gateway.request_id"
LOG_FIELDS_KEY = "gateway.log"
_IDS_PER_DRAW = 256


def request_id_of(scope: Scope) -> str | None:
    value = scope.get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


def current_request_id() -> str:
    """The request id of the request being handled in this context (for calls made on its behalf)."""
    value = REQUEST_ID.get()
    return value if value is not None else uuid.uuid4().hex


def log_fields(scope: Scope) -> dict[str, Any]:
    """Per-request fields that end up on the access-log line."""
    fields: dict[str, Any] = scope.setdefault(LOG_FIELDS_KEY, {})
    return fields


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                return None
            return text if _SANE_REQUEST_ID.fullmatch(text) else None
    return None


async def answer_error(send: Send, error: GatewayError, request_id: str | None) -> None:
    """Send a gateway error from the middleware itself (outside Starlette's exception handlers)."""
    body = error.render(request_id)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _route_of(scope: Scope) -> str:
    """The matched route template (bounded label cardinality), never the raw path."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


class RequestBook:
    """Per-app request bookkeeping: request ids, the header-size limit, request metrics and the access line.

    Shared by ``RequestContextMiddleware`` (every route) and ``gateway.web.fast_lane`` (the two hot routes), so both
    number, limit, count and log requests identically.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        logger: Logger,
        access: Callable[[dict[str, Any]], None] | None = None,
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        self.log = logger
        self.max_header_bytes = max_header_bytes
        self._metrics = metrics
        self._access = access
        # Metric children by (route, method, status): bounded (route templates, known methods) and looked up
        # once, since prometheus_client's labels() is a noticeable share of a cached poll.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # The key's rate-limit headers (``RateLimitHeaders.for_key``), set once the services exist.
        self.rate_headers: Callable[[str], tuple[tuple[bytes, bytes], tuple[bytes, bytes]] | None] | None = None
        # Request ids are 128 random bits, drawn from the OS 256 at a time (not a system call per request).
        self._fresh_ids: Iterator[str] = iter(())

    def rate_pairs(self, fields: dict[str, Any]) -> tuple[tuple[bytes, bytes], ...]:
        """The ``x-ratelimit-*`` header pairs for the response of the key named in ``fields`` (none without one)."""
        key = fields.get("key")
        if self.rate_headers is None or key is None:
            return ()
        return self.rate_headers(key) or ()

    def open(self, scope: Scope) -> tuple[str, dict[str, Any]]:
        """Give the request its id (the client's, if sane) and its access-line fields, both kept in the scope."""
        request_id = _client_request_id(scope) or self._new_id()
        scope[REQUEST_ID_KEY] = request_id
        fields: dict[str, Any] = {}
        scope[LOG_FIELDS_KEY] = fields
        return request_id, fields

    def _new_id(self) -> str:
        request_id = next(self._fresh_ids, None)
        if request_id is None:
            block = os.urandom(16 * _IDS_PER_DRAW).hex()
            self._fresh_ids = iter([block[i : i + 32] for i in range(0, len(block), 32)])
            request_id = next(self._fresh_ids)
        return request_id

    def headers_too_large(self, scope: Scope) -> HeadersTooLarge | None:
        """uvicorn's httptools parser has no header-size limit of its own: ``[server] max_header_bytes`` is here."""
        size = 0
        for name, value in scope["headers"]:
            size += len(name) + len(value)
        if size > self.max_header_bytes:
            return HeadersTooLarge(f"The request headers exceed {self.max_header_bytes} bytes.")
        return None

    def close(self, scope: Scope, request_id: str, fields: dict[str, Any], status: int, elapsed: float) -> None:
        """Count the finished request and write its access line."""
        route = _route_of(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        labels = (route, method, status)
        children = self._children.get(labels)
        if children is None:
            children = (
                self._metrics.requests.labels(route, method, str(status)),
                self._metrics.request_duration.labels(route),
            )
            self._children[labels] = children
        children[0].inc()
        children[1].observe(elapsed)
        if self._access is not None:
            self._access(
                {
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    **fields,
                }
            )

    def unhandled(self, scope: Scope, exc: Exception) -> None:
        self.log.error("unhandled_error", error=type(exc).__name__, route=_route_of(scope))


class RequestContextMiddleware:
    """Request id, header limit, metrics and access line around every HTTP request (see ``RequestBook``)."""

    def __init__(self, app: ASGIApp, *, book: RequestBook) -> None:
        self.app = app
        self._book = book

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        book = self._book
        started = time.perf_counter()
        request_id, fields = book.open(scope)
        status = 500
        started_response = False
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                message["headers"] = [*message.get("headers", ()), header]
                message["headers"].extend(book.rate_pairs(fields))
            await send(message)

        context_token = REQUEST_ID.set(request_id)
        try:
            too_large = book.headers_too_large(scope)
            if too_large is not None:
                await answer_error(send_with_id, too_large, request_id)
                return
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Answer in the gateway's own error shape (with the request id), then let the server log the trace.
            book.unhandled(scope, exc)
            if not started_response:
                await answer_error(send_with_id, GatewayError("The gateway failed to handle this request."), request_id)
            raise
        finally:
            REQUEST_ID.reset(context_token)
            book.close(scope, request_id, fields, status, time.perf_counter() - started)
