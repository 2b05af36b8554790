"""Per-key rate limits: each key's requests per minute, checked right after authentication (429 ``rate_limited``).

Counted in this process (``RateLimiter``'s token buckets), or for every replica when ``[cache] url`` names
Redis (a ``SharedRateLimiter``, which lets requests through while Redis is down). ``ClientAuthentication`` takes
the token on every client request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.auth.principal import Principal
from gateway.bounded import LRUCache
from gateway.errors import TooManyRequests


class _Bucket:
    __slots__ = ("rpm", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float, rpm: int) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.rpm = rpm


class SharedRateLimiter(Protocol):
    """``RateLimiter.check`` counted for every replica (Redis); implementations never raise on backend failure."""

    async def check(self, key_name: str, rpm: int | None) -> float | None:
        """Take one token for ``key_name``: None if allowed, else seconds until a token is available."""

    def allowance(self, key_name: str) -> tuple[int, int] | None:
        """``(rpm, requests left)`` as this replica last saw them (a conservative figure), or None."""


class RateLimiter:
    """Per-key token buckets: capacity ``rpm`` requests, refilled at ``rpm / 60`` per second.

    ``clock`` returns seconds (``time.monotonic`` by default; tests inject a fake). Memory is bounded by
    ``max_keys`` buckets: the least recently used bucket is dropped first, which at worst lets that key
    start again from a full bucket.

    >>> now = [0.0]
    >>> limiter = RateLimiter(lambda: now[0])
    >>> [limiter.check("team-a", 2) for _ in range(3)]
    [None, None, 30.0]
    """

    _EPSILON = 1e-9

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._buckets: LRUCache[str, _Bucket] = LRUCache(max_keys)

    def check(self, key_name: str, rpm: int | None) -> float | None:
        """Take one token for ``key_name``: None if allowed, else seconds until a token is available."""
        if rpm is None:
            return None
        if rpm < 1:
            raise ValueError("rpm must be a positive integer or None")
        now = self._clock()
        capacity = float(rpm)
        rate = rpm / 60.0
        bucket = self._buckets.peek(key_name)
        if bucket is None:
            bucket = _Bucket(capacity, now, rpm)
            self._buckets.put(key_name, bucket)
        else:
            self._buckets.touch(key_name)
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(capacity, bucket.tokens + elapsed * rate)
            bucket.stamp = now
            bucket.rpm = rpm
        if bucket.tokens >= 1.0 - self._EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return None
        return (1.0 - bucket.tokens) / rate

    def forget(self, key_name: str) -> None:
        """Drop ``key_name``'s bucket (e.g. after revocation)."""
        self._buckets.pop(key_name)

    def allowance(self, key_name: str) -> tuple[int, int] | None:
        """``(rpm, whole tokens left)`` as of ``key_name``'s last check, or None (no limit, or never checked)."""
        bucket = self._buckets.peek(key_name)
        if bucket is None:
            return None
        return bucket.rpm, int(bucket.tokens + self._EPSILON)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class KeyRateLimits:
    """Where each key's allowance is counted: ``shared`` (every replica) when set, else ``local`` (this process)."""

    local: RateLimiter
    shared: SharedRateLimiter | None = None


_LIMIT_HEADER = b"x-ratelimit-limit-requests"
_REMAINING_HEADER = b"x-ratelimit-remaining-requests"
_CLAMPED_UP_TO_RPM = 100_000  # up to this rpm the remaining figure shown is at most the limit
_LIMITS_KEPT = 1_000

Header = tuple[bytes, bytes]


class RateLimitHeaders:
    """OpenAI-style ``x-ratelimit-limit-requests`` / ``x-ratelimit-remaining-requests`` for a key's response.

    From the limiter that counted the request: this process's token bucket (the figures as of the request's own
    check), or the shared limiter's figure (``SharedLimiter.allowance``: what Redis reported at this replica's last
    take plus its unspent lease). The limit's header pair is encoded once per rpm value; the remaining count per
    response.
    """

    def __init__(self, limits: KeyRateLimits) -> None:
        self._limiter: RateLimiter | SharedRateLimiter = limits.local if limits.shared is None else limits.shared
        self._limit_pairs: LRUCache[int, Header] = LRUCache(_LIMITS_KEPT)

    def for_key(self, key_name: str) -> tuple[Header, Header] | None:
        """The two header pairs for ``key_name``'s response, or None when it has no limit here."""
        allowance = self._limiter.allowance(key_name)
        if allowance is None:
            return None
        rpm, remaining = allowance
        limit = self._limit_pairs.peek(rpm)
        if limit is None:
            limit = (_LIMIT_HEADER, b"%d" % rpm)
            self._limit_pairs.put(rpm, limit)
        shown = min(remaining, rpm) if rpm <= _CLAMPED_UP_TO_RPM else remaining
        return limit, (_REMAINING_HEADER, b"%d" % shown)


def rate_limited(principal: Principal, wait_s: float) -> TooManyRequests:
    """The 429 for a key past its requests per minute, with ``Retry-After`` (whole seconds, at least 1)."""
    return TooManyRequests(
        f"Rate limit of {principal.rpm} requests per minute for key '{principal.name}' reached; "
        f"retry in {math.ceil(wait_s)} s.",
        code="rate_limited",
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )
