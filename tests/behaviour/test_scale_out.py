"""Several replicas sharing Redis (status cache, rate limits, one upstream call per task) and a store.

Each replica is a whole gateway (``make_gateway``: its own app, event loop, metrics and logs) against one real
loopback upstream whose calls are counted where they arrive. They share the Redis on this machine (a fresh key
prefix per test) and a store: the same SQLite file, as ``--workers N`` does, or PostgreSQL (``postgres_url``
fixtures), as separate machines would. Redis failing at run time is provoked with a redis-server of the test's own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.processes import free_port
from support.upstream_fake import FakeUpstream, dynamic, json, slow
from test_polling import KEYS_MODE, REQUEST, STATUS_PREFIX, SUBMIT, World

CACHE_METRIC = "kling_gateway_status_cache_total"

Replicas = Callable[..., tuple[GatewayHarness, GatewayHarness]]


def _wait_for(check: Callable[[], bool], within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def replicas(make_gateway: GatewayFactory, fake_upstream: FakeUpstream, redis_url: str, redis_prefix: str) -> Replicas:
    """Two gateways on one upstream, one Redis prefix and one store (the SQLite file unless ``store_url``)."""

    def make(*, store_url: str | None = None, cache_url: str = redis_url) -> tuple[GatewayHarness, GatewayHarness]:
        env = {
            **KEYS_MODE,
            "KLING_GATEWAY_CACHE_URL": cache_url,
            "KLING_GATEWAY_CACHE_KEY_PREFIX": redis_prefix,
            "KLING_GATEWAY_AUTH_REFRESH_INTERVAL_S": "0.05",
        }
        if store_url is not None:
            env["KLING_GATEWAY_STORE_URL"] = store_url
        return make_gateway(fake_upstream.url, env=env), make_gateway(fake_upstream.url, env=env)

    return make


def _shared_key(a: GatewayHarness, b: GatewayHarness, **options: object) -> dict[str, str]:
    """A key issued on ``a``, once ``b`` has picked it up from the store."""
    headers = a.as_key(a.create_key("team", **options))
    _wait_for(lambda: b.client.get("/gateway/tasks", headers=headers).status_code == 200)
    return headers


def _submit(gateway: GatewayHarness, headers: dict[str, str], **extra: str) -> str:
    response = gateway.client.post(SUBMIT, json=REQUEST, headers={**headers, **extra})
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


class TestSharedStatusCache:
    def test_a_status_fetched_by_one_replica_is_a_hit_on_the_other(
        self, replicas: Replicas, fake_upstream: FakeUpstream
    ) -> None:
        world = World(fake_upstream)
        a, b = replicas()
        headers = _shared_key(a, b)
        task_id = _submit(a, headers)

        first = b.client.get(STATUS_PREFIX + task_id, headers=headers)
        second = a.client.get(STATUS_PREFIX + task_id, headers=headers)

        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
        assert second.content == first.content
        assert world.calls(task_id) == 1
        assert a.metric(CACHE_METRIC, {"result": "hit"}) == 1

    def test_concurrent_polls_on_two_replicas_make_one_upstream_call(
        self, replicas: Replicas, fake_upstream: FakeUpstream
    ) -> None:
        world = World(fake_upstream)
        a, b = replicas()
        headers = _shared_key(a, b)
        task_id = _submit(a, headers)
        fake_upstream.always("GET", STATUS_PREFIX, dynamic(lambda r: slow(0.4, world.answer(task_id))))

        def poll(gateway: GatewayHarness) -> tuple[int, str]:
            response = gateway.client.get(STATUS_PREFIX + task_id, headers=headers)
            return response.status_code, response.headers["x-cache"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(poll, [a, b] * 4))

        assert all(status == 200 for status, _ in answers)
        assert world.calls(task_id) == 1
        counted = {
            result: a.metric(CACHE_METRIC, {"result": result}) + b.metric(CACHE_METRIC, {"result": result})
            for result in ("miss", "coalesced", "hit")
        }
        assert counted["miss"] == 1
        assert counted["miss"] + counted["coalesced"] + counted["hit"] == 8

    def test_stale_from_the_shared_cache_when_the_upstream_fails(
        self, replicas: Replicas, fake_upstream: FakeUpstream
    ) -> None:
        world = World(fake_upstream)
        a, b = replicas()
        headers = _shared_key(a, b)
        task_id = _submit(a, headers)
        assert a.client.get(STATUS_PREFIX + task_id, headers=headers).headers["x-cache"] == "MISS"
        time.sleep(a.settings.cache.pending_ttl_s + 0.1)  # the shared entry is no longer fresh
        fake_upstream.always("GET", STATUS_PREFIX, json(503, {"error": {"message": "down"}}))

        answer = b.client.get(STATUS_PREFIX + task_id, headers=headers)

        assert (answer.status_code, answer.headers["x-cache"]) == (200, "STALE")
        assert answer.json()["status"] == "queued"
        assert world.calls(task_id) >= 2


class TestSharedRateLimit:
    def test_one_limit_counted_across_replicas(self, replicas: Replicas, fake_upstream: FakeUpstream) -> None:
        World(fake_upstream)
        a, b = replicas()
        headers = _shared_key(a, b, rpm=3)  # the key pick-up poll on b took one token

        assert a.client.get("/gateway/tasks", headers=headers).status_code == 200
        assert b.client.get("/gateway/tasks", headers=headers).status_code == 200
        refused = a.client.get("/gateway/tasks", headers=headers)

        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1

    def test_responses_carry_the_allowance_headers(self, replicas: Replicas, fake_upstream: FakeUpstream) -> None:
        """As with the in-process limiter, also on a 404 and the 429; the figure is what Redis reported left."""
        World(fake_upstream)
        a, b = replicas()
        headers = _shared_key(a, b, rpm=4)  # the key pick-up poll on b took one token

        seen = []
        for gateway, path in ((a, "/gateway/tasks"), (b, "/v1/videos/task_0123456789"), (a, "/gateway/tasks")):
            response = gateway.client.get(path, headers=headers)
            seen.append(
                (
                    response.status_code,
                    response.headers.get("x-ratelimit-limit-requests"),
                    response.headers.get("x-ratelimit-remaining-requests"),
                )
            )
        refused = b.client.get("/gateway/tasks", headers=headers)

        assert seen == [(200, "4", "2"), (404, "4", "1"), (200, "4", "0")]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert (
            refused.status_code,
            refused.headers.get("x-ratelimit-limit-requests"),
            refused.headers.get("x-ratelimit-remaining-requests"),
        ) == (429, "4", "0")


class TestIdempotencyAcrossReplicas:
    def test_a_repeat_on_the_other_replica_replays_without_a_second_submission(
        self, replicas: Replicas, fake_upstream: FakeUpstream
    ) -> None:
        World(fake_upstream)
        a, b = replicas()
        headers = _shared_key(a, b)

        first = a.client.post(SUBMIT, json=REQUEST, headers={**headers, "Idempotency-Key": "order-7"})
        again = b.client.post(SUBMIT, json=REQUEST, headers={**headers, "Idempotency-Key": "order-7"})

        assert first.status_code == again.status_code == 200
        assert again.json() == first.json()
        assert fake_upstream.calls("POST", SUBMIT) == 1


# -- Redis failing: every request is still answered --------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own (so the test can stop it), on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: cannot stop a Redis of the test's own")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*argv, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _accepts(port), within_s=5.0)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()
        proc.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


class TestRedisDown:
    def test_polls_submissions_and_limits_fail_open_and_say_so_once(
        self, replicas: Replicas, fake_upstream: FakeUpstream, own_redis: tuple[str, subprocess.Popen[bytes]]
    ) -> None:
        url, server = own_redis
        world = World(fake_upstream)
        a, b = replicas(cache_url=url)
        headers = _shared_key(a, b, rpm=1000)
        task_id = _submit(a, headers)
        server.kill()
        server.wait()

        polls = [b.client.get(STATUS_PREFIX + task_id, headers=headers) for _ in range(3)]
        submitted = b.client.post(SUBMIT, json=REQUEST, headers=headers)

        assert [p.status_code for p in polls] == [200, 200, 200]
        assert [p.headers["x-cache"] for p in polls] == ["MISS", "HIT", "HIT"]  # b's own cache still works
        assert submitted.status_code == 200
        assert world.calls(task_id) == 1
        assert b.client.get("/readyz").status_code == 200  # the store is fine: still ready
        warnings = [line for line in b.log_lines() if line.get("event") == "shared_state_unavailable"]
        # The first failure puts Redis to rest for a second: the other calls take their fallback unasked.
        assert [line["operation"] for line in warnings] == ["rate_limit"]
        assert b.metric("kling_gateway_shared_state_failures_total", {"operation": "rate_limit"}) == 1
        assert warnings[0]["error"].startswith("Redis ")

    def test_unreachable_redis_at_start_up_is_a_clear_error(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
        with pytest.raises(Exception, match="cannot reach Redis") as failure:
            make_gateway(fake_upstream.url, env={"KLING_GATEWAY_CACHE_URL": url})
        assert "s3cret-pw" not in str(failure.value)


class TestOnPostgres:
    """The same replicas on PostgreSQL instead of a shared SQLite file: separate machines, in effect."""

    def test_keys_ledger_idempotency_and_cache_are_shared(
        self, replicas: Replicas, fake_upstream: FakeUpstream, postgres_schema_url: str
    ) -> None:
        world = World(fake_upstream)
        a, b = replicas(store_url=postgres_schema_url)
        headers = _shared_key(a, b)

        first = a.client.post(SUBMIT, json=REQUEST, headers={**headers, "Idempotency-Key": "order-9"})
        again = b.client.post(SUBMIT, json=REQUEST, headers={**headers, "Idempotency-Key": "order-9"})
        task_id = first.json()["id"]
        polled_on_b = b.client.get(STATUS_PREFIX + task_id, headers=headers)
        polled_on_a = a.client.get(STATUS_PREFIX + task_id, headers=headers)
        listed_on_b = b.client.get("/gateway/tasks", headers=headers).json()["data"]

        assert (first.status_code, again.status_code) == (200, 200)
        assert again.json() == first.json()
        assert fake_upstream.calls("POST", SUBMIT) == 1
        assert (polled_on_b.headers["x-cache"], polled_on_a.headers["x-cache"]) == ("MISS", "HIT")
        assert world.calls(task_id) == 1
        assert [task["task_id"] for task in listed_on_b] == [task_id]

    def test_a_revoked_key_stops_working_on_the_other_replica_within_a_second(
        self, replicas: Replicas, fake_upstream: FakeUpstream, postgres_schema_url: str
    ) -> None:
        World(fake_upstream)
        a, b = replicas(store_url=postgres_schema_url)
        headers = _shared_key(a, b)

        assert a.client.delete("/gateway/keys/team", headers=ADMIN).status_code == 200
        revoked_at = time.monotonic()
        _wait_for(lambda: b.client.get("/gateway/tasks", headers=headers).status_code == 401, within_s=1.0)

        assert time.monotonic() - revoked_at < 1.0
