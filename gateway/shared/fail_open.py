"""What the replicas of one deployment share through Redis, and what a replica does when Redis fails (fail open).

The Redis mechanics live in ``gateway.shared.redis_ops``; this module adds the policy, described on
:class:`SharedState`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter
from redis.asyncio import Redis

from gateway.bounded import LRUCache
from gateway.config import CacheSettings
from gateway.logs import Logger
from gateway.shared.redis_ops import (
    CacheUnavailable,
    RedisAccountMarks,
    RedisRateLimiter,
    RedisSingleFlight,
    RedisStatusCache,
    connect,
)
from gateway.status.poller import CachedStatus, FetchResult
from gateway.store.base import AccountMark

_WARN_EVERY_S = 10.0
_REST_S = 1.0
_LEASE_DIVISOR = 600  # rpm / 600 tokens = a tenth of a second of refill
_LEASE_S = 1.0


class Health:
    """Failure bookkeeping for the shared state: a short rest after a failure, throttled warnings, recovery lines."""

    def __init__(
        self, log: Logger, failures: Counter | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self._failures = failures
        self._clock = clock
        self._failing: dict[str, float] = {}  # operation -> when its last warning was logged
        self._resting_until = float("-inf")

    def resting(self) -> bool:
        """True for ``_REST_S`` after any failure: callers take their fallback without asking Redis."""
        return self._clock() < self._resting_until

    def failed(self, operation: str, exc: Exception) -> None:
        if self._failures is not None:
            self._failures.labels(operation).inc()
        now = self._clock()
        self._resting_until = now + _REST_S
        last = self._failing.get(operation)
        if last is None or now - last >= _WARN_EVERY_S:
            self._failing[operation] = now
            self._log.warning("shared_state_unavailable", operation=operation, error=str(exc))

    def worked(self, operation: str) -> None:
        if self._failing and self._failing.pop(operation, None) is not None:
            self._log.info("shared_state_recovered", operation=operation)


class SharedStatus:
    """``SharedStatusCache`` on Redis: entries every replica sees, and one upstream call per task among them."""

    def __init__(
        self,
        cache: RedisStatusCache,
        flight: RedisSingleFlight,
        health: Health,
        call_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,  # the cache's clock: entries' stored_at are on it
    ):
        self._cache = cache
        self._flight = flight
        self._health = health
        self._clock = clock
        # A replica waits for another's call at most as long as that call may take, then asks itself.
        self._wait_s = call_timeout_s
        self._lock_ttl_s = call_timeout_s + 1.0

    async def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        if self._health.resting():
            return None, False
        try:
            found = await self._cache.get(task_id)
        except CacheUnavailable as exc:
            self._health.failed("status_get", exc)
            return None, False
        self._health.worked("status_get")
        return found

    async def put(
        self, task_id: str, body: bytes, headers: Sequence[tuple[str, str]], status_text: str, terminal: bool
    ) -> None:
        if self._health.resting():
            return
        try:
            await self._cache.put(task_id, body, headers, status_text, terminal)
        except CacheUnavailable as exc:
            self._health.failed("status_put", exc)
        else:
            self._health.worked("status_put")

    async def once(self, task_id: str, fetch: Callable[[], Awaitable[FetchResult]]) -> tuple[FetchResult, bool]:
        if self._health.resting():
            return await fetch(), False
        waited_from = self._clock()
        arrived: list[CachedStatus] = []

        async def ready() -> bool:
            # Only an answer stored while we waited is the other replica's: an older, expired entry is not.
            entry, fresh = await self.get(task_id)
            if entry is not None and (fresh or entry.stored_at >= waited_from):
                arrived.append(entry)
                return True
            return False

        try:
            result, _followed = await self._flight.run(
                task_id, fetch, ready=ready, lock_ttl_s=self._lock_ttl_s, wait_s=self._wait_s
            )
        except CacheUnavailable as exc:
            self._health.failed("single_flight", exc)
            return await fetch(), False
        self._health.worked("single_flight")
        if result is not None:
            return result, False
        if not arrived:  # run() answers (None, True) only after ready() said True; never serve nothing
            return await fetch(), False
        entry = arrived[-1]
        return FetchResult(200, entry.headers, entry.body), True


class _Lease:
    """A key's tokens taken from Redis and not spent yet, and what Redis said was left when they were taken."""

    __slots__ = ("expires", "rpm", "shared_left", "tokens")

    def __init__(self, tokens: float, expires: float, shared_left: int, rpm: int) -> None:
        self.tokens = tokens
        self.expires = expires
        self.shared_left = shared_left
        self.rpm = rpm


class SharedLimiter:
    """``SharedRateLimiter`` on Redis, taking tokens in small leases; a Redis failure lets the request through.

    A Redis round trip per request would double the CPU of a cached poll, so a replica takes up to
    ``rpm // _LEASE_DIVISOR`` tokens at once (a tenth of a second of refill; exactly one for rpm < 1,200) and spends
    them locally for at most ``_LEASE_S``. Tokens are taken from the shared bucket before they are spent, so the
    limit is never exceeded; near the limit a request may be refused while another replica still holds a few unused
    tokens of its lease (at most a tenth of a second's worth per replica, for at most a second).

    ``allowance`` (the rate-limit headers) cannot know the global figure without a round trip: it is this replica's
    unspent lease plus the whole tokens Redis reported left in the shared bucket at this replica's last take (at
    most ``_LEASE_S`` ago while the lease lasts). It leaves out refill since that take and does not see what other
    replicas took since. While Redis fails there is no figure.
    """

    def __init__(
        self,
        limiter: RedisRateLimiter,
        health: Health,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self._limiter = limiter
        self._health = health
        self._clock = clock
        self._leases: LRUCache[str, _Lease] = LRUCache(max_keys)

    async def check(self, key_name: str, rpm: int | None) -> float | None:
        if rpm is None:
            return None
        lease = self._leases.peek(key_name)
        if lease is not None and lease.tokens >= 1 and lease.rpm == rpm and self._clock() < lease.expires:
            lease.tokens -= 1
            return None
        if self._health.resting():
            self._leases.pop(key_name)  # let through uncounted: no figure for the headers
            return None
        try:
            taken, wait, left = await self._limiter.take(key_name, rpm, max(1, rpm // _LEASE_DIVISOR))
        except CacheUnavailable as exc:
            self._health.failed("rate_limit", exc)
            self._leases.pop(key_name)
            return None
        self._health.worked("rate_limit")
        self._lease(key_name, max(0, taken - 1), left, rpm)
        return wait

    def _lease(self, key_name: str, tokens: int, shared_left: int, rpm: int) -> None:
        now = self._clock()
        lease = self._leases.peek(key_name)
        if lease is None:
            self._leases.put(key_name, _Lease(float(tokens), now + _LEASE_S, shared_left, rpm))
            return
        if now < lease.expires and lease.rpm == rpm:
            lease.tokens += tokens  # concurrent takes on this replica: keep them all
        else:
            lease.tokens = float(tokens)
        lease.expires = now + _LEASE_S
        lease.shared_left = shared_left
        lease.rpm = rpm
        self._leases.touch(key_name)

    def allowance(self, key_name: str) -> tuple[int, int] | None:
        """``(rpm, requests left)`` as of ``key_name``'s last check here (see the class), or None (no figure)."""
        lease = self._leases.peek(key_name)
        if lease is None:
            return None
        unspent = int(lease.tokens) if self._clock() < lease.expires else 0
        return lease.rpm, min(lease.rpm, unspent + lease.shared_left)


class SharedAccounts:
    """``AccountBoard`` on Redis (``gateway.accounts.board``). Fail open: a read that fails answers None (each
    process keeps the marks it has), a write that fails is dropped (the account is refused again elsewhere and set
    aside there); both count as failures like every shared operation."""

    def __init__(self, marks: RedisAccountMarks, health: Health) -> None:
        self._marks = marks
        self._health = health

    async def read(self) -> dict[str, AccountMark] | None:
        if self._health.resting():
            return None
        try:
            marks = await self._marks.read()
        except CacheUnavailable as exc:
            self._health.failed("account_marks", exc)
            return None
        self._health.worked("account_marks")
        return marks

    async def set_aside(self, account: str, until: float) -> bool:
        return await self._write(lambda: self._marks.set_aside(account, until))

    async def unauthorized(self, account: str, key_fingerprint: str) -> bool:
        return await self._write(lambda: self._marks.unauthorized(account, key_fingerprint))

    async def end_aside(self, account: str, until: float) -> bool:
        return await self._write(lambda: self._marks.end_aside(account, until))

    async def _write(self, write: Callable[[], Awaitable[None]]) -> bool:
        if self._health.resting():
            return False
        try:
            await write()
        except CacheUnavailable as exc:
            self._health.failed("account_mark", exc)
            return False
        self._health.worked("account_mark")
        return True


class SharedState:
    """The Redis client and everything built on it; ``close()`` at shutdown.

    With ``[cache] url = "redis://..."`` (or ``rediss://``) the app factory builds a ``SharedState``: the status cache
    every replica reads and writes (``StatusPoller``'s ``shared``), one upstream call per task across replicas, and the
    per-key request limits counted once for all of them (``Services.shared_limiter``), and which upstream accounts are
    set aside (``SharedAccounts``). The Redis mechanics live in
    ``gateway.shared.redis_ops``; this module adds the policy.

    Redis failing never fails a request (fail open):

    * a status poll reads a Redis error as a miss: the replica answers from its own cache or asks the upstream itself,
      exactly as a single replica without Redis would;
    * the upstream accounts' set-aside marks: a failed read keeps each replica's own, a failed write is dropped;
    * a rate-limit check lets the request through (budgets live in the store, so spending stays bounded); limits
      are taken from Redis in small leases (``SharedLimiter``), so most requests of a busy key ask Redis nothing;
    * after a failure, Redis is left alone for ``_REST_S`` (every shared operation short-circuits to its fallback),
      so a hung or dead Redis costs at most one timeout per second instead of one per request;
    * each failure counts in ``kling_gateway_shared_state_failures_total{operation}``, and each failing operation
      logs ``shared_state_unavailable`` (a warning) at most once per ``_WARN_EVERY_S``, and
      ``shared_state_recovered`` when it works again. ``/readyz`` is not affected: it reports the store and the
      configuration (SPEC section 3), and pulling every replica out of a load balancer because Redis is down would
      turn a degraded deployment into an outage.
    """

    def __init__(self, client: Redis, status: SharedStatus, limiter: SharedLimiter, accounts: SharedAccounts) -> None:
        self.client = client
        self.status = status
        self.limiter = limiter
        self.accounts = accounts

    @classmethod
    async def connect(
        cls, settings: CacheSettings, *, call_timeout_s: float, log: Logger, failures: Counter | None = None
    ) -> SharedState:
        """Connect to ``settings.url`` (raises ``CacheUnavailable`` if Redis does not answer at start-up)."""
        client = await connect(settings.url)
        health = Health(log, failures)
        cache = RedisStatusCache(
            client,
            pending_ttl_s=settings.pending_ttl_s,
            terminal_ttl_s=settings.terminal_ttl_s,
            stale_keep_s=settings.stale_keep_s,
            prefix=settings.key_prefix,
        )
        flight = RedisSingleFlight(client, prefix=settings.key_prefix)
        limiter = RedisRateLimiter(client, prefix=settings.key_prefix)
        accounts = SharedAccounts(RedisAccountMarks(client, prefix=settings.key_prefix), health)
        return cls(
            client, SharedStatus(cache, flight, health, call_timeout_s), SharedLimiter(limiter, health), accounts
        )

    async def close(self) -> None:
        await self.client.aclose()
