"""The listener's own limits: how long a request head may take, how many may be in progress, and what is refused."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from gateway.errors import GatewayError, HeadersTooLarge, InvalidRequest

if TYPE_CHECKING:
    import asyncio

    from gateway.config import ServerSettings


@dataclass(frozen=True)
class ListenerLimits:
    """The listener's bounds (``[server]`` settings); picklable, so ``--workers N`` processes get them too.

    uvicorn's httptools protocol reads a request head for as long as the client takes and counts nothing of it, so
    the gateway's protocol (``gateway.web.server_protocol``) enforces, before any request reaches the app:

    - ``[server] header_timeout_s``: a head (request line and header fields) not complete in time gets 408
      ``request_timeout`` if any byte of it arrived; a connection that sent nothing is closed.
    - ``[server] max_connections_reading_headers``: past that many connections in the middle of a head, the one that
      has waited longest is timed out as above, so slow senders cannot hold every descriptor and newcomers (a
      ``/healthz`` probe) still get in.
    - ``[server] max_header_bytes``: a request target longer than it gets 414 ``uri_too_long``; request target plus
      header fields longer than it get 431 ``headers_too_large``.
    - RFC 9112: an HTTP/1.1 request without ``Host``, or any request with two, gets 400 ``invalid_host``; any version
      but 1.0 and 1.1 gets 505 ``http_version_not_supported``; a malformed request 400 ``invalid_http_request``.

    Refusals use the gateway's JSON error body, carry ``X-Request-ID`` and close the connection; requests read before
    the refused one are answered first, in order. ``HeaderWatch`` keeps, in arrival order, the connections that have
    sent nothing yet or whose head spans more than one read (a head that arrives whole never enters it), so one timer
    (for the oldest) serves them all.
    """

    header_timeout_s: float = 10.0
    max_connections_reading_headers: int = 256
    max_header_bytes: int = 16 * 1024

    @classmethod
    def of(cls, server: ServerSettings) -> ListenerLimits:
        return cls(
            header_timeout_s=server.header_timeout_s,
            max_connections_reading_headers=server.max_connections_reading_headers,
            max_header_bytes=server.max_header_bytes,
        )


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class UriTooLong(GatewayError):
    status = 414
    type = "invalid_request_error"
    default_code = "uri_too_long"


class HttpVersionNotSupported(GatewayError):
    status = 505
    type = "invalid_request_error"
    default_code = "http_version_not_supported"


class Refused(Exception):
    """Raised from a parser callback to stop parsing and answer ``error`` instead."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def malformed() -> GatewayError:
    return InvalidRequest("The request is not valid HTTP/1.1.", code="invalid_http_request")


def head_too_long(limits: ListenerLimits) -> GatewayError:
    return HeadersTooLarge(f"The request target and headers exceed {limits.max_header_bytes} bytes.")


def target_too_long(limits: ListenerLimits) -> GatewayError:
    return UriTooLong(f"The request target exceeds {limits.max_header_bytes} bytes.")


def head_timed_out(limits: ListenerLimits) -> GatewayError:
    return RequestTimeout(f"The request headers did not arrive within {limits.header_timeout_s:g} s.")


def refusal_bytes(error: GatewayError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete response for ``error`` that closes the connection (written by the protocol, not the app)."""
    request_id = uuid.uuid4().hex
    body = error.render(request_id)
    head = [STATUS_LINE[error.status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-request-id: ",
        request_id.encode("ascii"),
        b"\r\nconnection: close\r\n\r\n",
        body,
    ]
    return b"".join(head)


class HeadReader(Protocol):
    """What ``HeaderWatch`` needs of a connection."""

    def head_timed_out(self) -> None: ...


class HeaderWatch:
    """The connections of one server that are reading a request head, oldest first, under one timer.

    Entries are added in arrival order and the timeout is the same for all, so the first entry is always the
    next to expire: the timer is armed for it alone, and a spurious wake (its owner finished) just re-arms.
    """

    _timer_slack_s: ClassVar[float] = 0.001

    def __init__(self, limits: ListenerLimits) -> None:
        self._timeout_s = limits.header_timeout_s
        self._cap = limits.max_connections_reading_headers
        self._reading: dict[HeadReader, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._reading)

    def begin(self, reader: HeadReader, loop: asyncio.AbstractEventLoop) -> None:
        """``reader`` starts reading a head; past the cap, the oldest reader is timed out to make room."""
        reading = self._reading
        if len(reading) >= self._cap:
            oldest = next(iter(reading))
            del reading[oldest]
            oldest.head_timed_out()
        now = loop.time()
        reading[reader] = now
        if self._timer is None:
            self._loop = loop
            self._timer = loop.call_at(now + self._timeout_s, self._expire)

    def done(self, reader: HeadReader) -> None:
        self._reading.pop(reader, None)

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        reading = self._reading
        cutoff = loop.time() - self._timeout_s + self._timer_slack_s
        while reading:
            reader, started = next(iter(reading.items()))
            if started > cutoff:
                self._timer = loop.call_at(started + self._timeout_s, self._expire)
                return
            del reading[reader]
            reader.head_timed_out()
