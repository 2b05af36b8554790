"""The one client to UniAll: header hygiene, key injection, timeouts, GET retries and error mapping.

Only a ``Transport`` touches the network. ``AiohttpTransport`` is the production one (chosen by measurement, see
BENCHMARKS.md: httpx's pool collapses under concurrency); tests and benchmarks use ``HttpxTransport``
(``tests/support/httpx_transport.py``) to plug ``httpx.MockTransport`` in exactly where the network would be.
Their errors and how ``UpstreamClient`` maps them are described on :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from gateway.catalog import DEFAULT_ACCOUNT
from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.known_secrets import KnownSecrets
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.upstream.breaker import BreakerOpen, BreakerState, CircuitBreaker, Permit, open_error
from gateway.upstream.hygiene import (
    mask_secrets,
    mask_text,
    request_headers,
    response_headers,
    scoped_idempotency_key,
)

Headers = list[tuple[str, str]]


class TransportError(Exception):
    """A failed upstream exchange; the message never contains a secret.

    A transport raises the small tree below, and ``UpstreamClient`` maps it onto the proxy's answers::

        TransportError
         ├── ConnectFailed      could not open a connection (refused, DNS, connect timeout)  → 502 (GET retried)
         ├── TimedOut           no complete answer within the read or total bound           → 504
         └── BadResponse        reset mid-answer, truncated, garbage, or too large            → 502
    """


class ConnectFailed(TransportError):
    pass


class TimedOut(TransportError):
    pass


class BadResponse(TransportError):
    pass


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: Headers
    body: bytes
    elapsed_s: float

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)


class Transport(Protocol):
    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


def outbound_headers(
    client_headers: Iterable[tuple[str, str]], api_key: str, request_id: str, idempotency_key: str | None = None
) -> Headers:
    """Only the client headers the upstream needs, plus the upstream key, the request id and the scoped
    idempotency key (``gateway.upstream.hygiene``)."""
    return request_headers(client_headers, api_key, request_id, idempotency_key)


def inbound_headers(upstream_headers: Iterable[tuple[str, str]], secrets: Iterable[str] = ()) -> Headers:
    """Upstream response headers to pass to the client: an allowlist, bounded, secrets masked."""
    return response_headers(upstream_headers, secrets)


class AiohttpTransport:
    """Pooled keep-alive HTTP/1.1 client on aiohttp, with every timeout explicit.

    aiohttp's ``connect`` bound covers waiting for a pooled connection *and* opening one, so it is set to
    ``pool_timeout_s + connect_timeout_s``; ``sock_connect`` bounds the TCP/TLS handshake alone; ``sock_read``
    bounds silence while reading; ``total`` bounds the whole exchange including sending the body (the write bound).
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s,
            connect=settings.pool_timeout_s + settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop (aiohttp binds a session to the loop that made it).
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._settings.max_connections,
                limit_per_host=self._settings.max_connections,
                keepalive_timeout=15,
                ttl_dns_cache=60,
                enable_cleanup_closed=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=True,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                trust_env=False,
                # The gateway is many clients behind one key: never let one caller's upstream cookies reach another.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse:
        started = time.perf_counter()
        limit = self._settings.max_response_bytes
        try:
            async with self._client().request(
                method, url, headers=headers, data=body, allow_redirects=False
            ) as response:
                declared = response.content_length
                if declared is not None and declared > limit:
                    raise BadResponse(f"upstream answer of {declared} bytes exceeds {limit}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > limit:
                        raise BadResponse(f"upstream answer exceeds {limit} bytes")
                    chunks.append(chunk)
                payload = b"".join(chunks)
                return UpstreamResponse(
                    status=response.status,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
                    body=payload,
                    elapsed_s=time.perf_counter() - started,
                )
        except TransportError:
            raise
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            raise ConnectFailed(type(exc).__name__) from None
        except TimeoutError as exc:
            raise TimedOut(type(exc).__name__) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise BadResponse(type(exc).__name__) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class UpstreamClient:
    """Calls UniAll with an upstream account's key; maps transport failures to 502/504 and records upstream metrics.

    ``api_key`` is one key for every account, or ``key_for(account)`` giving each account's key now (None for an
    account no longer configured: the call is refused as ``upstream_unavailable`` without being sent).

    Every call passes the circuit ``breaker`` (built from ``[upstream] breaker_*`` unless given): one outcome per
    call, after any GET retries. Submissions, status polls and passthrough share it. Transport failures and 5xx
    answers count against it; while it is open, calls fail fast with 503 ``upstream_unavailable`` and
    ``Retry-After`` without touching the network.

    Concurrent upstream calls are bounded by the aiohttp connector (``[upstream] max_connections``): a call that finds
    every connection busy waits for one, and that wait counts against ``pool_timeout_s`` (part of aiohttp's ``connect``
    bound), after which it fails as a connect error (502). The in-flight bound on the gateway's own requests is
    ``gateway.web.overload``.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        api_key: str | Callable[[str], str | None],
        transport: Transport,
        metrics: Metrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        breaker: CircuitBreaker | None = None,
        log: Logger,
        secrets: Iterable[str] | KnownSecrets = (),
    ) -> None:
        self._settings = settings
        self._key_for: Callable[[str], str | None] = api_key if callable(api_key) else (lambda _account: api_key)
        #: Upstream keys to mask wherever the upstream echoes one: every key loaded so far, rotated-in ones too
        #: (``KnownSecrets`` grows on a key-file reload); each request also masks the key it was sent with.
        if not isinstance(secrets, KnownSecrets):
            given = secrets
            secrets = KnownSecrets()
            secrets.upstream_keys([*given, *([api_key] if isinstance(api_key, str) else [])])
        self._known = secrets
        self._transport = transport
        self._metrics = metrics
        self._base = settings.base_url.rstrip("/")
        self._sleep = sleep
        self._jitter = jitter
        self._log = log
        self.breaker = (
            breaker
            if breaker is not None
            else CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_open_s)
        )
        self._breaker_state = self.breaker.state
        self._show_breaker_state()
        self._duration_children: dict[tuple[str, int], Any] = {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        route: str,
        request_id: str,
        client_headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        account: str = DEFAULT_ACCOUNT,
        idempotency_key: str | None = None,
        auth_refusal_to_caller: bool = False,
    ) -> UpstreamResponse:
        """Send ``method path`` upstream with ``account``'s key; ``path`` starts with ``/v1/`` (query allowed).

        ``idempotency_key`` is sent as the upstream's ``Idempotency-Key`` (already scoped to the client's key).
        The answer comes back with every upstream key masked in its body and headers. A 401 or 403 (the account's
        key rejected) raises 502 ``upstream_auth_failed`` (``auth_failed``), unless ``auth_refusal_to_caller``:
        then the caller (a submission, which may try another account) gets the answer and decides.
        """
        api_key = self._key_for(account)
        if api_key is None:
            unknown = UpstreamUnavailable(f"the upstream account '{account}' is no longer configured")
            unknown.request_sent = False
            raise unknown
        try:
            permit = self.breaker.admit()
        except BreakerOpen as exc:
            self._note_breaker()
            raise open_error(exc.retry_after_s) from None
        self._note_breaker()
        try:
            response = await self._send(method, path, route, request_id, client_headers, body, api_key, idempotency_key)
        except Exception:
            self._settle(permit, failed=True)
            raise
        except BaseException:  # cancelled: no verdict on the upstream; a probe goes to the next caller
            self.breaker.abandon(permit)
            raise
        self._settle(permit, failed=response.status >= 500)
        if response.status in (401, 403) and not auth_refusal_to_caller:
            raise self.auth_failed(response.status, route)
        return response

    def _settle(self, permit: Permit, failed: bool) -> None:
        """Report a finished call's outcome to the breaker."""
        if failed:
            self.breaker.failure(permit)
        else:
            self.breaker.success(permit)
        self._note_breaker()

    async def _send(
        self,
        method: str,
        path: str,
        route: str,
        request_id: str,
        client_headers: Iterable[tuple[str, str]],
        body: bytes | None,
        api_key: str,
        idempotency_key: str | None = None,
    ) -> UpstreamResponse:
        """The exchange itself: headers, GET retries on connect errors, error mapping and metrics."""
        headers = outbound_headers(client_headers, api_key, request_id, idempotency_key)
        url = self._base + path
        attempts = 1 + (self._settings.get_retries if method == "GET" else 0)
        for attempt in range(attempts):
            try:
                response = await self._transport.send(method, url, headers, body)
            except ConnectFailed:
                if attempt + 1 < attempts:
                    await self._sleep(self._backoff(attempt))
                    continue
                self._metrics.upstream_errors.labels("connect").inc()
                unreachable = UpstreamUnavailable("the upstream could not be reached")
                unreachable.request_sent = False
                raise unreachable from None
            except TimedOut:
                self._metrics.upstream_errors.labels("timeout").inc()
                raise UpstreamTimeout("the upstream did not answer in time") from None
            except BadResponse:
                self._metrics.upstream_errors.labels("invalid_response").inc()
                raise UpstreamUnavailable("the upstream sent an invalid response") from None
            self._duration_child(route, response.status).observe(response.elapsed_s)
            if response.status >= 500:
                self._metrics.upstream_errors.labels("status_5xx").inc()
            return self._masked(response, api_key)
        raise AssertionError("unreachable")  # pragma: no cover

    def _duration_child(self, route: str, status: int) -> Any:
        """The latency histogram's child for (route, status), looked up once (routes and statuses are bounded)."""
        child = self._duration_children.get((route, status))
        if child is None:
            child = self._metrics.upstream_duration.labels(route, str(status))
            self._duration_children[(route, status)] = child
        return child

    def _note_breaker(self) -> None:
        """Log and export a change of the breaker's state."""
        state = self.breaker.state
        if state is self._breaker_state:
            return
        previous, self._breaker_state = self._breaker_state, state
        self._show_breaker_state()
        log = self._log.warning if state is BreakerState.OPEN else self._log.info
        log(
            "upstream_breaker",
            state=state.value,
            previous=previous.value,
            consecutive_failures=self.breaker.consecutive_failures,
        )

    def _show_breaker_state(self) -> None:
        """Set the state gauge: 1 for the current state, 0 for the others."""
        for state in BreakerState:
            self._metrics.upstream_breaker.labels(state.value).set(1 if state is self._breaker_state else 0)

    def idempotency_key_for(self, key_name: str, client_key: str, account: str = DEFAULT_ACCOUNT) -> str:
        """The upstream ``Idempotency-Key`` for a client's own, scoped to its gateway key (an HMAC under the
        account's upstream key, so it says nothing about the client's value)."""
        return scoped_idempotency_key(self._key_for(account) or account, key_name, client_key)

    def _masked(self, response: UpstreamResponse, api_key: str) -> UpstreamResponse:
        """The answer with every upstream key (the one sent, and every one known) masked in body and headers."""
        known = self._known.upstream
        secrets = known if api_key in known else (api_key, *known)
        body = mask_secrets(response.body, secrets)
        headers = response.headers
        if any(secret in value for _, value in headers for secret in secrets):
            headers = [(k, mask_text(v, secrets)) for k, v in headers]
        if body is response.body and headers is response.headers:
            return response
        return UpstreamResponse(response.status, headers, body, response.elapsed_s)

    def auth_failed(self, status: int, route: str) -> UpstreamUnavailable:
        """The upstream rejected the team's key: the client's key is fine, so never a 401 to the client."""
        self._metrics.upstream_auth_failures.labels(route).inc()
        self._log.error("upstream_auth_failed", upstream_status=status, route=route)
        failed = UpstreamUnavailable(
            "The upstream rejected the gateway's upstream key; the operator has been alerted.",
            code="upstream_auth_failed",
        )
        failed.request_sent = False  # refused at the door: no task can have been created
        return failed

    def invalid_response(self) -> UpstreamUnavailable:
        """For a 2xx answer whose body the gateway cannot use (counted as ``invalid_response``)."""
        self._metrics.upstream_errors.labels("invalid_response").inc()
        return UpstreamUnavailable("the upstream sent an invalid response")

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with full jitter."""
        ceiling = min(self._settings.retry_backoff_max_s, self._settings.retry_backoff_s * 2.0**attempt)
        return ceiling * self._jitter()

    async def aclose(self) -> None:
        await self._transport.aclose()
