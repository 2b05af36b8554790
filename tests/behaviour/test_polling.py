"""Status polling end to end: coalescing, X-Cache and its metric, ownership before the cache, and the settler.

Everything goes through a real gateway (``make_gateway``, keys mode) against a real loopback upstream, and upstream
calls are counted where they arrive: at ``FakeUpstream`` or the sandbox. The 1,000 concurrent polls run inside the
gateway's own event loop (the TestClient's portal, where the lifespan ran) through ``httpx.ASGITransport``, so all
of them are in flight at once without 1,000 sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from support.harness import GatewayFactory, GatewayHarness
from support.upstream_fake import (
    Behaviour,
    FakeUpstream,
    RecordedRequest,
    SandboxServer,
    dynamic,
    hang,
    json,
)

from gateway.status.poller import PollOutcome

SUBMIT = "/v1/video/generations"
STATUS_PREFIX = "/v1/videos/"
KEYS_MODE = {"KLING_GATEWAY_AUTH_MODE": "keys"}
MODEL = "kling-v3-std-silent"
REQUEST = {"model": MODEL, "prompt": "a red fox in the snow", "duration": 5}
CACHE_METRIC = "kling_gateway_status_cache_total"
SETTLED_METRIC = "kling_gateway_tasks_settled_total"


class World:
    """A scripted upstream that accepts every submission and answers each task's status as the test sets it."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.statuses: dict[str, dict[str, Any]] = {}
        counter = itertools.count(1)

        def accept(request: RecordedRequest) -> Behaviour:
            task_id = f"task_{next(counter)}"
            self.statuses[task_id] = {"status": "queued", "progress": 0}
            return json(200, {"id": task_id, "task_id": task_id, "status": "queued", "progress": 0})

        fake.always("POST", SUBMIT, dynamic(accept))
        fake.always("GET", STATUS_PREFIX, dynamic(lambda request: self.answer(request.path.rsplit("/", 1)[-1])))

    def answer(self, task_id: str) -> Behaviour:
        """The task's current status body."""
        return json(200, {"id": task_id, "task_id": task_id, **self.statuses[task_id]})

    def calls(self, task_id: str) -> int:
        """Upstream status calls for ``task_id`` so far."""
        return self.fake.calls("GET", STATUS_PREFIX + task_id)

    def status_calls(self) -> int:
        """Upstream status calls for any task so far."""
        return sum(1 for r in self.fake.requests if r.method == "GET" and r.path.startswith(STATUS_PREFIX))


@dataclass(frozen=True)
class Gated(Behaviour):
    """Hold the answer until ``opened`` is set (at most ``within_s``), then behave as ``then``."""

    opened: threading.Event
    then: Behaviour
    within_s: float = 15.0

    async def run(self, conn: Any, request: RecordedRequest) -> bool:
        await asyncio.to_thread(self.opened.wait, self.within_s)
        return await self.then.run(conn, request)


def submit(gw: GatewayHarness, secret: str) -> str:
    """Submit the standard request with ``secret``; the new task id."""
    response = gw.client.post(SUBMIT, json=REQUEST, headers=gw.as_key(secret))
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def cache_counts(gw: GatewayHarness) -> dict[str, float]:
    """``kling_gateway_status_cache_total`` by result."""
    return {result: gw.metric(CACHE_METRIC, {"result": result}) for result in ("hit", "miss", "coalesced", "stale")}


def settled_total(gw: GatewayHarness) -> float:
    """``kling_gateway_tasks_settled_total`` summed over every label set."""
    total = 0.0
    for family in gw.registry.collect():
        for sample in family.samples:
            if sample.name == SETTLED_METRIC:
                total += sample.value
    return total


def ledger_rows(gw: GatewayHarness, secret: str) -> dict[str, dict[str, Any]]:
    """The key's ledger rows from ``GET /gateway/tasks``, by task id."""
    response = gw.client.get("/gateway/tasks?limit=1000", headers=gw.as_key(secret))
    assert response.status_code == 200, response.text
    return {row["task_id"]: row for row in response.json()["data"]}


def wait_until(check: Callable[[], bool], what: str, within_s: float) -> None:
    """Poll ``check`` every 50 ms; AssertionError naming ``what`` after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        time.sleep(0.05)


def problems_logged(gw: GatewayHarness) -> list[dict[str, Any]]:
    """Log lines at warning level or above."""
    return [line for line in gw.log_lines() if line.get("level") in ("warning", "error", "critical")]


class TestCoalescing:
    """Concurrent polls of one task share one upstream call."""

    def test_thousand_concurrent_polls_cost_one_upstream_call(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """1,000 polls in flight at once on one pending task: one upstream status call, every poll answered."""
        polls = 1000
        world = World(fake_upstream)
        # All 1,000 must be admitted at once, whatever the default overload bound is.
        gw = make_gateway(fake_upstream.url, env={**KEYS_MODE, "KLING_GATEWAY_SERVER_MAX_IN_FLIGHT": "2000"})
        secret = gw.create_key("team-a")
        task_id = submit(gw, secret)

        # The upstream holds its answer until every poll has reached the status poller, so all 1,000 are in
        # flight together (a fixed delay would make that a matter of machine speed).
        opened = threading.Event()
        fake_upstream.script("GET", STATUS_PREFIX + task_id, Gated(opened, world.answer(task_id)))
        app = gw.client.app
        assert isinstance(app, Starlette)
        poller = app.state.services.status
        real_poll = poller.poll
        entered = 0

        async def counting_poll(polled_id: str, **kwargs: Any) -> PollOutcome:
            nonlocal entered
            entered += 1
            if entered == polls:
                opened.set()
            outcome: PollOutcome = await real_poll(polled_id, **kwargs)
            return outcome

        monkeypatch.setattr(poller, "poll", counting_poll)

        async def hammer() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
                return await asyncio.gather(
                    *(client.get(STATUS_PREFIX + task_id, headers=gw.as_key(secret)) for _ in range(polls))
                )

        assert gw.client.portal is not None
        responses = gw.client.portal.call(hammer)

        assert opened.is_set() and entered == polls
        assert [r.status_code for r in responses] == [200] * polls
        assert {r.json()["status"] for r in responses} == {"queued"}
        assert {r.headers["x-cache"] for r in responses} == {"MISS"}
        assert world.calls(task_id) == 1
        assert cache_counts(gw) == {"hit": 0, "miss": 1, "coalesced": polls - 1, "stale": 0}
        # ... and the answer is now cached: the next poll costs nothing.
        again = gw.client.get(STATUS_PREFIX + task_id, headers=gw.as_key(secret))
        assert again.headers["x-cache"] == "HIT" and world.calls(task_id) == 1


class TestXCache:
    """HIT within pending_ttl_s, MISS after it, STALE when the upstream fails; the metric agrees."""

    def test_hit_miss_stale_and_metric(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A pending task's polls go HIT → MISS on expiry → STALE on 503, timeout and refusal → MISS on recovery."""
        ttl = 0.3
        world = World(fake_upstream)
        env = {
            **KEYS_MODE,
            "KLING_GATEWAY_CACHE_PENDING_TTL_S": str(ttl),
            "KLING_GATEWAY_UPSTREAM_READ_TIMEOUT_S": "0.4",
            "KLING_GATEWAY_UPSTREAM_TIMEOUT_S": "0.6",
        }
        gw = make_gateway(fake_upstream.url, env=env)
        secret = gw.create_key("team-a")
        task_id = submit(gw, secret)
        seen: list[str] = []

        def poll() -> httpx.Response:
            response: httpx.Response = gw.client.get(STATUS_PREFIX + task_id, headers=gw.as_key(secret))
            assert response.status_code == 200, response.text
            seen.append(response.headers["x-cache"])
            return response

        assert poll().headers["x-cache"] == "MISS" and world.calls(task_id) == 1
        assert poll().headers["x-cache"] == "HIT" and world.calls(task_id) == 1
        time.sleep(ttl + 0.05)
        world.statuses[task_id] = {"status": "in_progress", "progress": 10}
        fresh = poll()
        assert fresh.headers["x-cache"] == "MISS" and fresh.json()["progress"] == 10
        assert world.calls(task_id) == 2

        # The entry has expired and the upstream fails three ways: the expired answer is served, marked STALE.
        time.sleep(ttl + 0.05)
        world.statuses[task_id] = {"status": "in_progress", "progress": 50}
        fake_upstream.script("GET", STATUS_PREFIX + task_id, json(503, {"error": {"message": "busy"}}), hang())
        for _ in range(2):  # a 503, then no answer within the read timeout (504)
            stale = poll()
            assert stale.headers["x-cache"] == "STALE" and stale.content == fresh.content
        assert world.calls(task_id) == 4
        fake_upstream.stop_listening()  # connection refused (502, after the connect retries)
        try:
            stale = poll()
        finally:
            fake_upstream.start_listening()
        assert stale.headers["x-cache"] == "STALE" and stale.json()["progress"] == 10

        # The upstream is back: a fresh answer (failures were never cached), then a HIT again.
        recovered = poll()
        assert recovered.headers["x-cache"] == "MISS" and recovered.json()["progress"] == 50
        assert poll().headers["x-cache"] == "HIT"
        assert world.calls(task_id) == 5

        assert seen == ["MISS", "HIT", "MISS", "STALE", "STALE", "STALE", "MISS", "HIT"]
        assert cache_counts(gw) == {"hit": 2, "miss": 3, "coalesced": 0, "stale": 3}

    def test_upstream_error_without_cached_answer_is_a_miss_and_not_cached(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """With nothing cached, an upstream 503 passes through as MISS and the next poll asks the upstream again."""
        world = World(fake_upstream)
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        secret = gw.create_key("team-a")
        task_id = submit(gw, secret)
        fake_upstream.script("GET", STATUS_PREFIX + task_id, json(503, {"error": {"message": "busy"}}))
        failed = gw.client.get(STATUS_PREFIX + task_id, headers=gw.as_key(secret))
        assert (failed.status_code, failed.headers["x-cache"]) == (503, "MISS")
        answered = gw.client.get(STATUS_PREFIX + task_id, headers=gw.as_key(secret))
        assert (answered.status_code, answered.headers["x-cache"]) == (200, "MISS")
        assert world.calls(task_id) == 2
        assert cache_counts(gw) == {"hit": 0, "miss": 2, "coalesced": 0, "stale": 0}


class TestOwnership:
    """Ownership is checked before the cache is read."""

    def test_cached_answer_never_answers_another_key(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Key B polling key A's task gets the unknown-task 404 while it is cached pending and after it settles."""
        ttl = 0.2
        world = World(fake_upstream)
        gw = make_gateway(fake_upstream.url, env={**KEYS_MODE, "KLING_GATEWAY_CACHE_PENDING_TTL_S": str(ttl)})
        owner, other = gw.create_key("team-a"), gw.create_key("team-b")
        task_id = submit(gw, owner)
        unknown = gw.client.get(STATUS_PREFIX + "task_nobody_has", headers=gw.as_key(other))
        assert unknown.status_code == 404

        def owner_poll() -> str:
            response = gw.client.get(STATUS_PREFIX + task_id, headers=gw.as_key(owner))
            assert response.status_code == 200, response.text
            x_cache: str = response.headers["x-cache"]
            return x_cache

        def assert_hidden() -> None:
            before, calls = cache_counts(gw), world.calls(task_id)
            denied = gw.client.get(STATUS_PREFIX + task_id, headers=gw.as_key(other))
            assert denied.status_code == 404
            assert denied.json()["error"] | {"request_id": None} == unknown.json()["error"] | {"request_id": None}
            assert task_id not in denied.text and "x-cache" not in denied.headers
            assert cache_counts(gw) == before and world.calls(task_id) == calls

        assert owner_poll() == "MISS"
        assert_hidden()  # cached, pending
        assert owner_poll() == "HIT"

        time.sleep(ttl + 0.05)
        world.statuses[task_id] = {"status": "completed", "progress": 100, "seconds": 5}
        assert owner_poll() == "MISS"  # completed: cached for terminal_ttl_s and settled in the ledger
        assert ledger_rows(gw, owner)[task_id]["outcome"] == "completed"
        assert_hidden()  # cached and settled
        assert owner_poll() == "HIT"
        assert ledger_rows(gw, other) == {}
        assert world.calls(task_id) == 2


class TestSettler:
    """Tasks nobody polls are driven to a terminal state and settled once, at a bounded rate."""

    def test_unpolled_sandbox_tasks_all_settle(
        self, sandbox_server: SandboxServer, make_gateway: GatewayFactory
    ) -> None:
        """N tasks nobody polls complete in the sandbox and each is settled once in the ledger by the settler."""
        n_tasks = 8
        env = {
            **KEYS_MODE,
            "KLING_GATEWAY_SETTLER_ENABLED": "true",
            "KLING_GATEWAY_SETTLER_IDLE_S": "0.2",
            "KLING_GATEWAY_SETTLER_MAX_RPS": "50",
            "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0.5",
        }
        gw = make_gateway(sandbox_server.url, upstream_key=sandbox_server.api_key, env=env)
        secret = gw.create_key("team-a")
        task_ids = {submit(gw, secret) for _ in range(n_tasks)}
        assert set(ledger_rows(gw, secret)) == task_ids

        def all_settled() -> bool:
            return all(row["settled"] is not None for row in ledger_rows(gw, secret).values())

        wait_until(all_settled, f"{n_tasks} sandbox tasks settled", within_s=15)
        rows = ledger_rows(gw, secret)
        assert {row["outcome"] for row in rows.values()} == {"completed"}
        assert {row["status"] for row in rows.values()} == {"completed"}
        assert {row["settled"]["usd"] for row in rows.values()} == {"0.4200"}  # 5 s at $0.084
        time.sleep(0.5)  # a few more settler sweeps: nothing is settled twice
        assert settled_total(gw) == n_tasks
        assert gw.metric(SETTLED_METRIC, {"model": MODEL, "outcome": "completed", "key": "team-a"}) == (n_tasks)
        assert gw.metric("kling_gateway_tasks_in_flight", {"model": MODEL}) == 0
        assert problems_logged(gw) == []

    def test_settler_rate_is_bounded_and_settled_tasks_are_left_alone(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The settler never polls faster than max_rps, settles every task once, then stops polling them."""
        n_tasks, max_rps = 20, 50.0
        world = World(fake_upstream)
        env = {
            **KEYS_MODE,
            "KLING_GATEWAY_SETTLER_ENABLED": "true",
            "KLING_GATEWAY_SETTLER_IDLE_S": "0.2",
            "KLING_GATEWAY_SETTLER_MAX_RPS": str(max_rps),
            "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0",  # every settler poll reaches the upstream
        }
        gw = make_gateway(fake_upstream.url, env=env)
        secret = gw.create_key("team-a")
        task_ids = [submit(gw, secret) for _ in range(n_tasks)]

        wait_until(lambda: world.status_calls() >= 1, "the settler's first poll", within_s=5)
        start, first = time.monotonic(), world.status_calls()
        time.sleep(1.0)
        calls, elapsed = world.status_calls() - first, time.monotonic() - start
        assert n_tasks <= calls <= max_rps * elapsed + 2, (calls, elapsed)

        for task_id in task_ids:
            world.statuses[task_id] = {"status": "completed", "progress": 100, "seconds": 5}
        wait_until(
            lambda: all(row["outcome"] == "completed" for row in ledger_rows(gw, secret).values()),
            f"{n_tasks} tasks settled",
            within_s=10,
        )
        after_settling = world.status_calls()
        time.sleep(0.6)  # three idle periods: settled tasks are never polled again
        assert world.status_calls() == after_settling
        assert settled_total(gw) == n_tasks
        assert all(world.calls(task_id) >= 2 for task_id in task_ids)
        assert problems_logged(gw) == []
