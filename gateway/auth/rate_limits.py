"""Per-key rate limits: each key's requests per minute, checked right after authentication (429 ``rate_limited``).

Counted in this process (``keys.RateLimiter``'s token buckets), or for every replica when ``[cache] url`` names
Redis (a ``SharedRateLimiter``, which lets requests through while Redis is down). ``ClientAuthentication`` takes
the token on every client request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.auth.principal import Principal
from gateway.errors import TooManyRequests
from gateway.keys import RateLimiter, SharedRateLimiter


@dataclass(frozen=True, slots=True)
class KeyRateLimits:
    """Where each key's allowance is counted: ``shared`` (every replica) when set, else ``local`` (this process)."""

    local: RateLimiter
    shared: SharedRateLimiter | None = None


def rate_limited(principal: Principal, wait_s: float) -> TooManyRequests:
    """The 429 for a key past its requests per minute, with ``Retry-After`` (whole seconds, at least 1)."""
    return TooManyRequests(
        f"Rate limit of {principal.rpm} requests per minute for key '{principal.name}' reached; "
        f"retry in {math.ceil(wait_s)} s.",
        code="rate_limited",
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )
