"""Status cache: TTLs, LRU bounds, coalescing, shielding, stale answers and the cache metric."""

from __future__ import annotations

import asyncio
import gc
import io
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from gateway.errors import NotFound, UpstreamTimeout, UpstreamUnavailable
from gateway.logs import make_logger
from gateway.metrics import Metrics, create_metrics
from gateway.status.poller import (
    ENTRY_OVERHEAD_BYTES,
    CachedStatus,
    Coalescer,
    FetchResult,
    MemoryStatusCache,
    StatusPoller,
)
from gateway.upstream.client import UpstreamResponse

JSON = [("content-type", "application/json")]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def status_body(task_id: str, status: str, **extra: object) -> bytes:
    return orjson.dumps({"id": task_id, "task_id": task_id, "status": status, **extra})


def answer(task_id: str, status: str, **extra: object) -> FetchResult:
    body = status_body(task_id, status, **extra)
    return FetchResult(200, list(JSON), body, orjson.loads(body))


class FakeFetch:
    """Counts upstream calls; answers from a script of results or exceptions, optionally after a gate opens."""

    def __init__(self, *script: FetchResult | Exception) -> None:
        self.script = list(script)
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, task_id: str) -> FetchResult:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item


def make_poller(
    fetch: Callable[[str], Awaitable[FetchResult]],
    *,
    clock: FakeClock | None = None,
    on_fresh: Callable[[str, FetchResult], Awaitable[None]] | None = None,
    metrics: Metrics | None = None,
    **cache_kwargs: int,
) -> tuple[StatusPoller, MemoryStatusCache, Metrics]:
    metrics = metrics or create_metrics()
    options = {"pending_ttl_s": 2, "terminal_ttl_s": 3600, "max_entries": 1000, "max_bytes": 1 << 20}
    options.update(cache_kwargs)
    cache = MemoryStatusCache(**options, clock=clock or FakeClock())
    return (
        StatusPoller(
            cache, Coalescer(), metrics, fetch=fetch, on_fresh=on_fresh, log=make_logger(stream=io.StringIO())
        ),
        cache,
        metrics,
    )


def cache_count(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("kling_gateway_status_cache_total", {"result": result}) or 0.0


class TestMemoryStatusCache:
    """TTL by status and LRU bounds of the in-process cache."""

    def test_pending_entry_expires_after_pending_ttl(self) -> None:
        """A pending status is fresh for pending_ttl_s on the injected clock, then comes back not fresh."""
        clock = FakeClock()
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=10, max_bytes=1 << 16, clock=clock)
        cache.put("t1", b"{}", JSON, "in_progress", False)
        clock.now += 1.999
        assert cache.get("t1")[1] is True
        clock.now += 0.001
        entry, fresh = cache.get("t1")
        assert entry is not None and entry.status_text == "in_progress"
        assert fresh is False

    def test_terminal_entry_lives_terminal_ttl(self) -> None:
        """A terminal status stays fresh far past pending_ttl_s, until terminal_ttl_s."""
        clock = FakeClock()
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=10, max_bytes=1 << 16, clock=clock)
        entry = cache.put("t1", b"{}", JSON, "completed", True)
        assert entry.terminal and entry.fresh_until == entry.stored_at + 3600
        clock.now += 3599
        assert cache.get("t1")[1] is True
        clock.now += 1
        assert cache.get("t1")[1] is False

    def test_unknown_task_is_absent(self) -> None:
        """A task never put is neither an entry nor fresh."""
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=10, max_bytes=1 << 16)
        assert cache.get("nope") == (None, False)

    def test_lru_evicts_least_recently_used(self) -> None:
        """Past max_entries the least recently used entry goes; a get counts as use."""
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=2, max_bytes=1 << 16)
        cache.put("a", b"{}", JSON, "queued", False)
        cache.put("b", b"{}", JSON, "queued", False)
        cache.get("a")
        cache.put("c", b"{}", JSON, "queued", False)
        assert cache.get("b")[0] is None
        assert cache.get("a")[0] is not None and cache.get("c")[0] is not None

    def test_byte_bound_evicts_and_accounts(self) -> None:
        """Entries are evicted to stay within max_bytes, and replacing an entry does not double count it."""
        size = ENTRY_OVERHEAD_BYTES + 1 + 100 + len("content-typeapplication/json") + len("queued")
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=100, max_bytes=3 * size)
        for name in "abcd":
            cache.put(name, b"x" * 100, JSON, "queued", False)
        assert len(cache) == 3 and cache.bytes_used == 3 * size
        cache.put("d", b"x" * 100, JSON, "queued", False)
        assert len(cache) == 3 and cache.bytes_used == 3 * size

    def test_entry_larger_than_the_bound_is_not_kept(self) -> None:
        """An answer bigger than max_bytes by itself is returned but neither stored nor evicting others."""
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=10, max_bytes=4096)
        cache.put("small", b"{}", JSON, "queued", False)
        entry = cache.put("huge", b"x" * 5000, JSON, "completed", True)
        assert entry.status_text == "completed"
        assert cache.get("huge")[0] is None and cache.get("small")[0] is not None

    def test_bounded_under_100000_distinct_tasks(self) -> None:
        """100,000 distinct tasks leave the cache within its entry and byte bounds, and memory flat."""
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=5000, max_bytes=1_000_000)
        body = status_body("task_0000000000", "in_progress", progress=50)
        tracemalloc.start()
        try:
            for i in range(100_000):
                cache.put(f"task_{i:010d}", body, JSON, "in_progress", False)
                if i == 9_999:
                    baseline = tracemalloc.get_traced_memory()[0]
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        assert len(cache) <= 5000 and cache.bytes_used <= 1_000_000
        assert len(cache) == 1_000_000 // (ENTRY_OVERHEAD_BYTES + 15 + len(body) + 28 + 11)
        assert grown < 256 * 1024  # 90,000 more puts: no growth beyond noise

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"pending_ttl_s": -1},
            {"terminal_ttl_s": -1},
            {"max_entries": 0},
            {"max_bytes": 0},
        ],
    )
    def test_rejects_bad_bounds(self, kwargs: dict[str, float]) -> None:
        """Negative TTLs and non-positive bounds are configuration errors."""
        options: dict[str, float] = {"pending_ttl_s": 2, "terminal_ttl_s": 3600, "max_entries": 1, "max_bytes": 1}
        options.update(kwargs)
        with pytest.raises(ValueError):
            MemoryStatusCache(**options)  # type: ignore[arg-type]


class TestCoalescer:
    """One shared call per key, shielded from cancellation, forgotten when done."""

    async def test_concurrent_callers_share_one_call(self) -> None:
        """Callers of one key share the leader's call; only followers are marked as such."""
        gate, calls = asyncio.Event(), []

        async def factory() -> str:
            calls.append(1)
            await gate.wait()
            return "value"

        coalescer = Coalescer()
        waiters = [asyncio.create_task(coalescer.run("k", factory)) for _ in range(10)]
        await asyncio.sleep(0)
        assert len(coalescer) == 1
        gate.set()
        results = await asyncio.gather(*waiters)
        assert len(calls) == 1
        assert results[0] == ("value", False)
        assert all(result == ("value", True) for result in results[1:])
        assert len(coalescer) == 0

    async def test_different_keys_do_not_share(self) -> None:
        """Calls under different keys run separately."""
        coalescer, calls = Coalescer(), []

        async def factory() -> int:
            calls.append(1)
            await asyncio.sleep(0)
            return len(calls)

        await asyncio.gather(coalescer.run("a", factory), coalescer.run("b", factory))
        assert len(calls) == 2

    async def test_failure_reaches_all_waiters_and_is_forgotten(self) -> None:
        """Every waiter sees the failure; the next call runs the factory afresh."""
        gate, calls = asyncio.Event(), []

        async def failing() -> str:
            calls.append(1)
            await gate.wait()
            raise UpstreamUnavailable("down")

        coalescer = Coalescer()
        waiters = [asyncio.create_task(coalescer.run("k", failing)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(result, UpstreamUnavailable) for result in results)
        assert len(coalescer) == 0

        async def working() -> str:
            return "ok"

        assert await coalescer.run("k", working) == ("ok", False)
        assert len(calls) == 1

    async def test_failure_with_no_waiter_left_is_retrieved(self) -> None:
        """A shared call whose waiters all left may fail without an unretrieved-exception complaint."""
        gate = asyncio.Event()

        async def failing() -> str:
            await gate.wait()
            raise UpstreamUnavailable("down")

        complaints: list[dict[str, object]] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: complaints.append(context))
        try:
            coalescer = Coalescer()
            waiter = asyncio.create_task(coalescer.run("k", failing))
            await asyncio.sleep(0)
            waiter.cancel()
            gate.set()
            for _ in range(3):
                await asyncio.sleep(0)
            del waiter
            gc.collect()
        finally:
            loop.set_exception_handler(None)
        assert len(coalescer) == 0
        assert complaints == []

    async def test_aclose_cancels_calls_in_flight(self) -> None:
        """aclose cancels shared calls nobody will see finish, and forgets them."""
        coalescer = Coalescer()

        async def forever() -> str:
            await asyncio.Event().wait()
            return "never"

        waiter = asyncio.create_task(coalescer.run("k", forever))
        await asyncio.sleep(0)
        await coalescer.aclose()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(coalescer) == 0


class TestStatusPoller:
    """Polls answered HIT, MISS or STALE, with one upstream call per task per TTL."""

    async def test_thousand_concurrent_polls_cost_one_upstream_call(self) -> None:
        """1,000 concurrent polls of one pending task: one fetch, one miss and 999 coalesced, all MISS."""
        fetch = FakeFetch(answer("t1", "in_progress", progress=10))
        fetch.gate = asyncio.Event()
        poller, _, metrics = make_poller(fetch)
        polls = [asyncio.create_task(poller.poll("t1")) for _ in range(1000)]
        await fetch.started.wait()
        await asyncio.sleep(0)
        fetch.gate.set()
        outcomes = await asyncio.gather(*polls)
        assert fetch.calls == 1
        assert {(o.status_code, o.x_cache, o.body) for o in outcomes} == {
            (200, "MISS", status_body("t1", "in_progress", progress=10))
        }
        assert cache_count(metrics, "miss") == 1 and cache_count(metrics, "coalesced") == 999

    async def test_fresh_entry_is_a_hit_then_expires(self) -> None:
        """Within pending_ttl_s a poll is a HIT without a fetch; after it the upstream is asked again."""
        clock = FakeClock()
        fetch = FakeFetch(answer("t1", "queued"), answer("t1", "in_progress"))
        poller, _, metrics = make_poller(fetch, clock=clock)
        assert (await poller.poll("t1")).x_cache == "MISS"
        clock.now += 1.5
        hit = await poller.poll("t1")
        assert hit.x_cache == "HIT" and hit.status_code == 200 and hit.headers == tuple(JSON)
        assert orjson.loads(hit.body)["status"] == "queued"
        clock.now += 0.5
        again = await poller.poll("t1")
        assert again.x_cache == "MISS" and orjson.loads(again.body)["status"] == "in_progress"
        assert fetch.calls == 2
        assert cache_count(metrics, "hit") == 1 and cache_count(metrics, "miss") == 2

    async def test_terminal_status_cached_for_terminal_ttl(self) -> None:
        """A completed status is answered from the cache for terminal_ttl_s, a pending one only pending_ttl_s."""
        clock = FakeClock()
        fetch = FakeFetch(answer("t1", "completed", progress=100))
        poller, cache, _ = make_poller(fetch, clock=clock)
        await poller.poll("t1")
        entry = cache.get("t1")[0]
        assert entry is not None and entry.terminal and entry.status_text == "completed"
        clock.now += 3000
        assert (await poller.poll("t1")).x_cache == "HIT"
        assert fetch.calls == 1

    async def test_cancelled_leader_does_not_break_followers(self) -> None:
        """Cancelling the first poller (a client gone) leaves the shared fetch running for the others."""
        fetch = FakeFetch(answer("t1", "in_progress"))
        fetch.gate = asyncio.Event()
        poller, _, _ = make_poller(fetch)
        leader = asyncio.create_task(poller.poll("t1"))
        await fetch.started.wait()
        followers = [asyncio.create_task(poller.poll("t1")) for _ in range(5)]
        await asyncio.sleep(0)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        fetch.gate.set()
        outcomes = await asyncio.gather(*followers)
        assert all(o.status_code == 200 and o.x_cache == "MISS" for o in outcomes)
        assert fetch.calls == 1

    async def test_on_fresh_runs_once_per_fetch_even_if_leader_leaves(self) -> None:
        """The ledger observation runs once per upstream answer, inside the shared call."""
        seen: list[tuple[str, str | None]] = []

        async def on_fresh(task_id: str, result: FetchResult) -> None:
            seen.append((task_id, result.status_text))

        fetch = FakeFetch(answer("t1", "completed"))
        fetch.gate = asyncio.Event()
        poller, _, _ = make_poller(fetch, on_fresh=on_fresh)
        leader = asyncio.create_task(poller.poll("t1"))
        follower = asyncio.create_task(poller.poll("t1"))
        await fetch.started.wait()
        leader.cancel()
        fetch.gate.set()
        assert (await follower).x_cache == "MISS"
        assert seen == [("t1", "completed")]

    async def test_on_fresh_failure_does_not_fail_the_poll(self) -> None:
        """A failing ledger observation still answers the poll and the status is cached."""

        async def on_fresh(task_id: str, result: FetchResult) -> None:
            raise RuntimeError("store down")

        poller, cache, _ = make_poller(FakeFetch(answer("t1", "queued")), on_fresh=on_fresh)
        assert (await poller.poll("t1")).status_code == 200
        assert cache.get("t1")[0] is not None

    async def test_failed_fetch_is_not_cached_and_does_not_poison(self) -> None:
        """A failed fetch with nothing cached re-raises; the next poll fetches again and succeeds."""
        fetch = FakeFetch(UpstreamTimeout("slow"), answer("t1", "queued"))
        poller, cache, _ = make_poller(fetch)
        with pytest.raises(UpstreamTimeout):
            await poller.poll("t1")
        assert len(cache) == 0
        assert (await poller.poll("t1")).x_cache == "MISS"
        assert fetch.calls == 2

    @pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
    async def test_error_answers_are_never_cached(self, status: int) -> None:
        """Non-200 answers pass through with their status and body, uncached, as MISS."""
        error = FetchResult(status, list(JSON), b'{"error": {"message": "no"}}', {"error": {"message": "no"}})
        fetch = FakeFetch(error)
        poller, cache, _ = make_poller(fetch)
        for _ in range(2):
            outcome = await poller.poll("t1")
            assert (outcome.status_code, outcome.x_cache) == (status, "MISS")
            assert outcome.body == error.body
        assert len(cache) == 0 and fetch.calls == 2

    async def test_unusable_200_is_passed_through_uncached(self) -> None:
        """A 200 without a JSON status object is answered as is and not cached."""
        fetch = FakeFetch(FetchResult(200, [], b"not json", None))
        poller, cache, _ = make_poller(fetch)
        outcome = await poller.poll("t1")
        assert (outcome.status_code, outcome.body, outcome.x_cache) == (200, b"not json", "MISS")
        assert len(cache) == 0

    @pytest.mark.parametrize(
        "failure",
        [
            UpstreamUnavailable("unreachable"),
            UpstreamTimeout("slow"),
            FetchResult(503, [], b"busy", None),
            FetchResult(429, [], b"slow down", None),
            FetchResult(500, [], b"oops", None),
        ],
    )
    async def test_stale_on_upstream_failure(self, failure: FetchResult | Exception) -> None:
        """An expired entry is served STALE when the upstream fails, times out, throttles or answers 5xx."""
        clock = FakeClock()
        fetch = FakeFetch(answer("t1", "in_progress", progress=40), failure)
        poller, _, metrics = make_poller(fetch, clock=clock)
        await poller.poll("t1")
        clock.now += 10
        stale = await poller.poll("t1")
        assert (stale.status_code, stale.x_cache) == (200, "STALE")
        assert orjson.loads(stale.body)["progress"] == 40
        assert cache_count(metrics, "stale") == 1 and cache_count(metrics, "miss") == 1

    async def test_stale_for_every_coalesced_waiter(self) -> None:
        """All waiters on a failed shared call get the stale entry."""
        clock = FakeClock()
        fetch = FakeFetch(answer("t1", "queued"), UpstreamUnavailable("down"))
        poller, _, metrics = make_poller(fetch, clock=clock)
        await poller.poll("t1")
        clock.now += 10
        fetch.gate = asyncio.Event()
        fetch.started.clear()
        polls = [asyncio.create_task(poller.poll("t1")) for _ in range(5)]
        await fetch.started.wait()
        fetch.gate.set()
        outcomes = await asyncio.gather(*polls)
        assert {o.x_cache for o in outcomes} == {"STALE"} and fetch.calls == 2
        assert cache_count(metrics, "stale") == 5

    async def test_not_found_passes_through_even_with_stale_entry(self) -> None:
        """A 404 is the upstream's answer, not a failure: it is passed through, not replaced by a stale entry."""
        clock = FakeClock()
        fetch = FakeFetch(answer("t1", "queued"), FetchResult(404, [], b"gone", None))
        poller, _, _ = make_poller(fetch, clock=clock)
        await poller.poll("t1")
        clock.now += 10
        outcome = await poller.poll("t1")
        assert (outcome.status_code, outcome.x_cache) == (404, "MISS")

    async def test_upstream_error_without_entry_is_raised(self) -> None:
        """A 502 with nothing cached reaches the caller unchanged."""
        poller, _, metrics = make_poller(FakeFetch(UpstreamUnavailable("down")))
        with pytest.raises(UpstreamUnavailable):
            await poller.poll("t1")
        assert cache_count(metrics, "stale") == 0

    async def test_non_upstream_gateway_errors_are_never_replaced_by_stale(self) -> None:
        """A GatewayError below 500 is an answer, not an outage: it is raised even with an entry cached."""
        clock = FakeClock()
        poller, _, _ = make_poller(FakeFetch(answer("t1", "queued"), NotFound("no")), clock=clock)
        await poller.poll("t1")
        clock.now += 10
        with pytest.raises(NotFound):
            await poller.poll("t1")

    async def test_prime_answers_without_upstream(self) -> None:
        """A status primed from the ledger is a HIT with zero upstream calls."""
        fetch = FakeFetch(UpstreamUnavailable("must not be called"))
        poller, _, metrics = make_poller(fetch)
        body = status_body("t1", "completed", progress=100)
        poller.prime("t1", body, JSON, "completed", True)
        outcome = await poller.poll("t1")
        assert (outcome.status_code, outcome.body, outcome.x_cache) == (200, body, "HIT")
        assert fetch.calls == 0 and cache_count(metrics, "hit") == 1

    async def test_terminal_status_from_the_ledger_after_restart(self) -> None:
        """After a restart (empty cache) a settled task's stored body is a HIT with zero upstream calls."""
        fetch = FakeFetch(UpstreamUnavailable("must not be called"))
        poller, cache, metrics = make_poller(fetch)
        body = status_body("t1", "completed", progress=100, video_url="https://cdn.example.com/v.mp4")
        first = await poller.poll("t1", terminal_body=body)
        assert (first.status_code, first.body, first.x_cache) == (200, body, "HIT")
        assert first.headers == (("content-type", "application/json"),)
        assert (await poller.poll("t1")).x_cache == "HIT"  # now cached
        assert fetch.calls == 0 and cache_count(metrics, "hit") == 2
        entry = cache.get("t1")[0]
        assert entry is not None and entry.terminal

    @pytest.mark.parametrize("stored", [b"not json", b'{"status": "in_progress"}', b'{"status": 1}'])
    async def test_unusable_stored_body_falls_back_to_upstream(self, stored: bytes) -> None:
        """A stored body that is not a terminal status is ignored and the upstream asked."""
        fetch = FakeFetch(answer("t1", "completed"))
        poller, _, _ = make_poller(fetch)
        assert (await poller.poll("t1", terminal_body=stored)).x_cache == "MISS"
        assert fetch.calls == 1


class TestFetchResult:
    """Building a FetchResult from an upstream answer."""

    def test_from_upstream_parses_and_filters(self) -> None:
        """The JSON object is parsed, and hop-by-hop and recomputed headers are dropped."""
        response = UpstreamResponse(
            200,
            [("Content-Type", "application/json"), ("Connection", "keep-alive"), ("Date", "x")],
            status_body("t1", "queued"),
            0.01,
        )
        result = FetchResult.from_upstream(response)
        assert tuple(result.headers) == (("Content-Type", "application/json"),)
        assert result.parsed is not None and result.status_text == "queued"

    @pytest.mark.parametrize("body", [b"[1, 2]", b"nope", b'{"status": 3}'])
    def test_no_status_text_without_a_string_status(self, body: bytes) -> None:
        """Only a JSON object with a string status has a status_text."""
        result = FetchResult.from_upstream(UpstreamResponse(200, [], body, 0.0))
        assert result.status_text is None


class FakeShared:
    """A shared (other replicas') cache holding one entry; counts reads."""

    def __init__(self, entry: CachedStatus | None, clock: FakeClock) -> None:
        self.entry = entry
        self.clock = clock
        self.reads = 0
        self.puts: list[str] = []

    async def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        self.reads += 1
        if self.entry is None:
            return None, False
        return self.entry, self.clock() < self.entry.fresh_until

    async def put(self, task_id: str, body: bytes, headers: Any, status_text: str, terminal: bool) -> None:
        self.puts.append(status_text)

    async def once(self, task_id: str, fetch: Callable[[], Awaitable[FetchResult]]) -> tuple[FetchResult, bool]:
        return await fetch(), False


class TestSharedStatusCache:
    def poller(self, fetch: FakeFetch, shared: FakeShared, clock: FakeClock) -> tuple[StatusPoller, Metrics]:
        metrics = create_metrics()
        cache = MemoryStatusCache(pending_ttl_s=2, terminal_ttl_s=3600, max_entries=100, max_bytes=1 << 20, clock=clock)
        poller = StatusPoller(
            cache, Coalescer(), metrics, fetch=fetch, shared=shared, clock=clock, log=make_logger(stream=io.StringIO())
        )  # type: ignore[arg-type]
        return poller, metrics

    async def test_another_replicas_answer_is_a_hit_kept_here_for_the_freshness_it_has_left(self) -> None:
        clock = FakeClock()
        body = status_body("t1", "in_progress")
        shared = FakeShared(
            CachedStatus(body, tuple(JSON), "in_progress", False, clock.now - 0.5, clock.now + 1.5), clock
        )
        fetch = FakeFetch(answer("t1", "in_progress", progress=50))
        poller, metrics = self.poller(fetch, shared, clock)

        first = await poller.poll("t1")
        clock.now += 1.4
        second = await poller.poll("t1")  # from this replica's copy: no round trip
        clock.now += 0.2  # the shared entry's freshness is over, and so is the copy's
        third = await poller.poll("t1")

        assert (first.x_cache, first.body, second.x_cache, second.body) == ("HIT", body, "HIT", body)
        assert third.x_cache == "MISS" and b'"progress":50' in third.body
        assert shared.reads == 2  # the first poll, and the third (before it fetched)
        assert fetch.calls == 1
        assert shared.puts == ["in_progress"]  # what this replica fetched is shared
        assert cache_count(metrics, "hit") == 2

    async def test_an_expired_shared_entry_is_served_stale_when_the_upstream_fails(self) -> None:
        clock = FakeClock()
        body = status_body("t1", "queued")
        shared = FakeShared(CachedStatus(body, tuple(JSON), "queued", False, clock.now - 5, clock.now - 3), clock)
        poller, _ = self.poller(FakeFetch(UpstreamUnavailable("upstream down")), shared, clock)

        outcome = await poller.poll("t1")

        assert (outcome.status_code, outcome.x_cache, outcome.body) == (200, "STALE", body)
