"""Slowing down secret guessing: after repeated wrong secrets from one address, refuse it for a while.

``GuessLimiter`` is pure bookkeeping with an injected clock, no I/O: the admin API asks it before comparing a
token and tells it the outcome; a future admin sign-in page can use it the same way. Memory is bounded (the
least recently seen addresses are forgotten first). Counts are per process: with ``--workers N`` an address gets
up to N times the allowance, still a tiny fraction of what guessing a 32-character token needs.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Tally:
    failures: int
    window_start: float
    locked_until: float = 0.0


class GuessLimiter:
    """``max_failures`` wrong secrets within ``window_s`` lock an address out for ``lockout_s``.

    >>> limiter = GuessLimiter(max_failures=2, window_s=60, lockout_s=300, clock=lambda: 0.0)
    >>> limiter.failed("10.0.0.1"), limiter.failed("10.0.0.1"), limiter.retry_after("10.0.0.1")
    (False, True, 300)
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window_s: float = 60.0,
        lockout_s: float = 300.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._window_s = window_s
        self._lockout_s = lockout_s
        self._max_addresses = max_addresses
        self._clock = clock
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until ``address`` may try again, or None when it may try now."""
        tally = self._tallies.get(address)
        if tally is None:
            return None
        left = tally.locked_until - self._clock()
        return math.ceil(left) if left > 0 else None

    def failed(self, address: str) -> bool:
        """Count a wrong secret; True when this one locked the address out."""
        now = self._clock()
        tally = self._tallies.get(address)
        if tally is None or now - tally.window_start > self._window_s:
            tally = _Tally(0, now)
            self._tallies[address] = tally
        self._tallies.move_to_end(address)
        tally.failures += 1
        while len(self._tallies) > self._max_addresses:
            self._tallies.popitem(last=False)
        if tally.failures >= self._max_failures and tally.locked_until <= now:
            tally.locked_until = now + self._lockout_s
            tally.failures = 0
            tally.window_start = now
            return True
        return False

    def succeeded(self, address: str) -> None:
        """A right secret clears the address's count."""
        self._tallies.pop(address, None)
