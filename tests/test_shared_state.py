"""The fail-open policy around Redis: a short rest after a failure, throttled warnings, a recovery line."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.cache_redis import CacheUnavailable
from gateway.shared_state import Health, SharedLimiter, SharedStatus
from gateway.status_cache import FetchResult


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
        health = Health(log, clock)
        assert not health.resting()
        health.failed("status_get", CacheUnavailable("down"))
        clock.now += 0.99
        assert health.resting()
        clock.now += 0.02
        assert not health.resting()

    def test_one_warning_per_operation_per_ten_seconds_then_a_recovery_line(self, log: Log, clock: Clock) -> None:
        health = Health(log, clock)
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

    async def check(self, key_name: str, rpm: int | None) -> float | None:
        self.calls += 1
        raise CacheUnavailable("Redis check failed: ConnectionError")


class TestSharedLimiter:
    async def test_a_failure_lets_the_request_through_and_rests_redis(self, log: Log, clock: Clock) -> None:
        limiter = FailingLimiter()
        shared = SharedLimiter(limiter, Health(log, clock))  # type: ignore[arg-type]

        assert await shared.check("team", 10) is None
        assert await shared.check("team", 10) is None  # resting: Redis not asked
        clock.now += 1.5
        assert await shared.check("team", 10) is None

        assert limiter.calls == 2
        assert await shared.check("team", None) is None
        assert limiter.calls == 2  # no limit, nothing to count


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
        shared = SharedStatus(FailingCache(), FailingFlight(), Health(log, clock), call_timeout_s=5.0)  # type: ignore[arg-type]
        fetched = FetchResult(200, (), b'{"status": "queued"}')
        calls = []

        async def fetch() -> FetchResult:
            calls.append(1)
            return fetched

        assert await shared.get("task_1") == (None, False)
        await shared.put("task_1", b"{}", (), "queued", False)  # resting: dropped quietly
        assert await shared.once("task_1", fetch) is fetched
        clock.now += 2
        assert await shared.once("task_1", fetch) is fetched  # Redis asked again, failed, fetched all the same

        assert len(calls) == 2
        assert [fields["operation"] for _, _, fields in log.lines] == ["status_get", "single_flight"]
