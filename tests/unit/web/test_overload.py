"""Overload: bounded in-flight and queued requests, a fast 503 overloaded beyond them, and recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from support.harness import SANDBOX_API_KEY
from support.upstream_fake import FakeUpstream, ServerThread, fresh_task, slow

from gateway.app import create_app
from gateway.config import load_settings
from gateway.web.overload import ConcurrencyLimiter

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a paper boat in a gutter", "duration": 5}
ACCEPTED = {"id": "task_1", "task_id": "task_1", "status": "queued", "progress": 0}


class TestLimiter:
    """``ConcurrencyLimiter`` on its own: slots, a FIFO queue with a timeout, hand-over and cancellation."""

    async def test_slots_then_queue_then_refusal(self) -> None:
        """Two holders, one waiter, the next is refused at once; a release hands the slot to the waiter."""
        limiter = ConcurrencyLimiter(2, 1, 5.0)
        assert await limiter.acquire() and await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        assert limiter.waiting == 1
        started = time.perf_counter()
        assert await limiter.acquire() is False
        assert time.perf_counter() - started < 0.01
        limiter.release()
        assert await waiter is True
        assert (limiter.in_flight, limiter.waiting) == (2, 0)
        limiter.release()
        limiter.release()
        assert limiter.in_flight == 0

    async def test_waiters_served_in_order(self) -> None:
        """Released slots go to the longest waiter first, never to a newcomer."""
        limiter = ConcurrencyLimiter(1, 3, 5.0)
        assert await limiter.acquire()
        order: list[int] = []

        async def wait(n: int) -> None:
            """Take a slot, then note the turn."""
            assert await limiter.acquire()
            order.append(n)

        waiters = [asyncio.create_task(wait(n)) for n in range(3)]
        await asyncio.sleep(0)
        for _ in range(3):
            limiter.release()
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)
        assert order == [0, 1, 2]
        assert limiter.in_flight == 1

    async def test_wait_times_out(self) -> None:
        """A waiter gives up after timeout_s and leaves the queue."""
        limiter = ConcurrencyLimiter(1, 1, 0.05)
        assert await limiter.acquire()
        started = time.perf_counter()
        assert await limiter.acquire() is False
        assert 0.04 < time.perf_counter() - started < 0.5
        assert limiter.waiting == 0
        limiter.release()
        assert limiter.in_flight == 0

    async def test_no_queue_when_timeout_is_zero(self) -> None:
        """queue_timeout_s 0 means no waiting at all."""
        limiter = ConcurrencyLimiter(1, 5, 0.0)
        assert await limiter.acquire()
        assert await limiter.acquire() is False

    async def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """A waiter cancelled while queued takes no slot; a waiter cancelled right after the hand-over passes it on."""
        limiter = ConcurrencyLimiter(1, 2, 5.0)
        assert await limiter.acquire()
        first = asyncio.create_task(limiter.acquire())
        second = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert limiter.waiting == 1
        limiter.release()  # handed to ``second``...
        second.cancel()  # ...which is cancelled before it runs: the slot must come back
        with pytest.raises(asyncio.CancelledError):
            await second
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    @pytest.mark.parametrize(("limit", "waiting", "timeout"), [(0, 1, 1.0), (1, -1, 1.0), (1, 1, -1.0)])
    def test_bad_bounds_refused(self, limit: int, waiting: int, timeout: float) -> None:
        """A zero limit or a negative queue or timeout is a programming error."""
        with pytest.raises(ValueError):
            ConcurrencyLimiter(limit, waiting, timeout)


@pytest.fixture
def slow_gateway(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[str, CollectorRegistry]]:
    """The gateway under uvicorn (real concurrency) with 2 slots and a queue of 1, before a 0.5 s upstream."""
    fake_upstream.always("POST", SUBMIT, slow(0.5, fresh_task()))
    settings = load_settings(
        env={
            "UNIALL_BASE_URL": fake_upstream.url,
            "UNIALL_API_KEY": SANDBOX_API_KEY,
            "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp_path / "data"),
            "KLING_GATEWAY_AUTH_MODE": "open",
            "KLING_GATEWAY_SETTLER_ENABLED": "false",
            "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
            "KLING_GATEWAY_SERVER_MAX_IN_FLIGHT": "2",
            "KLING_GATEWAY_SERVER_MAX_QUEUED": "1",
            "KLING_GATEWAY_SERVER_QUEUE_TIMEOUT_S": "5",
        }
    )
    registry = CollectorRegistry()
    with ServerThread(create_app(settings, registry=registry), lifespan="on") as server:
        yield server.url, registry


class TestOverloadEndToEnd:
    """Through uvicorn, with a slow upstream holding every slot."""

    async def test_fourth_request_refused_fast_then_recovery(
        self, slow_gateway: tuple[str, CollectorRegistry], fake_upstream: FakeUpstream
    ) -> None:
        """2 in flight + 1 queued: the 4th gets 503 overloaded in < 50 ms; all three others succeed; then 200 again."""
        url, registry = slow_gateway
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            held = [asyncio.create_task(client.post(SUBMIT, json=BODY)) for _ in range(2)]
            await fake_upstream.wait_for_calls_async("POST", SUBMIT, 2)
            queued = asyncio.create_task(client.post(SUBMIT, json=BODY))
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            refused = await client.post(SUBMIT, json=BODY, headers={"X-Request-ID": "rid-over"})
            elapsed = time.perf_counter() - started
            assert elapsed < 0.05, f"refusal took {elapsed * 1000:.1f} ms"
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["x-request-id"] == "rid-over"
            error = refused.json()["error"]
            assert (error["code"], error["type"], error["request_id"]) == ("overloaded", "server_error", "rid-over")
            # Probes and scrapes are never held back.
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            scrape = await client.get("/metrics")
            assert 'kling_gateway_rejections_total{code="overloaded"} 1.0' in scrape.text
            answers = await asyncio.gather(*held, queued)
            assert [a.status_code for a in answers] == [200, 200, 200]
            assert fake_upstream.calls("POST", SUBMIT) == 3
            recovered = await asyncio.gather(*(client.post(SUBMIT, json=BODY) for _ in range(2)))
            assert [r.status_code for r in recovered] == [200, 200]
        assert registry.get_sample_value("kling_gateway_rejections_total", {"code": "overloaded"}) == 1
        # The hot routes are known before the in-flight bound is checked: the refusal counts under its route.
        assert registry.get_sample_value(
            "kling_gateway_requests_total", {"route": SUBMIT, "method": "POST", "status": "503"}
        )

    async def test_burst_is_bounded(
        self, slow_gateway: tuple[str, CollectorRegistry], fake_upstream: FakeUpstream
    ) -> None:
        """20 at once: 3 are served (2 + 1 queued), 17 are refused quickly; the upstream never sees more than 3."""
        url, _ = slow_gateway
        limits = httpx.Limits(max_connections=30)
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:

            async def timed_post() -> tuple[int, float]:
                """One submission: its status and how long it took."""
                started = time.perf_counter()
                response = await client.post(SUBMIT, json=BODY)
                return response.status_code, time.perf_counter() - started

            results = await asyncio.gather(*(timed_post() for _ in range(20)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * 3 + [503] * 17
        assert max(elapsed for status, elapsed in results if status == 503) < 0.5
        assert fake_upstream.calls("POST", SUBMIT) == 3
