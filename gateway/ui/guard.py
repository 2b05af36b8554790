"""Slowing down admin-token guessing at the sign-in form: repeated wrong tokens lock an address out for a while.

Pure bookkeeping with an injected clock. Counts are per process and memory is bounded (the least recently seen
addresses are forgotten first). The interface (``retry_after``, ``failed``, ``succeeded``) is the admin API's
guessing limiter's, so the sign-in form can share one limiter with it.
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


class SignInGuard:
    """``max_failures`` wrong tokens within ``window_s`` lock an address out for ``lockout_s``.

    >>> guard = SignInGuard(max_failures=2, window_s=60, lockout_s=300, clock=lambda: 0.0)
    >>> guard.failed("10.0.0.1"), guard.failed("10.0.0.1"), guard.retry_after("10.0.0.1")
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
        """Count a wrong token; True when this one locked the address out."""
        now = self._clock()
        tally = self._tallies.get(address)
        if tally is None or now - tally.window_start > self._window_s:
            tally = _Tally(0, now)
            self._tallies[address] = tally
        self._tallies.move_to_end(address)
        tally.failures += 1
        while len(self._tallies) > self._max_addresses:
            self._tallies.popitem(last=False)
        if tally.failures >= self._max_failures:
            tally.locked_until = now + self._lockout_s
            tally.failures = 0
            tally.window_start = now
            return True
        return False

    def succeeded(self, address: str) -> None:
        """A right token clears the address's count."""
        self._tallies.pop(address, None)
