"""The upstream circuit breaker: its state machine on a fake clock, and end to end through a real loopback upstream."""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from support.harness import ADMIN, GatewayFactory
from support.httpx_transport import HttpxTransport
from support.upstream_fake import FakeUpstream, fresh_task, json, refuse, slow

from gateway.config import UpstreamSettings
from gateway.errors import ServiceUnavailable, UpstreamUnavailable
from gateway.logs import make_logger
from gateway.metrics import create_metrics
from gateway.upstream.breaker import BreakerOpen, BreakerState, CircuitBreaker, CircuitOpen, Permit, open_error
from gateway.upstream.client import UpstreamClient

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "rain on a tin roof", "duration": 5}
ACCEPTED = {"id": "task_1", "task_id": "task_1", "status": "queued", "progress": 0}
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_steps(breaker: CircuitBreaker, clock: FakeClock, steps: list[tuple[str, Any]]) -> None:
    """Apply ``steps``; each is (action, expectation), ``admit`` expecting "permit", "probe" or a refusal's seconds.

    Actions: ``ok`` / ``fail`` admit one call and report its outcome; ``admit`` only admits (the permit is kept, and
    ``ok_held`` / ``fail_held`` / ``abandon_held`` report on the oldest kept one); ``wait`` moves the clock;
    ``state`` checks the state.
    """
    held: list[Permit] = []
    for number, (action, expected) in enumerate(steps):
        where = f"step {number} ({action})"
        if action in ("ok", "fail"):
            permit = breaker.admit()
            (breaker.success if action == "ok" else breaker.failure)(permit)
        elif action == "admit":
            try:
                permit = breaker.admit()
            except BreakerOpen as exc:
                assert expected == pytest.approx(exc.retry_after_s), where
            else:
                assert expected == ("probe" if permit.probe else "permit"), where
                held.append(permit)
        elif action == "ok_held":
            breaker.success(held.pop(0))
        elif action == "fail_held":
            breaker.failure(held.pop(0))
        elif action == "abandon_held":
            breaker.abandon(held.pop(0))
        elif action == "wait":
            clock.now += expected
        elif action == "state":
            assert breaker.state is expected, where
        else:  # pragma: no cover - a typo in the table
            raise AssertionError(action)


STEPS: dict[str, list[tuple[str, Any]]] = {
    "opens after threshold consecutive failures": [
        ("fail", None),
        ("fail", None),
        ("state", CLOSED),
        ("fail", None),
        ("state", OPEN),
        ("admit", 10.0),
    ],
    "a success resets the count": [
        ("fail", None),
        ("fail", None),
        ("ok", None),
        ("fail", None),
        ("fail", None),
        ("state", CLOSED),
        ("fail", None),
        ("state", OPEN),
    ],
    "retry-after counts down while open": [
        *[("fail", None)] * 3,
        ("wait", 4.0),
        ("admit", 6.0),
        ("wait", 5.5),
        ("admit", 0.5),
        ("state", OPEN),
    ],
    "half-open lets exactly one probe through": [
        *[("fail", None)] * 3,
        ("wait", 10.0),
        ("state", HALF_OPEN),
        ("admit", "probe"),
        ("admit", 0.0),
        ("admit", 0.0),
        ("state", HALF_OPEN),
    ],
    "probe success closes": [
        *[("fail", None)] * 3,
        ("wait", 10.0),
        ("admit", "probe"),
        ("ok_held", None),
        ("state", CLOSED),
        ("admit", "permit"),
        ("admit", "permit"),
    ],
    "probe failure reopens for another open_s": [
        *[("fail", None)] * 3,
        ("wait", 10.0),
        ("admit", "probe"),
        ("wait", 2.0),
        ("fail_held", None),
        ("state", OPEN),
        ("admit", 10.0),
        ("wait", 10.0),
        ("admit", "probe"),
    ],
    "an abandoned probe hands the probe to the next caller": [
        *[("fail", None)] * 3,
        ("wait", 10.0),
        ("admit", "probe"),
        ("abandon_held", None),
        ("state", HALF_OPEN),
        ("admit", "probe"),
        ("ok_held", None),
        ("state", CLOSED),
    ],
    "late outcomes of calls admitted before opening are ignored": [
        ("admit", "permit"),
        ("admit", "permit"),
        *[("fail", None)] * 3,
        ("state", OPEN),
        ("ok_held", None),
        ("state", OPEN),
        ("wait", 10.0),
        ("admit", "probe"),
        ("fail_held", None),  # the second early permit: still ignored, the probe decides
        ("state", HALF_OPEN),
        ("admit", 0.0),
        ("fail_held", None),  # the probe
        ("state", OPEN),
        ("admit", 10.0),
    ],
    "a late failure from before the probe does not reopen a closed breaker": [
        *[("fail", None)] * 3,
        ("wait", 10.0),
        ("admit", "probe"),
        ("ok_held", None),
        ("fail", None),
        ("fail", None),
        ("state", CLOSED),
    ],
}


class TestStateMachine:
    """The breaker's transitions, table-driven on a fake clock (threshold 3, open 10 s)."""

    @pytest.mark.parametrize("name", list(STEPS))
    def test_transitions(self, name: str) -> None:
        """Each scenario's steps give the expected states, permits and refusals."""
        clock = FakeClock()
        run_steps(CircuitBreaker(3, 10.0, clock=clock), clock, STEPS[name])

    def test_threshold_zero_turns_it_off(self) -> None:
        """With failure_threshold 0 every call is admitted, however many fail."""
        clock = FakeClock()
        breaker = CircuitBreaker(0, 10.0, clock=clock)
        for _ in range(50):
            breaker.failure(breaker.admit())
        assert breaker.state is CLOSED
        assert not breaker.admit().probe

    @pytest.mark.parametrize(("threshold", "open_s"), [(-1, 10.0), (3, 0.0), (3, -1.0)])
    def test_bad_settings_refused(self, threshold: int, open_s: float) -> None:
        """A negative threshold or a non-positive open time is a programming error."""
        with pytest.raises(ValueError):
            CircuitBreaker(threshold, open_s)

    @pytest.mark.parametrize(("remaining", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (9.5, "10")])
    def test_open_error(self, remaining: float, header: str) -> None:
        """503 upstream_unavailable, Retry-After in whole seconds rounded up (at least 1), marked as never sent."""
        error = open_error(remaining)
        assert isinstance(error, CircuitOpen)
        assert isinstance(error, ServiceUnavailable) and isinstance(error, UpstreamUnavailable)
        assert (error.status, error.code, error.type) == (503, "upstream_unavailable", "server_error")
        assert error.headers == {"Retry-After": header}
        assert error.request_sent is False


def client_for(handler: Any, clock: FakeClock, threshold: int = 2) -> UpstreamClient:
    """An UpstreamClient on a mock transport, with a breaker of ``threshold`` failures and 5 s open."""
    settings = UpstreamSettings(base_url="http://upstream.test", get_retries=0)
    breaker = CircuitBreaker(threshold, 5.0, clock=clock)
    return UpstreamClient(
        settings,
        "sk-x",
        HttpxTransport(httpx.MockTransport(handler), settings),
        create_metrics(),
        breaker=breaker,
        log=make_logger(stream=io.StringIO()),
    )


class TestUpstreamClient:
    """The breaker inside ``UpstreamClient.request``: what counts as a failure, and fast refusals."""

    async def test_5xx_and_transport_errors_count_4xx_do_not(self) -> None:
        """400s and 429s never open it; 500s and connect errors do, and then nothing more is sent."""
        clock = FakeClock()
        answers: list[Any] = [400, 429, 404, 500, httpx.ConnectError("refused")]
        sent: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            sent.append(request.method)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return httpx.Response(answer)

        client = client_for(handler, clock)
        for expected in (400, 429, 404):
            assert (await client.request("GET", "/v1/videos/t", route="r", request_id="i")).status == expected
        assert client.breaker.state is CLOSED
        assert (await client.request("GET", "/v1/videos/t", route="r", request_id="i")).status == 500
        with pytest.raises(UpstreamUnavailable) as unreachable:
            await client.request("POST", SUBMIT, route="r", request_id="i", body=b"{}")
        assert not isinstance(unreachable.value, CircuitOpen)
        assert client.breaker.state is OPEN
        with pytest.raises(CircuitOpen) as refused:
            await client.request("POST", SUBMIT, route="r", request_id="i", body=b"{}")
        assert refused.value.headers == {"Retry-After": "5"}
        assert len(sent) == 5
        await client.aclose()

    async def test_cancelled_probe_is_not_a_verdict(self) -> None:
        """A probe cancelled mid-call (client gone) neither closes nor reopens: the next call probes."""
        clock = FakeClock()
        gate = asyncio.Event()
        status = [500, 500]

        async def handler(request: httpx.Request) -> httpx.Response:
            if not status:
                await gate.wait()
                return httpx.Response(200)
            return httpx.Response(status.pop(0))

        client = client_for(handler, clock)
        for _ in range(2):
            await client.request("GET", "/v1/videos/t", route="r", request_id="i")
        clock.now += 5.0
        probe = asyncio.create_task(client.request("GET", "/v1/videos/t", route="r", request_id="i"))
        await asyncio.sleep(0.01)
        with pytest.raises(CircuitOpen):
            await client.request("GET", "/v1/videos/t", route="r", request_id="i")
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert client.breaker.state is HALF_OPEN
        gate.set()
        assert (await client.request("GET", "/v1/videos/t", route="r", request_id="i")).status == 200
        assert client.breaker.state is CLOSED
        await client.aclose()


def breaker_env(threshold: int = 3, open_s: float = 0.3) -> dict[str, str]:
    """Gateway settings for a quick breaker; pending statuses never fresh, so every poll asks the upstream."""
    return {
        "KLING_GATEWAY_UPSTREAM_BREAKER_FAILURE_THRESHOLD": str(threshold),
        "KLING_GATEWAY_UPSTREAM_BREAKER_OPEN_S": str(open_s),
        "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0",
    }


class TestEndToEnd:
    """Through the gateway and a real loopback upstream."""

    def test_fails_fast_without_calling_the_upstream_then_recovers(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """3 upstream 500s open it: the 4th submission is a fast 503 that never reaches the fake; a probe closes it."""
        error = {"error": {"message": "boom", "code": "internal"}}
        fake_upstream.script("POST", SUBMIT, *[json(500, error)] * 3, default=fresh_task())
        gw = make_gateway(fake_upstream.url, env=breaker_env())
        for _ in range(3):
            assert gw.client.post(SUBMIT, json=BODY).status_code == 500  # the upstream's own answer, passed through
        started = time.perf_counter()
        refused = [gw.client.post(SUBMIT, json=BODY) for _ in range(5)]
        assert time.perf_counter() - started < 0.5
        for response in refused:
            assert response.status_code == 503
            error_body = response.json()["error"]
            assert (error_body["code"], error_body["type"]) == ("upstream_unavailable", "server_error")
            assert error_body["request_id"] == response.headers["x-request-id"]
            assert response.headers["retry-after"] == "1"
        assert fake_upstream.calls("POST", SUBMIT) == 3
        # Nothing was sent, so nothing is "outcome unknown".
        assert gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"] == []
        assert gw.metric("kling_gateway_rejections_total", {"code": "upstream_unavailable"}) == 5
        assert gw.metric("kling_gateway_upstream_breaker_state", {"state": "open"}) == 1
        time.sleep(0.35)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200  # the probe
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        assert fake_upstream.calls("POST", SUBMIT) == 5
        assert gw.metric("kling_gateway_upstream_breaker_state", {"state": "closed"}) == 1
        states = [line["state"] for line in gw.log_lines() if line.get("event") == "upstream_breaker"]
        assert states == ["open", "half_open", "closed"]

    def test_failed_probe_reopens(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Connections refused: it opens, the probe fails, it stays open and the next calls fail fast again."""
        fake_upstream.always("POST", SUBMIT, refuse())
        gw = make_gateway(fake_upstream.url, env=breaker_env(threshold=2))
        assert [gw.client.post(SUBMIT, json=BODY).status_code for _ in range(3)] == [502, 502, 503]
        time.sleep(0.35)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 502  # the probe went out and failed
        assert gw.client.post(SUBMIT, json=BODY).status_code == 503
        assert fake_upstream.calls("POST", SUBMIT) == 3

    def test_status_polls_served_stale_while_open(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """With the breaker open a cached task is answered STALE without an upstream call; an uncached one is 503."""
        in_progress = {**ACCEPTED, "status": "in_progress", "progress": 30}
        fake_upstream.script(
            "POST", SUBMIT, json(200, ACCEPTED), json(200, {**ACCEPTED, "id": "task_2", "task_id": "task_2"})
        )
        fake_upstream.script("GET", "/v1/videos/task_1", json(200, in_progress), default=json(503, {"error": {}}))
        fake_upstream.always("GET", "/v1/videos/task_2", json(503, {"error": {}}))
        gw = make_gateway(fake_upstream.url, env=breaker_env(open_s=30))
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        assert gw.client.post(SUBMIT, json={**BODY, "prompt": "another"}).status_code == 200
        first = gw.client.get("/v1/videos/task_1")
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        for _ in range(3):  # upstream 503s: served STALE, and each one counts against the breaker
            stale = gw.client.get("/v1/videos/task_1")
            assert (stale.status_code, stale.headers["x-cache"], stale.json()) == (200, "STALE", in_progress)
        calls = fake_upstream.calls("GET", "/v1/videos/task_1")
        assert calls == 4
        for _ in range(5):
            stale = gw.client.get("/v1/videos/task_1")
            assert (stale.status_code, stale.headers["x-cache"], stale.json()) == (200, "STALE", in_progress)
        uncached = gw.client.get("/v1/videos/task_2")
        assert (uncached.status_code, uncached.json()["error"]["code"]) == (503, "upstream_unavailable")
        assert fake_upstream.calls("GET", "/v1/videos/task_1") == calls
        assert fake_upstream.calls("GET", "/v1/videos/task_2") == 0

    def test_calls_in_flight_when_it_opens_finish_normally(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A slow poll sent before the breaker opened still answers 200, and its late success does not close it."""
        in_progress = {**ACCEPTED, "status": "in_progress", "progress": 30}
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED), default=json(500, {"error": {}}))
        fake_upstream.always("GET", "/v1/videos/task_1", slow(0.5, json(200, in_progress)))
        gw = make_gateway(fake_upstream.url, env=breaker_env(threshold=1, open_s=30))
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(gw.client.get, "/v1/videos/task_1")
            fake_upstream.wait_for_calls("GET", "/v1/videos/task_1")
            assert gw.client.post(SUBMIT, json=BODY).status_code == 500
            assert gw.client.post(SUBMIT, json=BODY).status_code == 503
            answered = poll.result(timeout=5)
        assert (answered.status_code, answered.headers["x-cache"], answered.json()) == (200, "MISS", in_progress)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 503
        assert fake_upstream.calls("POST", SUBMIT) == 2
