"""Graceful shutdown of the real server process: readiness fails first, in-flight requests finish, nothing fails."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from support.processes import free_port
from support.upstream_fake import FakeUpstream, dynamic, json, slow

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a kite over dunes", "duration": 5}
UPSTREAM_DELAY_S = 1.0
IN_FLIGHT = 20
SHUTDOWN_TIMEOUT_S = 10.0


@dataclass
class RunningGateway:
    """``python -m gateway serve`` in a subprocess, with its stdout (JSON log lines) and stderr in files."""

    process: subprocess.Popen[bytes]
    base: str
    stdout: Path
    stderr: Path

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        lines = self.stdout.read_text(errors="replace").splitlines()
        return [orjson.loads(line) for line in lines if line.startswith("{")]

    def events(self) -> list[str]:
        """The ``event`` of every log line, in order."""
        return [str(line.get("event")) for line in self.log_lines()]


def start_gateway(upstream: str, tmp_path: Path, **settings: str) -> RunningGateway:
    """Start the gateway (open auth, no settler) and wait until /readyz answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env.update(
        UNIALL_API_KEY="sk-test-upstream",
        UNIALL_BASE_URL=upstream,
        KLING_GATEWAY_AUTH_MODE="open",
        KLING_GATEWAY_SERVER_DATA_DIR=str(tmp_path / "data"),
        KLING_GATEWAY_SERVER_PORT=str(port),
        KLING_GATEWAY_SERVER_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
        KLING_GATEWAY_SETTLER_ENABLED="false",
        **{f"KLING_GATEWAY_SERVER_{name.upper()}": value for name, value in settings.items()},
    )
    stdout, stderr = tmp_path / "gateway.out", tmp_path / "gateway.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, stdout=out, stderr=err)
    gateway = RunningGateway(process, f"http://127.0.0.1:{port}", stdout, stderr)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(gateway.base + "/readyz", timeout=1).status_code == 200:
                return gateway
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise AssertionError(f"gateway did not start: {stderr.read_text(errors='replace')[-2000:]}")


@pytest.fixture
def slow_upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    """Submissions take UPSTREAM_DELAY_S and get a task id made from the request id."""

    def accept(request: Any) -> Any:
        """Answer slowly with task_<request id>."""
        task_id = "task_" + (request.header("x-request-id") or "none").replace("-", "")
        return slow(UPSTREAM_DELAY_S, json(200, {"id": task_id, "task_id": task_id, "status": "queued"}))

    fake_upstream.always("POST", SUBMIT, dynamic(accept))
    return fake_upstream


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to kill if a test fails before they exit on their own."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


async def submit_all(client: httpx.AsyncClient, prefix: str, n: int) -> list[asyncio.Task[httpx.Response]]:
    """Start ``n`` submissions with request ids ``prefix-i``."""
    return [
        asyncio.create_task(client.post(SUBMIT, json=BODY, headers={"X-Request-ID": f"{prefix}-{i}"})) for i in range(n)
    ]


async def refused_or_503(base: str) -> str:
    """What a brand-new connection gets now: "refused", or the status code."""
    try:
        async with httpx.AsyncClient(base_url=base, timeout=2) as fresh:
            return str((await fresh.post(SUBMIT, json=BODY)).status_code)
    except httpx.ConnectError:
        return "refused"


def assert_clean_exit(gateway: RunningGateway) -> None:
    """uvicorn re-raises the SIGTERM it drained on (status -15), or exits 0; nothing was cut off or crashed."""
    assert gateway.process.returncode in (0, -signal.SIGTERM)
    errors = gateway.stderr.read_text(errors="replace")
    assert "Traceback" not in errors
    assert "timeout graceful shutdown exceeded" not in errors
    events = gateway.events()
    assert events.index("shutdown_started") < events.index("shutdown")


class TestGracefulShutdown:
    """SIGTERM under load against ``python -m gateway serve`` and a slow loopback upstream."""

    async def test_in_flight_requests_finish_and_new_ones_are_refused(
        self, slow_upstream: FakeUpstream, tmp_path: Path, stopper: list[subprocess.Popen[bytes]]
    ) -> None:
        """20 submissions in flight at SIGTERM all answer 200; new connections are refused; exit well in time."""
        gateway = await asyncio.to_thread(start_gateway, slow_upstream.url, tmp_path)
        stopper.append(gateway.process)
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=gateway.base, timeout=30, limits=limits) as client:
            in_flight = await submit_all(client, "drain", IN_FLIGHT)
            await slow_upstream.wait_for_calls_async("POST", SUBMIT, IN_FLIGHT)
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert await refused_or_503(gateway.base) in ("refused", "503")
            answers = await asyncio.gather(*in_flight, return_exceptions=True)
        assert [getattr(a, "status_code", a) for a in answers] == [200] * IN_FLIGHT
        assert {a.json()["task_id"] for a in answers if isinstance(a, httpx.Response)} == {
            f"task_drain{i}" for i in range(IN_FLIGHT)
        }
        await asyncio.to_thread(gateway.process.wait, SHUTDOWN_TIMEOUT_S)
        assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S
        assert_clean_exit(gateway)
        served = [line for line in gateway.log_lines() if line.get("event") == "request" and line["route"] == SUBMIT]
        assert sorted(line["status"] for line in served) == [200] * IN_FLIGHT

    async def test_readiness_fails_first_during_grace(
        self, slow_upstream: FakeUpstream, tmp_path: Path, stopper: list[subprocess.Popen[bytes]]
    ) -> None:
        """With shutdown_grace_s, /readyz is 503 at once while everything else is still served; then the drain."""
        grace_s = 1.0
        gateway = await asyncio.to_thread(start_gateway, slow_upstream.url, tmp_path, shutdown_grace_s=str(grace_s))
        stopper.append(gateway.process)
        limits = httpx.Limits(max_connections=IN_FLIGHT + 5)
        async with httpx.AsyncClient(base_url=gateway.base, timeout=30, limits=limits) as client:
            in_flight = await submit_all(client, "grace", IN_FLIGHT)
            await slow_upstream.wait_for_calls_async("POST", SUBMIT, IN_FLIGHT)
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=gateway.base, timeout=2) as probe:
                deadline = time.monotonic() + 0.5
                while (ready := await probe.get("/readyz")).status_code == 200:
                    assert time.monotonic() < deadline, "readiness still passing 0.5 s after SIGTERM"
                    await asyncio.sleep(0.01)
                assert time.monotonic() - signalled < grace_s / 2
                assert ready.json() == {"status": "unavailable", "problems": ["shutting down"]}
                assert (await probe.get("/healthz")).status_code == 200
            late = await submit_all(client, "late", 1)  # arrives during the grace period: still served
            await slow_upstream.wait_for_calls_async("POST", SUBMIT, IN_FLIGHT + 1)
            await asyncio.sleep(max(0.0, signalled + grace_s + 0.3 - time.monotonic()))
            assert await refused_or_503(gateway.base) in ("refused", "503")
            answers = await asyncio.gather(*in_flight, *late, return_exceptions=True)
        assert [getattr(a, "status_code", a) for a in answers] == [200] * (IN_FLIGHT + 1)
        await asyncio.to_thread(gateway.process.wait, grace_s + SHUTDOWN_TIMEOUT_S)
        assert time.monotonic() - signalled < grace_s + SHUTDOWN_TIMEOUT_S
        assert_clean_exit(gateway)
        started = next(line for line in gateway.log_lines() if line.get("event") == "shutdown_started")
        assert (started["signal"], started["grace_s"]) == ("SIGTERM", grace_s)
