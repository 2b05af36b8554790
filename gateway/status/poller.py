"""Task status cache: TTL by status, LRU bounds, one shared upstream call per task, stale answers on failure.

``StatusPoller.poll`` answers ``GET /v1/videos/{task_id}`` (SPEC section 6): HIT from a fresh entry or the ledger's
terminal body; otherwise one coalesced upstream call (MISS, followers counted as coalesced), whose 200 answer is
cached and observed by the ledger once (``on_fresh``); on 429/5xx with an expired entry, that entry as STALE. A
client that disconnects never cancels the shared call. With ``[cache] url`` set, a ``SharedStatusCache`` (Redis)
stands behind the in-process one and one replica calls the upstream for all; its failures read as misses.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar, cast

import orjson

from gateway.catalog import TERMINAL
from gateway.errors import GatewayError
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.upstream.client import UpstreamResponse, inbound_headers

T = TypeVar("T")
XCache = Literal["HIT", "MISS", "STALE"]
HeaderTuple = tuple[tuple[str, str], ...]

#: Bytes charged to every entry on top of its body and headers: the entry object, its key and the LRU links.
ENTRY_OVERHEAD_BYTES: Final = 320
#: Headers replayed with a status body that comes from the ledger rather than the upstream.
JSON_HEADERS: Final = (("content-type", "application/json"),)
#: Upstream answers after which an existing cached status is served instead (the upstream is failing).
STALE_ON_STATUS: Final = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class CachedStatus:
    """One task's last 200 status answer: body and end-to-end headers to replay, and when it goes stale."""

    body: bytes
    headers: HeaderTuple
    status_text: str
    terminal: bool
    stored_at: float
    fresh_until: float


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What the upstream answered to one status call; ``parsed`` is the body if it is a JSON object."""

    status_code: int
    headers: Sequence[tuple[str, str]]
    body: bytes
    parsed: dict[str, Any] | None = None

    @classmethod
    def from_upstream(cls, response: UpstreamResponse) -> FetchResult:
        """The upstream answer with end-to-end headers only and its body parsed when it is a JSON object."""
        headers = tuple(inbound_headers(response.headers))
        return cls(response.status, headers, response.body, parse_object(response.body))

    @property
    def status_text(self) -> str | None:
        """The task status of a 200 JSON answer, else None."""
        if self.status_code != 200 or self.parsed is None:
            return None
        status = self.parsed.get("status")
        return status if isinstance(status, str) else None


@dataclass(frozen=True, slots=True)
class PollOutcome:
    """The answer to one status poll and where it came from (``X-Cache``)."""

    status_code: int
    headers: HeaderTuple
    body: bytes
    x_cache: XCache


def parse_object(body: bytes) -> dict[str, Any] | None:
    """``body`` as a JSON object, or None when it is not one."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class StatusCache(Protocol):
    """What ``StatusPoller`` needs from a cache backend."""

    def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        """The entry for ``task_id`` (fresh or not) and whether it is still fresh."""

    def put(
        self,
        task_id: str,
        body: bytes,
        headers: Iterable[tuple[str, str]],
        status_text: str,
        terminal: bool,
        fresh_for_s: float | None = None,
    ) -> CachedStatus:
        """Store a 200 status answer; its TTL follows ``terminal`` unless ``fresh_for_s`` says how long."""


class SharedStatusCache(Protocol):
    """A status cache every replica sees (Redis). Implementations never raise: a failure reads as a miss."""

    async def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        """The entry for ``task_id`` (fresh or not) and whether it is still fresh."""

    async def put(
        self, task_id: str, body: bytes, headers: Sequence[tuple[str, str]], status_text: str, terminal: bool
    ) -> None:
        """Share a 200 status answer; its TTL follows ``terminal``."""

    async def once(self, task_id: str, fetch: Callable[[], Awaitable[FetchResult]]) -> tuple[FetchResult, bool]:
        """``(fetch(), False)``, or ``(that answer, True)`` when another replica fetched ``task_id`` meanwhile."""


_MAX_HEADER_SETS = 1024


class MemoryStatusCache:
    """In-process status cache, LRU-bounded by entry count and by bytes.

    >>> cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=1000, max_bytes=1 << 20)
    >>> _ = cache.put("t1", b'{"status": "queued"}', [("content-type", "application/json")], "queued", False)
    >>> cache.get("t1")[1], len(cache)
    (True, 1)

    Bytes are the body, headers, key and status text plus ``ENTRY_OVERHEAD_BYTES`` per entry, so ``max_bytes``
    bounds real memory within a small factor. An answer larger than ``max_bytes`` on its own is not kept.
    """

    def __init__(
        self,
        *,
        pending_ttl_s: float,
        terminal_ttl_s: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if pending_ttl_s < 0 or terminal_ttl_s < 0:
            raise ValueError("pending_ttl_s and terminal_ttl_s must not be negative")
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self._pending_ttl_s = pending_ttl_s
        self._terminal_ttl_s = terminal_ttl_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CachedStatus, int]] = OrderedDict()
        self._bytes = 0
        # Most tasks' answers carry the same few headers: one shared tuple per distinct set, not one per entry.
        self._header_sets: dict[HeaderTuple, HeaderTuple] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Bytes currently charged to entries (see the class docstring)."""
        return self._bytes

    def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        """The entry (marked used for LRU) and whether it is fresh; expired entries come back not fresh."""
        found = self._entries.get(task_id)
        if found is None:
            return None, False
        self._entries.move_to_end(task_id)
        entry = found[0]
        return entry, self._clock() < entry.fresh_until

    def put(
        self,
        task_id: str,
        body: bytes,
        headers: Iterable[tuple[str, str]],
        status_text: str,
        terminal: bool,
        fresh_for_s: float | None = None,
    ) -> CachedStatus:
        """Store a 200 status answer (callers never put errors); evicts least recently used entries to fit.

        Fresh for the TTL of its kind, or for ``fresh_for_s`` (a copy of a shared entry keeps the time it has left).
        """
        now = self._clock()
        if fresh_for_s is None:
            fresh_for_s = self._terminal_ttl_s if terminal else self._pending_ttl_s
        entry = CachedStatus(
            body=body,
            headers=self._shared(tuple(headers)),
            status_text=status_text,
            terminal=terminal,
            stored_at=now,
            fresh_until=now + fresh_for_s,
        )
        size = _entry_size(task_id, entry)
        self._discard(task_id)
        if size > self._max_bytes:
            return entry
        self._entries[task_id] = (entry, size)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
        return entry

    def _shared(self, headers: HeaderTuple) -> HeaderTuple:
        shared = self._header_sets.get(headers)
        if shared is not None:
            return shared
        if len(self._header_sets) < _MAX_HEADER_SETS:
            self._header_sets[headers] = headers
        return headers

    def _discard(self, task_id: str) -> None:
        old = self._entries.pop(task_id, None)
        if old is not None:
            self._bytes -= old[1]


def _entry_size(task_id: str, entry: CachedStatus) -> int:
    headers = sum(len(name) + len(value) for name, value in entry.headers)
    return ENTRY_OVERHEAD_BYTES + len(task_id) + len(entry.body) + headers + len(entry.status_text)


class Coalescer:
    """Concurrent calls with one key share one in-flight call.

    ``value, followed = await coalescer.run(key, factory)``: the first caller (the leader, ``followed`` False)
    starts ``factory()`` as a task; callers arriving while it runs (followers, True) await the same task. Each
    caller awaits it through ``asyncio.shield``: cancelling a caller never cancels the shared call. Its result or
    exception goes to every current waiter; the key is forgotten as the call finishes, so nothing is remembered —
    a failure does not poison the next call, and finished calls hold no memory.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[Any]] = {}

    def __len__(self) -> int:
        """Calls in flight."""
        return len(self._inflight)

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``factory()``'s result, shared with concurrent callers of ``key``; True if this caller followed."""
        task = self._inflight.get(key)
        followed = task is not None
        if task is None:
            # The task exists only once create_task returns: it is handed to _lead through this cell
            # (cheaper than asyncio.current_task() inside it).
            cell: list[asyncio.Task[Any]] = []
            task = asyncio.create_task(self._lead(key, factory, cell))
            cell.append(task)
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return cast(T, await asyncio.shield(task)), followed

    async def _lead(self, key: str, factory: Callable[[], Awaitable[T]], cell: list[asyncio.Task[Any]]) -> T:
        try:
            return await factory()
        finally:
            # Forget the call before its waiters wake, so a caller arriving after a failure starts afresh.
            self._forget(key, cell[0])

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        self._forget(key, task)  # also covers a task cancelled before it ever ran
        if not task.cancelled():
            task.exception()  # retrieved here: a failure whose waiters all left is not "never retrieved"

    def _forget(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def aclose(self) -> None:
        """Cancel the calls in flight (at shutdown) and wait for them to end."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class StatusPoller:
    """Answers status polls from the cache, one shared upstream call per task, or a stale entry on failure.

    ``fetch(task_id)`` makes the upstream call (raising ``GatewayError`` 502/504 when it fails) and should
    return end-to-end headers only (``FetchResult.from_upstream`` does). ``on_fresh(task_id, result)`` — the
    ledger observation — runs once per cached upstream answer, inside the shared call.
    """

    def __init__(
        self,
        cache: StatusCache,
        coalescer: Coalescer,
        metrics: Metrics,
        *,
        fetch: Callable[[str], Awaitable[FetchResult]],
        on_fresh: Callable[[str, FetchResult], Awaitable[None]] | None = None,
        shared: SharedStatusCache | None = None,
        log: Logger,
        clock: Callable[[], float] = time.monotonic,  # the clock of both caches' fresh_until
    ) -> None:
        self._cache = cache
        self._coalescer = coalescer
        results = ("hit", "stale", "miss", "coalesced")
        self._counted = {result: metrics.status_cache.labels(result) for result in results}
        self._fetch = fetch
        self._on_fresh = on_fresh
        self._shared = shared
        self._clock = clock
        self._log = log

    def prime(
        self, task_id: str, body: bytes, headers: Iterable[tuple[str, str]], status_text: str, terminal: bool
    ) -> CachedStatus:
        """Seed the cache, e.g. from the ledger's stored terminal body, so the next poll is a HIT."""
        return self._cache.put(task_id, body, headers, status_text, terminal)

    async def poll(self, task_id: str, *, terminal_body: bytes | None = None) -> PollOutcome:
        """The status answer for ``task_id`` (ownership is the caller's to check first).

        ``terminal_body`` is the ledger's stored terminal status of a settled task (``TaskRecord.terminal_body``):
        without a fresh entry it is cached and answered as a HIT, so a poll after expiry or a restart costs no
        upstream call.
        """
        entry, fresh = self._cache.get(task_id)
        if entry is not None and fresh:
            return self._answer(entry, "HIT", "hit")
        if self._shared is not None:
            shared, shared_fresh = await self._shared.get(task_id)
            if shared is not None and shared_fresh:
                # Kept here for exactly the freshness it has left: no replica refetches a fresh entry, so the copy
                # cannot be older than what Redis holds, and the next polls on this replica cost no round trip.
                fresh_for_s = shared.fresh_until - self._clock()
                entry = self._cache.put(
                    task_id, shared.body, shared.headers, shared.status_text, shared.terminal, fresh_for_s
                )
                return self._answer(entry, "HIT", "hit")
            if shared is not None and (entry is None or shared.stored_at > entry.stored_at):
                entry = shared
        if terminal_body is not None:
            stored = parse_object(terminal_body)
            status = stored.get("status") if stored is not None else None
            if isinstance(status, str) and status in TERMINAL:
                entry = self.prime(task_id, terminal_body, JSON_HEADERS, status, True)
                return self._answer(entry, "HIT", "hit")
        try:
            (result, elsewhere), followed = await self._coalescer.run(task_id, lambda: self._refresh(task_id))
        except GatewayError as exc:
            stale = self._cache.get(task_id)[0] or entry
            if stale is None or exc.status < 500:  # 502/503/504: the upstream failed; anything else is an answer
                raise
            return self._answer(stale, "STALE", "stale")
        if result.status_code in STALE_ON_STATUS:
            stale = self._cache.get(task_id)[0] or entry
            if stale is not None:
                return self._answer(stale, "STALE", "stale")
        self._counted["coalesced" if followed or elsewhere else "miss"].inc()
        return PollOutcome(result.status_code, tuple(result.headers), result.body, "MISS")

    def _answer(self, entry: CachedStatus, x_cache: XCache, result: str) -> PollOutcome:
        self._counted[result].inc()
        return PollOutcome(200, entry.headers, entry.body, x_cache)

    async def _refresh(self, task_id: str) -> tuple[FetchResult, bool]:
        """The shared call, and whether another replica made it (its answer read from the shared cache)."""
        if self._shared is None:
            return await self._fetch_and_keep(task_id), False
        return await self._shared.once(task_id, lambda: self._fetch_and_keep(task_id))

    async def _fetch_and_keep(self, task_id: str) -> FetchResult:
        """Fetch, cache a usable 200 (here and in the shared cache), tell the ledger."""
        result = await self._fetch(task_id)
        status = result.status_text
        if status is None:
            return result
        terminal = status in TERMINAL
        self._cache.put(task_id, result.body, result.headers, status, terminal)
        if self._shared is not None:
            await self._shared.put(task_id, result.body, result.headers, status, terminal)
        if self._on_fresh is not None:
            try:
                await self._on_fresh(task_id, result)
            except Exception as exc:  # the poll is answered all the same; the settler retries the observation
                self._log.error("status_observe_failed", task_id=task_id, error=f"{type(exc).__name__}: {exc}")
        return result
