"""Per-key rate limits: each key's requests per minute, checked right after authentication (429 ``rate_limited``).

Counted in this process (``keys.RateLimiter``'s token buckets), or for every replica when ``[cache] url`` names
Redis (a ``SharedRateLimiter``, which lets requests through while Redis is down). ``ClientAuthentication`` takes
the token on every client request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.auth.principal import Principal
from gateway.bounded import LRUCache
from gateway.errors import TooManyRequests
from gateway.keys import RateLimiter, SharedRateLimiter


@dataclass(frozen=True, slots=True)
class KeyRateLimits:
    """Where each key's allowance is counted: ``shared`` (every replica) when set, else ``local`` (this process)."""

    local: RateLimiter
    shared: SharedRateLimiter | None = None


_LIMIT_HEADER = b"x-ratelimit-limit-requests"
_REMAINING_HEADER = b"x-ratelimit-remaining-requests"
_TABLE_MAX_RPM = 100_000  # up to this rpm every header value is pre-encoded; above, encoded per response
_TABLES_MAX = 1_000

Header = tuple[bytes, bytes]


class RateLimitHeaders:
    """OpenAI-style ``x-ratelimit-limit-requests`` / ``x-ratelimit-remaining-requests`` for a key's response.

    From this process's token bucket (the figures as of the request's own check); with a shared limiter (Redis)
    there is no local bucket, so no headers. Header pairs are encoded once per rpm value and reused, so a response
    costs a dict look-up and no allocation.
    """

    def __init__(self, limits: KeyRateLimits) -> None:
        self._local = limits.local if limits.shared is None else None
        self._tables: LRUCache[int, tuple[Header, Sequence[Header]]] = LRUCache(_TABLES_MAX)

    def for_key(self, key_name: str) -> tuple[Header, Header] | None:
        """The two header pairs for ``key_name``'s response, or None when it has no limit here."""
        local = self._local
        if local is None:
            return None
        allowance = local.allowance(key_name)
        if allowance is None:
            return None
        rpm, remaining = allowance
        table = self._tables.peek(rpm)
        if table is None:
            if rpm > _TABLE_MAX_RPM:
                return (_LIMIT_HEADER, b"%d" % rpm), (_REMAINING_HEADER, b"%d" % remaining)
            table = ((_LIMIT_HEADER, b"%d" % rpm), tuple((_REMAINING_HEADER, b"%d" % n) for n in range(rpm + 1)))
            self._tables.put(rpm, table)
        return table[0], table[1][min(remaining, rpm)]


def rate_limited(principal: Principal, wait_s: float) -> TooManyRequests:
    """The 429 for a key past its requests per minute, with ``Retry-After`` (whole seconds, at least 1)."""
    return TooManyRequests(
        f"Rate limit of {principal.rpm} requests per minute for key '{principal.name}' reached; "
        f"retry in {math.ceil(wait_s)} s.",
        code="rate_limited",
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )
