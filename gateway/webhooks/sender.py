"""Completion webhooks: a key's callback URL receives each task's terminal status, signed, retried with backoff.

Off unless configured. On a terminal status the gateway POSTs the upstream's status body unchanged with::

    Content-Type: application/json
    X-Gateway-Event: task.terminal
    X-Gateway-Delivery: <id, the same on every retry of one delivery, for de-duplication>
    X-Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body, keyed with the webhook secret>

Receivers recompute the HMAC over the raw body and reject timestamps far from their clock (``verify`` does both;
several ``v1=`` values are accepted, so a secret can be rotated). Callback URLs are checked like media URLs
(``check_webhook_url``): absolute http(s), no credentials, no private, loopback or local hosts. Redirects are
not followed (a 3xx is a failed attempt), so a public URL cannot bounce a delivery into a private network; an
optional ``MediaGuard`` also refuses names that resolve only to private addresses at delivery time.

Deliveries run in the background, at most ``concurrency`` at once; beyond ``max_pending`` waiting or retrying
deliveries, new ones are dropped with an error log. Logs name the host, never the full URL (it may hold a token).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

from gateway.logs import Logger
from gateway.upstream.client import Transport, TransportError
from gateway.validation.media_guard import MediaGuard
from gateway.validation.media_urls import media_host, parse_ip_literal, private_host_reason

SIGNATURE_HEADER: Final = "X-Gateway-Signature"
EVENT_HEADER: Final = "X-Gateway-Event"
DELIVERY_HEADER: Final = "X-Gateway-Delivery"
EVENT_TERMINAL: Final = "task.terminal"
MAX_URL_LENGTH: Final = 2048


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Gateway-Signature`` value for ``body`` sent at ``timestamp`` (Unix seconds).

    >>> sign(b"secret", 1700000000, b"{}")[:15]
    't=1700000000,v1'
    """
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance_s: float = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a timestamp within ``tolerance_s`` of ``now``."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            return False
        if name == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit() or len(value) > 12:
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected.encode(), value.encode("utf-8", "replace")) for value in candidates)


def check_webhook_url(url: object) -> str | None:
    """Why ``url`` cannot be a callback URL, or None when it can (the rules of private media URLs)."""
    if not isinstance(url, str) or not url:
        return "the callback URL must be a non-empty string"
    if len(url) > MAX_URL_LENGTH:
        return f"the callback URL is longer than {MAX_URL_LENGTH} characters"
    if any(char.isspace() or not char.isprintable() or char == "\\" for char in url):
        return "the callback URL must not contain whitespace, control characters or backslashes"
    try:
        parts = urlsplit(url)
        hostname, _port = parts.hostname, parts.port
    except ValueError:
        return "the callback URL cannot be parsed (host or port)"
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return "the callback URL must be an absolute http:// or https:// URL"
    if "@" in parts.netloc:
        return "the callback URL must not carry credentials (user:password@)"
    if parts.fragment:
        return "the callback URL must not have a fragment"
    ip = parse_ip_literal(hostname) if hostname else None
    host = hostname if ip is not None else media_host(url)  # the same strict parse as media URLs
    if host is None:
        return "the callback URL's host is not a valid host name"
    return private_host_reason(host, ip)


def _log_host(url: str) -> str:
    """The host of ``url`` for log lines (never the whole URL, whose path or query may hold a token)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


class WebhookSender:
    """Delivers signed webhooks in the background with capped, jittered exponential backoff.

    ``sender.deliver(url, body)`` returns at once; ``await sender.aclose(timeout_s)`` at shutdown waits for
    deliveries in progress, then cancels the rest, then closes the transport (the sender owns it).
    """

    def __init__(
        self,
        secret: bytes,
        transport: Transport,
        *,
        log: Logger,
        max_attempts: int = 6,
        base_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        concurrency: int = 8,
        max_pending: int = 1000,
        guard: MediaGuard | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not secret:
            raise ValueError("the webhook secret must not be empty")
        if max_attempts < 1 or concurrency < 1 or max_pending < 1:
            raise ValueError("max_attempts, concurrency and max_pending must be positive")
        if base_delay_s < 0 or max_delay_s < base_delay_s:
            raise ValueError("base_delay_s must not be negative nor above max_delay_s")
        self._secret = secret
        self._transport = transport
        self._log = log
        self._max_attempts = max_attempts
        self._base_delay_s = base_delay_s
        self._max_delay_s = max_delay_s
        self._slots = asyncio.Semaphore(concurrency)
        self._max_pending = max_pending
        self._guard = guard
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._pending: set[asyncio.Task[bool]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Deliveries scheduled and not finished."""
        return len(self._pending)

    def deliver(self, url: str, body: bytes) -> bool:
        """Schedule a delivery of ``body`` to ``url``; False (and an error log) when it was dropped."""
        host = _log_host(url)
        if self._closed or len(self._pending) >= self._max_pending:
            self._log.error("webhook_dropped", host=host, pending=len(self._pending), closed=self._closed)
            return False
        task = asyncio.create_task(self._send(url, host, body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _send(self, url: str, host: str, body: bytes) -> bool:
        """Attempt delivery until a 2xx or ``max_attempts``; True once delivered."""
        problem = check_webhook_url(url)
        name = media_host(url)  # None for an IP literal: check_webhook_url has judged it
        if problem is None and name is not None and self._guard is not None and await self._guard.is_private(name):
            problem = f"{name!r} resolves only to private addresses"
        if problem is not None:
            self._log.error("webhook_refused", host=host, reason=problem)
            return False
        delivery = uuid.uuid4().hex
        for attempt in range(1, self._max_attempts + 1):
            async with self._slots:
                outcome = await self._attempt(url, body, delivery)
            if outcome is None:
                self._log.info("webhook_delivered", host=host, delivery=delivery, attempt=attempt)
                return True
            final = attempt == self._max_attempts
            self._log.warning("webhook_attempt_failed", host=host, delivery=delivery, attempt=attempt, error=outcome)
            if not final:
                await self._sleep(self._delay(attempt))
        self._log.error("webhook_abandoned", host=host, delivery=delivery, attempts=self._max_attempts)
        return False

    async def _attempt(self, url: str, body: bytes, delivery: str) -> str | None:
        """One POST; None on a 2xx, else what went wrong."""
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", "kling-gateway-webhooks"),
            (EVENT_HEADER, EVENT_TERMINAL),
            (DELIVERY_HEADER, delivery),
            (SIGNATURE_HEADER, sign(self._secret, int(self._clock()), body)),
        ]
        try:
            response = await self._transport.send("POST", url, headers, body)
        except TransportError as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # e.g. a URL the client library refuses: a failed attempt, never a lost task
            return type(exc).__name__
        return None if 200 <= response.status < 300 else f"status {response.status}"

    def _delay(self, attempt: int) -> float:
        """Capped exponential backoff after failed attempt ``attempt`` (1-based), jittered to 50-100 %."""
        ceiling = min(self._max_delay_s, self._base_delay_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * self._jitter())

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait (up to ``timeout_s``) for the deliveries scheduled so far; True if they all finished."""
        pending = set(self._pending)
        if not pending:
            return True
        _, unfinished = await asyncio.wait(pending, timeout=timeout_s)
        return not unfinished

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop taking deliveries, wait up to ``timeout_s`` for those in progress, cancel the rest, close."""
        self._closed = True
        if not await self.drain(timeout_s):
            unfinished = set(self._pending)
            for task in unfinished:
                task.cancel()
            self._log.warning("webhooks_cancelled", count=len(unfinished))
            await asyncio.gather(*unfinished, return_exceptions=True)
        await self._transport.aclose()
