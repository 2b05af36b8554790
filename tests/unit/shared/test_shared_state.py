"""The fail-open policy around Redis: a short rest after a failure, throttled warnings, a recovery line."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.shared.fail_open import Health, SharedAccounts, SharedLimiter, SharedStatus
from gateway.shared.redis_ops import CacheUnavailable
from gateway.status.poller import CachedStatus, FetchResult


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log() -> Log:
    return Log()


class TestHealth:
    def test_rests_for_a_second_after_a_failure(self, log: Log, clock: Clock) -> None:
        health = Health(log, clock=clock)
        assert not health.resting()
        health.failed("status_get", CacheUnavailable("down"))
        clock.now += 0.99
        assert health.resting()
        clock.now += 0.02
        assert not health.resting()

    def test_one_warning_per_operation_per_ten_seconds_then_a_recovery_line(self, log: Log, clock: Clock) -> None:
        health = Health(log, clock=clock)
        for _ in range(3):
            health.failed("rate_limit", CacheUnavailable("down"))
            clock.now += 2
        health.failed("status_put", CacheUnavailable("down"))
        clock.now += 5  # 11 s after the first rate_limit warning
        health.failed("rate_limit", CacheUnavailable("still down"))
        health.worked("rate_limit")
        health.worked("rate_limit")
        health.worked("status_get")  # never failed: nothing to say

        assert [(level, event, fields["operation"]) for level, event, fields in log.lines] == [
            ("warning", "shared_state_unavailable", "rate_limit"),
            ("warning", "shared_state_unavailable", "status_put"),
            ("warning", "shared_state_unavailable", "rate_limit"),
            ("info", "shared_state_recovered", "rate_limit"),
        ]


class FailingLimiter:
    def __init__(self) -> None:
        self.calls = 0

    async def take(self, key_name: str, rpm: int, most: int) -> tuple[int, float | None, int]:
        self.calls += 1
        raise CacheUnavailable("Redis check failed: ConnectionError")


class Bucket:
    """A stand-in for ``RedisRateLimiter.take``: a fixed number of tokens, no refill; records each call."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.calls: list[int] = []

    async def take(self, key_name: str, rpm: int, most: int) -> tuple[int, float | None, int]:
        self.calls.append(most)
        if self.tokens < 1:
            return 0, 7.5, 0
        taken = min(most, self.tokens)
        self.tokens -= taken
        return taken, None, self.tokens


class TestSharedLimiter:
    async def test_a_failure_lets_the_request_through_and_rests_redis(self, log: Log, clock: Clock) -> None:
        limiter = FailingLimiter()
        shared = SharedLimiter(limiter, Health(log, clock=clock))  # type: ignore[arg-type]

        assert await shared.check("team", 10) is None
        assert await shared.check("team", 10) is None  # resting: Redis not asked
        clock.now += 1.5
        assert await shared.check("team", 10) is None

        assert limiter.calls == 2
        assert await shared.check("team", None) is None
        assert limiter.calls == 2  # no limit, nothing to count


class TestLeases:
    async def test_a_busy_key_takes_a_tenth_of_a_second_of_tokens_at_once(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=1000)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock)  # type: ignore[arg-type]

        answers = [await shared.check("team", 6000) for _ in range(21)]

        assert answers == [None] * 21
        assert bucket.calls == [10, 10, 10]  # 6000 rpm = 100/s: leases of 10; 21 requests, three round trips
        assert bucket.tokens == 1000 - 30  # taken from the shared bucket before they are spent

    async def test_a_small_limit_asks_redis_every_time_and_is_exact(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=3)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock)  # type: ignore[arg-type]

        answers = [await shared.check("team", 1199) for _ in range(4)]

        assert answers == [None, None, None, 7.5]
        assert bucket.calls == [1, 1, 1, 1]

    async def test_a_lease_lasts_a_second_and_never_grants_more_than_was_taken(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=12)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock)  # type: ignore[arg-type]

        assert await shared.check("team", 6000) is None  # takes 10, spends 1
        clock.now += 1.01  # the 9 left are dropped
        assert await shared.check("team", 6000) is None  # takes the last 2
        assert await shared.check("team", 6000) is None
        assert await shared.check("team", 6000) == 7.5

        assert bucket.calls == [10, 10, 10]

    async def test_leases_are_per_key_and_bounded(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=1000)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock, max_keys=2)  # type: ignore[arg-type]

        for key in ("a", "b", "c", "a"):
            assert await shared.check(key, 6000) is None

        assert bucket.calls == [10, 10, 10, 10]  # "a" was evicted by "c", so it asked again


class TestAllowance:
    async def test_the_unspent_lease_plus_what_redis_reported_left(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=30)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock)  # type: ignore[arg-type]
        assert shared.allowance("team") is None  # never checked here: no figure

        seen = []
        for _ in range(4):
            await shared.check("team", 6000)  # leases of 10: 30 -> 20 left in Redis, 9 unspent here
            seen.append(shared.allowance("team"))

        assert seen == [(6000, 29), (6000, 28), (6000, 27), (6000, 26)]
        clock.now += 1.01  # the lease expired: its unspent tokens no longer count
        assert shared.allowance("team") == (6000, 20)

    async def test_a_refusal_leaves_nothing_and_a_small_limit_counts_only_redis(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=2)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock)  # type: ignore[arg-type]

        seen = []
        for _ in range(3):
            await shared.check("team", 60)
            seen.append(shared.allowance("team"))

        assert seen == [(60, 1), (60, 0), (60, 0)]

    async def test_no_figure_while_redis_fails(self, log: Log, clock: Clock) -> None:
        bucket = Bucket(tokens=5)
        shared = SharedLimiter(bucket, Health(log, clock=clock), clock=clock)  # type: ignore[arg-type]
        await shared.check("team", 60)
        assert shared.allowance("team") == (60, 4)

        shared._limiter = FailingLimiter()  # type: ignore[assignment]
        assert await shared.check("team", 60) is None  # let through uncounted
        assert shared.allowance("team") is None
        assert await shared.check("team", 60) is None  # resting: Redis not asked
        assert shared.allowance("team") is None


class FailingCache:
    async def get(self, task_id: str) -> Any:
        raise CacheUnavailable("Redis get failed")

    async def put(self, *args: Any) -> Any:
        raise CacheUnavailable("Redis put failed")


class FailingFlight:
    async def run(self, key: str, factory: Any, **options: Any) -> Any:
        raise CacheUnavailable("Redis single flight failed")


class TestSharedStatus:
    async def test_failures_read_as_misses_and_the_replica_fetches_itself(self, log: Log, clock: Clock) -> None:
        shared = SharedStatus(FailingCache(), FailingFlight(), Health(log, clock=clock), call_timeout_s=5.0)  # type: ignore[arg-type]
        fetched = FetchResult(200, (), b'{"status": "queued"}')
        calls = []

        async def fetch() -> FetchResult:
            calls.append(1)
            return fetched

        assert await shared.get("task_1") == (None, False)
        await shared.put("task_1", b"{}", (), "queued", False)  # resting: dropped quietly
        assert await shared.once("task_1", fetch) == (fetched, False)
        clock.now += 2
        assert await shared.once("task_1", fetch) == (fetched, False)  # Redis asked again, failed, fetched anyway

        assert len(calls) == 2
        assert [fields["operation"] for _, _, fields in log.lines] == ["status_get", "single_flight"]


class OneEntry:
    """A shared cache holding one entry; ``arrives`` replaces it when the other replica's answer lands."""

    def __init__(self, entry: CachedStatus | None, fresh: bool) -> None:
        self.entry, self.fresh = entry, fresh

    async def get(self, task_id: str) -> tuple[CachedStatus | None, bool]:
        return self.entry, self.fresh


class OtherReplicaLeads:
    """Single flight where another replica holds the lock: ``during`` runs while we wait, then ready() is asked."""

    def __init__(self, during: Any) -> None:
        self.during = during

    async def run(self, key: str, factory: Any, *, ready: Any, **options: Any) -> Any:
        self.during()
        if await ready():
            return None, True
        return await factory(), False


def _entry(body: bytes, stored_at: float) -> CachedStatus:
    return CachedStatus(body, (("content-type", "application/json"),), "queued", False, stored_at, stored_at + 2)


class TestOtherReplicasAnswer:
    async def test_the_answer_stored_while_waiting_is_taken(self, log: Log, clock: Clock) -> None:
        cache = OneEntry(_entry(b"old", stored_at=clock.now - 60), fresh=False)

        def lands() -> None:
            clock.now += 0.3
            cache.entry, cache.fresh = _entry(b"new", stored_at=clock.now), True

        shared = SharedStatus(
            cache, OtherReplicaLeads(lands), Health(log, clock=clock), call_timeout_s=5.0, clock=clock
        )  # type: ignore[arg-type]

        async def fetch() -> FetchResult:
            raise AssertionError("the other replica's answer should have been used")

        result, elsewhere = await shared.once("task_1", fetch)

        assert (result.status_code, result.body, elsewhere) == (200, b"new", True)
        assert result.headers == (("content-type", "application/json"),)

    async def test_an_old_expired_entry_is_not_taken_for_the_other_replicas_answer(
        self, log: Log, clock: Clock
    ) -> None:
        cache = OneEntry(_entry(b"old", stored_at=clock.now - 60), fresh=False)  # the other replica's call failed
        shared = SharedStatus(
            cache, OtherReplicaLeads(lambda: None), Health(log, clock=clock), call_timeout_s=5.0, clock=clock
        )  # type: ignore[arg-type]
        fetched = FetchResult(200, (), b"mine")

        async def fetch() -> FetchResult:
            return fetched

        assert await shared.once("task_1", fetch) == (fetched, False)


class FailingMarks:
    def __init__(self) -> None:
        self.calls = 0

    async def _fail(self, *args: object) -> Any:
        self.calls += 1
        raise CacheUnavailable("Redis account marks failed: ConnectionError")

    read = set_aside = unauthorized = end_aside = _fail


class TestSharedAccounts:
    async def test_failures_keep_each_replicas_own_marks_and_rest_redis(self, log: Log, clock: Clock) -> None:
        """A failed read is None (keep what is known), a failed write False (keep it here); then Redis rests."""
        marks = FailingMarks()
        shared = SharedAccounts(marks, Health(log, clock=clock))  # type: ignore[arg-type]
        assert await shared.read() is None
        assert await shared.set_aside("a", 1.0) is False  # resting: Redis not asked
        assert marks.calls == 1
        clock.now += 1.1
        assert await shared.unauthorized("a", "0123abcd") is False
        assert marks.calls == 2
        assert [(level, event) for level, event, _ in log.lines] == [
            ("warning", "shared_state_unavailable"),
            ("warning", "shared_state_unavailable"),
        ]
