"""Month-to-date spend per budgeted key, kept in memory so a submission does not read the store.

A budget check needs "settled + outstanding this month" for the key. Reading that from the store on every
submission was the largest single cost of a budgeted submission (an aggregate over the day's rows that grows all
day). ``SpendTracker`` keeps, per key:

* ``base``: the store's figure, re-read at most every ``refresh_s`` (so other processes' submissions and
  settlements show here within that bound);
* ``recent``: estimates this process accepted since shortly before that read (added the moment the task row is
  written, so this process never under-counts its own work; a task in both the read and ``recent`` is counted
  twice until the next read, which errs on the side of the budget), and corrections for tasks this process
  settled (cost minus estimate, e.g. a failed task frees its estimate at once). A settlement that lands while a
  read is in flight can be corrected twice until the next read: at most one task's estimate, for at most
  ``refresh_s``;
* ``held``: estimates of this process's submissions between the budget check and the upstream's answer, so
  concurrent submissions cannot all pass the same remaining budget.

The store read for a key is shared by concurrent checks (one read in flight per key); a stale figure is used
while a refresh is in flight, a missing one is awaited.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

from gateway.bounded import LRUCache

ReadSpend = Callable[[str, float, float], Awaitable[Decimal]]
_ZERO = Decimal(0)


@dataclass(slots=True)
class _KeySpend:
    month_start: float
    base: Decimal
    read_started: float
    recent: deque[tuple[float, Decimal]] = field(default_factory=deque)
    recent_total: Decimal = _ZERO

    def note(self, at: float, usd: Decimal) -> None:
        self.recent.append((at, usd))
        self.recent_total += usd


class SpendTracker:
    """Month-to-date spend per key: the store's figure (refreshed every ``refresh_s``) + local recent + held."""

    def __init__(
        self,
        read: ReadSpend,
        *,
        refresh_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if refresh_s < 0 or max_keys < 1:
            raise ValueError("refresh_s must not be negative and max_keys must be positive")
        self._read = read
        self._refresh_s = refresh_s
        self._monotonic = monotonic
        self._keys: LRUCache[str, _KeySpend] = LRUCache(max_keys)
        self._reads: dict[str, asyncio.Task[_KeySpend]] = {}
        self._held: dict[str, Decimal] = {}

    async def spent(self, key_name: str, month_start: float, month_end: float) -> Decimal:
        """Settled + outstanding spend of ``key_name`` in the month starting at ``month_start``, plus held."""
        entry = self._keys.peek(key_name)
        now = self._monotonic()
        if entry is None or entry.month_start != month_start:
            entry = await self._refresh(key_name, month_start, month_end)
        elif now - entry.read_started >= self._refresh_s and key_name not in self._reads:
            self._start_refresh(key_name, month_start, month_end)  # answer from the current figure meanwhile
        else:
            self._keys.touch(key_name)
        return entry.base + entry.recent_total + self._held.get(key_name, _ZERO)

    def tracks(self, key_name: str) -> bool:
        """Whether ``key_name`` has a figure here (only keys with a budget are ever checked)."""
        return key_name in self._keys

    def add(self, key_name: str, month_start: float, usd: Decimal) -> None:
        """This process recorded a task of ``usd`` (estimate) for ``key_name`` in the month at ``month_start``."""
        entry = self._keys.peek(key_name)
        if entry is not None and entry.month_start == month_start:
            entry.note(self._monotonic(), usd)

    def settled(self, key_name: str, month_start: float, estimate_usd: Decimal, cost_usd: Decimal) -> None:
        """This process settled a task of the key: its estimate is replaced by what it cost."""
        self.add(key_name, month_start, cost_usd - estimate_usd)

    def hold(self, key_name: str, usd: Decimal) -> None:
        """Count ``usd`` against the key until ``release`` (a submission on its way upstream)."""
        self._held[key_name] = self._held.get(key_name, _ZERO) + usd

    def release(self, key_name: str, usd: Decimal) -> None:
        left = self._held.get(key_name, _ZERO) - usd
        if left > _ZERO:
            self._held[key_name] = left
        else:
            self._held.pop(key_name, None)

    async def _refresh(self, key_name: str, month_start: float, month_end: float) -> _KeySpend:
        read = self._reads.get(key_name)
        if read is None:
            read = self._start_refresh(key_name, month_start, month_end)
        return await asyncio.shield(read)

    def _start_refresh(self, key_name: str, month_start: float, month_end: float) -> asyncio.Task[_KeySpend]:
        read = asyncio.get_running_loop().create_task(self._load(key_name, month_start, month_end))
        self._reads[key_name] = read
        read.add_done_callback(lambda done: self._read_done(key_name, done))
        return read

    def _read_done(self, key_name: str, read: asyncio.Task[_KeySpend]) -> None:
        self._reads.pop(key_name, None)
        if not read.cancelled():
            read.exception()  # a failed background refresh is retried on the next check, not reported here

    async def _load(self, key_name: str, month_start: float, month_end: float) -> _KeySpend:
        started = self._monotonic()
        base = await self._read(key_name, month_start, month_end)
        entry = _KeySpend(month_start, base, started)
        old = self._keys.peek(key_name)
        if old is not None and old.month_start == month_start:
            # Keep what was added since just before this read began: it may not be in the figure just read.
            for at, usd in old.recent:
                if at >= started:
                    entry.note(at, usd)
        self._keys.put(key_name, entry)
        return entry
