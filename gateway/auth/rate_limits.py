"""Per-key rate limits: each key's requests-per-minute, checked after authentication (429 ``rate_limited``).

Counted in this process (``keys.RateLimiter``'s token buckets), or for every replica when ``[cache] url`` names
Redis (a ``SharedRateLimiter``, which lets requests through while Redis is down).
"""

from __future__ import annotations

import math

from gateway.auth.principal import Principal
from gateway.errors import TooManyRequests
from gateway.keys import RateLimiter, SharedRateLimiter


class KeyRateLimits:
    """Takes one request from the caller's per-minute allowance, or refuses it with 429 and ``Retry-After``."""

    def __init__(self, local: RateLimiter, shared: SharedRateLimiter | None = None) -> None:
        #: This process's buckets (used when nothing is shared).
        self.local = local
        self.shared = shared

    async def take(self, principal: Principal) -> None:
        shared = self.shared
        if shared is not None:
            wait = await shared.check(principal.name, principal.rpm)
        else:
            wait = self.local.check(principal.name, principal.rpm)
        if wait is not None:
            raise TooManyRequests(
                f"Rate limit of {principal.rpm} requests per minute for key '{principal.name}' reached; "
                f"retry in {math.ceil(wait)} s.",
                code="rate_limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
