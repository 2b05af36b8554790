"""The Redis building blocks against a real Redis: status cache, rate limiter, single flight, connecting, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.auth.rate_limits import RateLimiter
from gateway.shared.redis_ops import (
    CacheUnavailable,
    RedisAccountMarks,
    RedisRateLimiter,
    RedisSingleFlight,
    RedisStatusCache,
    connect,
    ping,
    redact_url,
)
from gateway.store.base import AccountMark

UNREACHABLE_URL = "redis://:hunter2-canary@127.0.0.1:1/0"
JSON = (("content-type", "application/json"),)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """One replica's connection."""
    connection = await connect(redis_url)
    yield connection
    await connection.aclose()


@pytest.fixture
async def other_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """Another replica's connection to the same Redis."""
    connection = await connect(redis_url)
    yield connection
    await connection.aclose()


def make_cache(client: aioredis.Redis, prefix: str, **options: Any) -> RedisStatusCache:
    settings: dict[str, Any] = {"pending_ttl_s": 2.0, "terminal_ttl_s": 60.0, "stale_keep_s": 60.0, **options}
    return RedisStatusCache(client, prefix=prefix, **settings)


class FakeClock:
    """A settable clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestStatusCache:
    async def test_round_trip(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """Body bytes (any bytes), headers, status text and terminal flag come back as they were put."""
        cache = make_cache(client, redis_prefix)
        body = b'{"status": "succeed"}\x00\xff\xfe binary tail'
        headers = (("content-type", "application/json"), ("x-request-id", "r\u00e9q-1"), ("x-empty", ""))
        put = await cache.put("task-1", body, headers, "succeed", True)
        entry, fresh = await cache.get("task-1")
        assert fresh
        assert entry is not None
        assert (entry.body, entry.headers, entry.status_text, entry.terminal) == (body, headers, "succeed", True)
        assert (put.body, put.headers, put.status_text, put.terminal) == (body, headers, "succeed", True)

    async def test_absent(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """An unknown task is (None, False)."""
        assert await make_cache(client, redis_prefix).get("nope") == (None, False)

    async def test_fresh_then_stale_then_gone(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """Fresh for pending_ttl_s, then returned not fresh for stale_keep_s, then gone."""
        cache = make_cache(client, redis_prefix, pending_ttl_s=0.15, stale_keep_s=0.3)
        await cache.put("t", b"{}", JSON, "processing", False)
        entry, fresh = await cache.get("t")
        assert entry is not None and fresh
        await asyncio.sleep(0.2)
        entry, fresh = await cache.get("t")
        assert entry is not None and not fresh
        assert entry.status_text == "processing"
        await asyncio.sleep(0.3)
        assert await cache.get("t") == (None, False)

    async def test_terminal_ttl(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """Terminal answers stay fresh for terminal_ttl_s, non-terminal ones only for pending_ttl_s."""
        cache = make_cache(client, redis_prefix, pending_ttl_s=0.1, terminal_ttl_s=30.0)
        await cache.put("done", b"{}", JSON, "succeed", True)
        await cache.put("busy", b"{}", JSON, "processing", False)
        await asyncio.sleep(0.15)
        assert (await cache.get("done"))[1] is True
        assert (await cache.get("busy"))[1] is False

    async def test_key_ttl_is_freshness_plus_stale_keep(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """Redis drops the key freshness + stale_keep_s after the put."""
        cache = make_cache(client, redis_prefix, pending_ttl_s=2.0, stale_keep_s=5.0)
        await cache.put("t", b"{}", JSON, "queued", False)
        assert 6500 < await client.pttl(cache.key("t")) <= 7000

    async def test_ttl_zero(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """pending_ttl_s=0: never fresh, still kept to be served stale."""
        cache = make_cache(client, redis_prefix, pending_ttl_s=0)
        put = await cache.put("t", b"{}", JSON, "queued", False)
        assert put.fresh_until == put.stored_at
        entry, fresh = await cache.get("t")
        assert entry is not None and not fresh

    async def test_nothing_to_keep(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """With no freshness and no stale keep, nothing is stored (and an older entry goes)."""
        keeping = make_cache(client, redis_prefix, pending_ttl_s=5)
        await keeping.put("t", b"{}", JSON, "queued", False)
        cache = make_cache(client, redis_prefix, pending_ttl_s=0, stale_keep_s=0)
        put = await cache.put("t", b"{}", JSON, "processing", False)
        assert put.status_text == "processing"
        assert await cache.get("t") == (None, False)

    async def test_oversize_not_stored(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """An answer over max_entry_bytes is returned but not stored, and the older entry is dropped."""
        cache = make_cache(client, redis_prefix, max_entry_bytes=200)
        await cache.put("t", b"{}", JSON, "queued", False)
        body = b"x" * 300
        put = await cache.put("t", body, JSON, "processing", False)
        assert put.body == body
        assert await cache.get("t") == (None, False)
        assert await client.exists(cache.key("t")) == 0

    async def test_replicas_share_entries(
        self, client: aioredis.Redis, other_client: aioredis.Redis, redis_prefix: str
    ) -> None:
        """A put through one replica's client is a fresh entry for another replica."""
        one, two = make_cache(client, redis_prefix), make_cache(other_client, redis_prefix)
        await one.put("t", b'{"status": "queued"}', JSON, "queued", False)
        entry, fresh = await two.get("t")
        assert fresh and entry is not None and entry.body == b'{"status": "queued"}'
        await two.put("t", b'{"status": "succeed"}', JSON, "succeed", True)
        entry, _ = await one.get("t")
        assert entry is not None and entry.terminal

    async def test_prefix_isolation(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """Caches with different prefixes on one Redis never see each other's entries."""
        one, two = make_cache(client, f"{redis_prefix}a:"), make_cache(client, f"{redis_prefix}b:")
        await one.put("t", b"{}", JSON, "queued", False)
        assert await two.get("t") == (None, False)
        assert (await one.get("t"))[0] is not None

    async def test_times_on_local_clock(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """stored_at/fresh_until are on the local clock: the put's from now, the get's derived from the PTTL."""
        clock = FakeClock(500.0)
        cache = make_cache(client, redis_prefix, pending_ttl_s=10, clock=clock)
        put = await cache.put("t", b"{}", JSON, "queued", False)
        assert (put.stored_at, put.fresh_until) == (500.0, 510.0)
        clock.now = 900.0  # another replica's clock, far off: freshness does not care
        entry, fresh = await cache.get("t")
        assert fresh and entry is not None
        assert entry.fresh_until == pytest.approx(910.0, abs=0.1)
        assert entry.stored_at == pytest.approx(900.0, abs=0.1)

    @pytest.mark.parametrize(
        "value",
        [b"", b"\x01", b"\x01\x00\x00\x00\x09[]", b"\x02\x00\x00\x00\x02[]", b"\x01\x00\x00\x00\x02[]", b"junk" * 10],
        ids=["empty", "short", "meta-past-end", "other-version", "wrong-meta", "junk"],
    )
    async def test_unreadable_value_is_a_miss(self, client: aioredis.Redis, redis_prefix: str, value: bytes) -> None:
        """A value this version cannot read (corrupt, other format) is treated as absent, not an error."""
        cache = make_cache(client, redis_prefix)
        await client.set(cache.key("t"), value, px=5000)
        assert await cache.get("t") == (None, False)

    def test_bad_settings(self, client: aioredis.Redis) -> None:
        """Negative TTLs and a non-positive size bound are refused."""
        with pytest.raises(ValueError, match="negative"):
            RedisStatusCache(client, pending_ttl_s=-1, terminal_ttl_s=1, stale_keep_s=1)
        with pytest.raises(ValueError, match="max_entry_bytes"):
            RedisStatusCache(client, pending_ttl_s=1, terminal_ttl_s=1, stale_keep_s=1, max_entry_bytes=0)


class TestRateLimiter:
    @pytest.mark.parametrize(
        ("rpm", "steps", "expected"),
        [
            # steps: (seconds to advance before the check); expected: None = allowed, float = retry-after
            pytest.param(3, [0, 0, 0, 0], [None, None, None, 20.0], id="burst-of-capacity-then-limited"),
            pytest.param(60, [0] * 60 + [0], [None] * 60 + [1.0], id="rpm60-retry-after-1s"),
            pytest.param(3, [0, 0, 0, 0, 20], [None, None, None, 20.0, None], id="recovers-after-retry-after"),
            pytest.param(3, [0, 0, 0, 0, 10], [None, None, None, 20.0, 10.0], id="partial-refill"),
            pytest.param(1, [0, 0, 59, 1], [None, 60.0, 1.0, None], id="rpm1"),
            pytest.param(2, [0, 0, 1000, 0, 0], [None, None, None, None, 30.0], id="refill-capped-at-capacity"),
            pytest.param(6, [0, 10, 10, 10], [None, None, None, None], id="steady-at-rate"),
            pytest.param(1, [0, -1000, 0], [None, 60.0, 60.0], id="clock-going-backwards"),
            pytest.param(None, [0] * 10, [None] * 10, id="unlimited"),
        ],
    )
    async def test_table_matches_memory_limiter(
        self,
        client: aioredis.Redis,
        redis_prefix: str,
        rpm: int | None,
        steps: list[float],
        expected: list[float | None],
    ) -> None:
        """With the same clock, every answer is keys.RateLimiter's (capacity rpm, refill rpm/60 per second)."""
        clock = FakeClock(1_700_000_000.0)  # a TIME-sized clock, so float precision is tested too
        limiter = RedisRateLimiter(client, prefix=redis_prefix, clock=clock)
        memory = RateLimiter(clock)
        got: list[float | None] = []
        want: list[float | None] = []
        for advance in steps:
            clock.now += advance
            got.append(await limiter.check("team-a", rpm))
            want.append(memory.check("team-a", rpm))
        assert [None if g is None else pytest.approx(g) for g in got] == expected
        assert [None if w is None else pytest.approx(w) for w in want] == got

    async def test_rpm_lowered(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """A lowered limit caps the bucket at the new capacity at once."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix, clock=FakeClock())
        assert await limiter.check("k", 100) is None
        results = [await limiter.check("k", 2) for _ in range(3)]
        assert results[:2] == [None, None]
        assert results[2] is not None

    @pytest.mark.parametrize("rpm", [0, -1])
    async def test_bad_rpm(self, client: aioredis.Redis, redis_prefix: str, rpm: int) -> None:
        """rpm below 1 is a ValueError, as in the memory limiter."""
        with pytest.raises(ValueError, match="rpm"):
            await RedisRateLimiter(client, prefix=redis_prefix).check("k", rpm)

    async def test_redis_clock_retry_after(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """On Redis TIME: capacity rpm, then a retry-after of about 60/rpm seconds."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix)
        assert [await limiter.check("k", 6) for _ in range(6)] == [None] * 6
        wait = await limiter.check("k", 6)
        assert wait is not None and 9.9 < wait <= 10.0

    async def test_redis_clock_refill(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """On Redis TIME, waiting the returned retry-after is enough for the next token."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix)
        wait = None
        for _ in range(1000):  # refilling at 10 tokens/s while we drain it
            wait = await limiter.check("k", 600)
            if wait is not None:
                break
        assert wait is not None and 0 < wait <= 0.1
        await asyncio.sleep(wait + 0.005)
        assert await limiter.check("k", 600) is None

    async def test_keys_are_independent(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """One key exhausting its bucket does not limit another."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix)
        assert await limiter.check("a", 1) is None
        assert await limiter.check("a", 1) is not None
        assert await limiter.check("b", 1) is None

    async def test_shared_across_replicas(
        self, client: aioredis.Redis, other_client: aioredis.Redis, redis_prefix: str
    ) -> None:
        """Two replicas draw from one bucket."""
        one = RedisRateLimiter(client, prefix=redis_prefix)
        two = RedisRateLimiter(other_client, prefix=redis_prefix)
        assert [await one.check("k", 3), await two.check("k", 3), await one.check("k", 3)] == [None] * 3
        assert await two.check("k", 3) is not None

    async def test_atomic_under_concurrency(
        self, client: aioredis.Redis, other_client: aioredis.Redis, redis_prefix: str
    ) -> None:
        """50 concurrent checks on two replicas allow exactly rpm."""
        limiters = [RedisRateLimiter(c, prefix=redis_prefix) for c in (client, other_client)]
        results = await asyncio.gather(*(limiters[i % 2].check("k", 10) for i in range(50)))
        assert sum(result is None for result in results) == 10

    async def test_bucket_expires_once_full_again(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """A bucket key lives until its bucket would be full again, plus a margin: memory stays bounded."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix)
        await limiter.check("k", 60)  # one token short: full again in 1 s
        assert 1500 < await client.pttl(limiter.key("k")) <= 2000
        for _ in range(10):
            await limiter.check("slow", 1)
        assert 60_000 < await client.pttl(limiter.key("slow")) <= 61_000

    async def test_script_reloaded_after_flush(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """After SCRIPT FLUSH (restart, failover) EVALSHA's NOSCRIPT falls back to loading the script."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix)
        assert await limiter.check("k", 2) is None
        await client.script_flush()
        assert await limiter.check("k", 2) is None
        assert await limiter.check("k", 2) is not None

    async def test_take_takes_what_the_bucket_holds_up_to_most(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """take grants between one and ``most`` tokens, never more than the bucket holds, then waits as check."""
        now = [1000.0]
        limiter = RedisRateLimiter(client, prefix=redis_prefix, clock=lambda: now[0])
        assert await limiter.take("k", 60, 25) == (25, None, 35)
        assert await limiter.take("k", 60, 50) == (35, None, 0)  # only 35 of the 60 were left
        taken, wait, left = await limiter.take("k", 60, 10)
        assert taken == 0 and wait == pytest.approx(1.0) and left == 0
        now[0] += 2.5  # 2.5 tokens refilled: whole ones only
        assert await limiter.take("k", 60, 10) == (2, None, 0)
        assert await limiter.check("k", 60) is not None  # the half token left is not one
        with pytest.raises(ValueError, match="most"):
            await limiter.take("k", 60, 0)

    async def test_forget(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """forget drops a key's bucket."""
        limiter = RedisRateLimiter(client, prefix=redis_prefix)
        await limiter.check("k", 1)
        await limiter.forget("k")
        assert await limiter.check("k", 1) is None


class Upstream:
    """A factory that counts its calls and writes its answer to the shared cache before returning."""

    def __init__(self, cache: RedisStatusCache, delay_s: float = 0.1, fail: bool = False) -> None:
        self.cache = cache
        self.delay_s = delay_s
        self.fail = fail
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("upstream failed")
        await self.cache.put("task", b'{"status": "processing"}', JSON, "processing", False)
        return "answer"

    async def ready(self) -> bool:
        return (await self.cache.get("task"))[1]


class TestSingleFlight:
    async def test_one_call_for_twenty_across_replicas(
        self, client: aioredis.Redis, other_client: aioredis.Redis, redis_prefix: str
    ) -> None:
        """20 concurrent runs on two replicas call the factory once; the other 19 find the result ready."""
        upstream = Upstream(make_cache(client, redis_prefix))
        flights = [RedisSingleFlight(c, prefix=redis_prefix) for c in (client, other_client)]
        results = await asyncio.gather(
            *(flights[i % 2].run("task", upstream, ready=upstream.ready, lock_ttl_s=5, wait_s=2) for i in range(20))
        )
        assert upstream.calls == 1
        assert sorted(results, key=str) == sorted([("answer", False)] + [(None, True)] * 19, key=str)
        assert await upstream.ready()
        assert await client.exists(flights[0].key("task")) == 0

    async def test_dead_holder_falls_back_after_wait_s(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """A lock whose holder never releases delays a run by wait_s at most; then it calls the factory itself."""
        flight = RedisSingleFlight(client, prefix=redis_prefix)
        await client.set(flight.key("task"), "dead-holder", px=10_000)
        upstream = Upstream(make_cache(client, redis_prefix), delay_s=0)
        started = time.monotonic()
        result = await flight.run("task", upstream, ready=upstream.ready, lock_ttl_s=5, wait_s=0.2)
        assert result == ("answer", False)
        assert 0.2 <= time.monotonic() - started < 0.5
        assert await client.get(flight.key("task")) == b"dead-holder"

    async def test_dead_holder_whose_result_arrived(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """At the deadline a result that is ready is read from the cache instead of calling the factory."""
        flight = RedisSingleFlight(client, prefix=redis_prefix)
        await client.set(flight.key("task"), "dead-holder", px=10_000)
        upstream = Upstream(make_cache(client, redis_prefix))
        await upstream.cache.put("task", b"{}", JSON, "processing", False)
        assert await flight.run("task", upstream, ready=upstream.ready, lock_ttl_s=5, wait_s=0.1) == (None, True)
        assert upstream.calls == 0

    async def test_expired_lock_is_taken_over(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """When a dead holder's lock expires before wait_s, the waiter leads at once."""
        flight = RedisSingleFlight(client, prefix=redis_prefix)
        await client.set(flight.key("task"), "dead-holder", px=100)
        upstream = Upstream(make_cache(client, redis_prefix), delay_s=0)
        started = time.monotonic()
        assert await flight.run("task", upstream, ready=upstream.ready, lock_ttl_s=5, wait_s=5) == ("answer", False)
        assert time.monotonic() - started < 0.5
        assert await client.exists(flight.key("task")) == 0

    async def test_lock_released_only_by_owner(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """A holder whose lock expired and was taken by another replica does not delete that replica's lock."""
        flight = RedisSingleFlight(client, prefix=redis_prefix)

        async def outlives_its_lock() -> str:
            await client.set(flight.key("task"), "next-holder", px=10_000)  # expired, then taken elsewhere
            return "answer"

        assert await flight.run("task", outlives_its_lock, ready=never, lock_ttl_s=5, wait_s=1) == ("answer", False)
        assert await client.get(flight.key("task")) == b"next-holder"

    async def test_failure_releases_and_a_follower_retries(
        self, client: aioredis.Redis, other_client: aioredis.Redis, redis_prefix: str
    ) -> None:
        """A leader's exception is its own; the lock is freed and a waiting replica then calls the factory."""
        cache = make_cache(client, redis_prefix)
        failing, working = Upstream(cache, fail=True), Upstream(cache, delay_s=0)
        one, two = RedisSingleFlight(client, prefix=redis_prefix), RedisSingleFlight(other_client, prefix=redis_prefix)
        leader = asyncio.create_task(one.run("task", failing, ready=failing.ready, lock_ttl_s=5, wait_s=2))
        await asyncio.sleep(0.02)
        follower = await two.run("task", working, ready=working.ready, lock_ttl_s=5, wait_s=2)
        with pytest.raises(RuntimeError, match="upstream failed"):
            await leader
        assert follower == ("answer", False)
        assert (failing.calls, working.calls) == (1, 1)
        assert await client.exists(one.key("task")) == 0

    async def test_wait_zero_never_waits(self, client: aioredis.Redis, redis_prefix: str) -> None:
        """wait_s=0 with the lock taken calls the factory at once."""
        flight = RedisSingleFlight(client, prefix=redis_prefix)
        await client.set(flight.key("task"), "holder", px=10_000)
        upstream = Upstream(make_cache(client, redis_prefix), delay_s=0)
        assert await flight.run("task", upstream, ready=upstream.ready, lock_ttl_s=5, wait_s=0) == ("answer", False)

    @pytest.mark.parametrize(("lock_ttl_s", "wait_s"), [(0, 1), (1, -1)])
    async def test_bad_arguments(self, client: aioredis.Redis, lock_ttl_s: float, wait_s: float) -> None:
        """A non-positive lock TTL or a negative wait is refused."""
        with pytest.raises(ValueError, match="lock_ttl_s"):
            await RedisSingleFlight(client).run("k", answer, ready=never, lock_ttl_s=lock_ttl_s, wait_s=wait_s)


async def never() -> bool:
    return False


async def answer() -> str:
    return "answer"


class TestConnect:
    async def test_connects(self, redis_url: str) -> None:
        """A reachable URL gives a client that answers PING."""
        connection = await connect(redis_url)
        try:
            assert await ping(connection) is True
        finally:
            await connection.aclose()

    async def test_unreachable(self) -> None:
        """An unreachable server is CacheUnavailable naming the address, never the password."""
        with pytest.raises(CacheUnavailable) as caught:
            await connect(UNREACHABLE_URL, socket_connect_timeout=0.5)
        assert "127.0.0.1:1" in str(caught.value)
        assert "hunter2-canary" not in str(caught.value)

    @pytest.mark.parametrize(
        "url", ["memory://", "http://:hunter2-canary@host/", "postgresql://u:hunter2-canary@db/x", "hunter2-canary"]
    )
    async def test_not_a_redis_url(self, url: str) -> None:
        """Only redis:// and rediss:// URLs are accepted; the message hides the password."""
        with pytest.raises(ValueError, match="redis://") as caught:
            await connect(url)
        assert "hunter2-canary" not in str(caught.value) or url == "hunter2-canary"

    async def test_bad_port(self) -> None:
        """A malformed Redis URL is a ValueError without the password."""
        with pytest.raises(ValueError) as caught:
            await connect("redis://:hunter2-canary@host:notaport/0")
        assert "hunter2-canary" not in str(caught.value)

    async def test_decode_responses_refused(self, redis_url: str) -> None:
        """decode_responses would corrupt binary entries, so it is refused."""
        with pytest.raises(ValueError, match="decode_responses"):
            await connect(redis_url, decode_responses=True)

    @pytest.mark.parametrize(
        ("url", "safe"),
        [
            ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
            ("rediss://user:pw@cache:6380", "rediss://user:***@cache:6380"),
            ("redis://cache:6379/0", "redis://cache:6379/0"),
            ("redis://user@cache", "redis://user@cache"),
            ("redis://u:p%40ss@cache", "redis://u:***@cache"),
        ],
    )
    def test_redact_url(self, url: str, safe: str) -> None:
        """The password, and only the password, is masked."""
        assert redact_url(url) == safe


class TestUnavailable:
    @pytest.fixture
    async def down(self) -> AsyncIterator[aioredis.Redis]:
        """A client of a Redis that is not there (port 1)."""
        connection = aioredis.Redis.from_url(UNREACHABLE_URL, socket_connect_timeout=0.5)
        yield connection
        await connection.aclose()

    async def test_every_operation(self, down: aioredis.Redis) -> None:
        """get, put, check, forget and run all raise CacheUnavailable, without the password, never redis errors."""
        cache = make_cache(down, "p:")
        upstream = Upstream(cache)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: cache.get("t"),
            lambda: cache.put("t", b"{}", JSON, "queued", False),
            lambda: RedisRateLimiter(down).check("k", 5),
            lambda: RedisRateLimiter(down).forget("k"),
            lambda: RedisSingleFlight(down).run("t", upstream, ready=never, lock_ttl_s=1, wait_s=1),
        ]
        for call in calls:
            with pytest.raises(CacheUnavailable) as caught:
                await call()
            assert "hunter2-canary" not in str(caught.value)
            assert isinstance(caught.value.__cause__, RedisConnectionError)
        assert upstream.calls == 0

    async def test_ping_never_raises(self, down: aioredis.Redis) -> None:
        """ping is False for an unreachable server."""
        assert await ping(down) is False


class FailingRedis:
    """A stand-in for a connected client whose server answers every command with an error (e.g. OOM)."""

    def __init__(self, fail_sets: bool = True) -> None:
        self.fail_sets = fail_sets

    async def _error(self, *args: object, **kwargs: object) -> Any:
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    async def set(self, *args: object, **kwargs: object) -> bool:
        if self.fail_sets:
            await self._error()
        return True

    delete = _error
    exists = _error

    def register_script(self, script: str) -> Callable[..., Awaitable[Any]]:
        return self._error


class HangingRedis:
    """A stand-in whose PING never answers."""

    async def ping(self) -> bool:
        await asyncio.sleep(10)
        return True


class TestFakes:
    async def test_server_errors_are_cache_unavailable(self) -> None:
        """A server error reply (not only a lost connection) surfaces as CacheUnavailable too."""
        fake = cast(aioredis.Redis, FailingRedis())
        cache = make_cache(fake, "p:")
        with pytest.raises(CacheUnavailable, match="OOM"):
            await cache.put("t", b"{}", JSON, "queued", False)
        with pytest.raises(CacheUnavailable, match="OOM"):
            await RedisRateLimiter(fake).check("k", 5)

    async def test_failed_release_keeps_the_result(self) -> None:
        """The leader's result is returned even if releasing the lock fails (the lock expires by itself)."""
        flight = RedisSingleFlight(cast(aioredis.Redis, FailingRedis(fail_sets=False)))
        assert await flight.run("t", answer, ready=never, lock_ttl_s=1, wait_s=1) == ("answer", False)

    async def test_ping_times_out(self) -> None:
        """A server that never answers PING is reported down after timeout_s, not hung on."""
        started = time.monotonic()
        assert await ping(cast(aioredis.Redis, HangingRedis()), timeout_s=0.05) is False
        assert time.monotonic() - started < 1


class TestAccountMarks:
    async def test_marks_are_shared_and_a_newer_set_aside_survives_an_older_end(
        self, client: aioredis.Redis, other_client: aioredis.Redis, redis_prefix: str
    ) -> None:
        """One replica's marks are read by another; ending a set-aside leaves a later one alone."""
        one = RedisAccountMarks(client, prefix=redis_prefix)
        two = RedisAccountMarks(other_client, prefix=redis_prefix)
        assert await two.read() == {}
        await one.set_aside("a", 1030.5)
        await one.unauthorized("b", "0123abcd")
        assert await two.read() == {"a": AccountMark("a", 1030.5), "b": AccountMark("b", 0.0, "0123abcd")}
        await two.end_aside("a", 1000.0)  # an older set-aside than the one written: kept
        assert (await one.read())["a"].set_aside_until == 1030.5
        await two.end_aside("a", 1030.5)
        assert await one.read() == {"b": AccountMark("b", 0.0, "0123abcd")}

    async def test_unreachable_raises_cache_unavailable(self) -> None:
        """Every operation fails as CacheUnavailable (the fail-open wrapper's signal), without the password."""
        down = aioredis.Redis.from_url(UNREACHABLE_URL, socket_connect_timeout=0.5)
        marks = RedisAccountMarks(down)
        try:
            for call in (marks.read, lambda: marks.set_aside("a", 1.0), lambda: marks.end_aside("a", 1.0)):
                with pytest.raises(CacheUnavailable) as caught:
                    await call()
                assert "hunter2-canary" not in str(caught.value)
        finally:
            await down.aclose()
