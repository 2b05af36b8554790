"""Durability: a failing store never loses an accepted task, and kill -9 loses nothing that was answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.flaky_store import FlakyStore
from support.harness import ADMIN, ADMIN_TOKEN, GatewayFactory
from support.processes import free_port
from support.upstream_fake import FakeUpstream, dynamic, json, slow

from gateway.store import open_store
from gateway.store.base import Store

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "waves on a pier", "duration": 5}


def accept_numbered(fake: FakeUpstream, delay_s: float = 0.0) -> None:
    """Each submission gets task_<request id> so the test can match upstream calls to ledger rows."""

    def accept(request: Any) -> Any:
        task_id = "task_" + (request.header("x-request-id") or "none").replace("-", "")
        answer = json(200, {"id": task_id, "task_id": task_id, "status": "queued"})
        return slow(delay_s, answer) if delay_s else answer

    fake.always("POST", SUBMIT, dynamic(accept))


class TestStoreFailure:
    async def _store(self, tmp_path: Path) -> Store:
        return await open_store(f"sqlite:///{tmp_path}/flaky.db")

    def test_accepted_task_survives_store_failure(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """The upstream accepted: the client gets its task although the write failed; a retry records it."""
        import asyncio

        accept_numbered(fake_upstream)
        inner = asyncio.run(self._store(tmp_path))
        flaky = FlakyStore(inner, failures=2)
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "open"}, store=flaky)
        response = gw.client.post(SUBMIT, json=BODY, headers={"X-Request-ID": "rid-flaky"})
        assert response.status_code == 200
        task_id = response.json()["task_id"]
        assert any(line.get("event") == "task_write_failed" for line in gw.log_lines())
        deadline = time.monotonic() + 5
        while not gw.client.get("/gateway/tasks").json()["data"]:
            assert time.monotonic() < deadline, "the retried write never landed"
            time.sleep(0.1)
        assert gw.client.get("/gateway/tasks").json()["data"][0]["task_id"] == task_id
        assert any(line.get("event") == "task_write_recovered" for line in gw.log_lines())
        assert gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"] == []

    def test_store_down_before_forwarding_is_503(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """When the intent cannot be written nothing is forwarded: 503 store_unavailable, with Retry-After."""
        import asyncio

        accept_numbered(fake_upstream)
        flaky = FlakyStore(asyncio.run(self._store(tmp_path)), failures=0, intents_fail=True)
        gw = make_gateway(fake_upstream.url, store=flaky)
        response = gw.client.post(SUBMIT, json=BODY)
        assert (response.status_code, response.json()["error"]["code"]) == (503, "store_unavailable")
        assert response.headers["retry-after"] == "1"
        assert fake_upstream.calls("POST", SUBMIT) == 0

    def test_unanswered_submission_is_outcome_unknown(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A submission the upstream received but never answered is listed as outcome unknown."""
        fake_upstream.script("POST", SUBMIT, slow(5, json(200, {"id": "late"})))
        gw = make_gateway(
            fake_upstream.url,
            env={"KLING_GATEWAY_UPSTREAM_TIMEOUT_S": "0.3", "KLING_GATEWAY_UPSTREAM_READ_TIMEOUT_S": "0.3"},
        )
        response = gw.client.post(SUBMIT, json=BODY, headers={"X-Request-ID": "rid-unknown"})
        assert response.status_code == 504
        (unknown,) = gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"]
        assert (unknown["request_id"], unknown["model"], unknown["account"]) == (
            "rid-unknown",
            "kling-v3-std-silent",
            "default",
        )

    def test_refused_connection_leaves_nothing(self, make_gateway: GatewayFactory) -> None:
        """A submission that never reached the upstream leaves no intent behind."""
        gw = make_gateway(FakeUpstream.closed_port())
        assert gw.client.post(SUBMIT, json=BODY).status_code == 502
        assert gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"] == []


def start_gateway(upstream: str, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env.update(
        UNIALL_API_KEY="sk-test-upstream",
        UNIALL_BASE_URL=upstream,
        KLING_GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN,
        KLING_GATEWAY_SERVER_DATA_DIR=str(data_dir),
        KLING_GATEWAY_SERVER_PORT=str(port),
        KLING_GATEWAY_SETTLER_ENABLED="false",
        KLING_GATEWAY_LOGGING_ACCESS_LOG="false",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("gateway did not start")


class TestKillNine:
    def test_kill_9_during_submissions_then_restart(self, fake_upstream: FakeUpstream, tmp_path: Path) -> None:
        """kill -9 under submissions and polls: answered tasks all there, the rest unknown, nothing settled twice."""
        accept_numbered(fake_upstream, delay_s=0.02)
        # Every task completes at once, with 4 output seconds: polls during the stream settle some of them.
        fake_upstream.always("GET", "/v1/videos/", json(200, {"status": "completed", "progress": 100, "seconds": 4}))
        port = free_port()
        gateway = start_gateway(fake_upstream.url, tmp_path / "data", port)
        base = f"http://127.0.0.1:{port}"
        secret = httpx.post(f"{base}/gateway/keys", json={"name": "team-a"}, headers=ADMIN).json()["key"]
        headers = {"Authorization": f"Bearer {secret}"}
        answered: dict[str, str] = {}  # request id -> task id, for 200s only
        stop = threading.Event()
        lock = threading.Lock()

        def submitter(worker: int) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=5) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    request_id = f"w{worker}-{n}"
                    try:
                        response = client.post(SUBMIT, json=BODY, headers={"X-Request-ID": request_id})
                    except httpx.TransportError:
                        return  # the gateway died under us: outcome unknown to this client
                    if response.status_code == 200:
                        with lock:
                            answered[request_id] = response.json()["task_id"]

        def poller() -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=5) as client:
                while not stop.is_set():
                    with lock:
                        ids = list(answered.values())[-5:]
                    for task_id in ids:
                        try:
                            client.get(f"/v1/videos/{task_id}")
                        except httpx.TransportError:
                            return
                    time.sleep(0.01)

        workers = [threading.Thread(target=submitter, args=(i,)) for i in range(3)]
        workers.append(threading.Thread(target=poller))
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 10
        while len(answered) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait()
        stop.set()
        for worker in workers:
            worker.join()
        assert len(answered) >= 30

        restarted = start_gateway(fake_upstream.url, tmp_path / "data", port)
        try:
            with httpx.Client(base_url=base, headers=headers, timeout=5) as client:
                tasks: dict[str, str] = {}
                unsettled = 0
                cursor = None
                while True:
                    page = client.get(
                        "/gateway/tasks", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}
                    )
                    tasks.update({t["request_id"]: t["task_id"] for t in page.json()["data"]})
                    unsettled += sum(1 for t in page.json()["data"] if t["outcome"] is None)
                    cursor = page.json()["next_cursor"]
                    if not cursor:
                        break
                for request_id, task_id in answered.items():
                    assert tasks.get(request_id) == task_id, f"answered task {task_id} missing after kill -9"
                for task_id in tasks.values():  # every task polled again, settled ones included
                    assert client.get(f"/v1/videos/{task_id}").json()["status"] == "completed"
                settled_now = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in client.get("/metrics").text.splitlines()
                    if line.startswith("kling_gateway_tasks_settled_total{")
                )
                assert settled_now == unsettled, "a task settled before the kill was settled again"
                totals = client.get("/gateway/usage").json()["totals"]
                assert (totals["tasks"], totals["completed"]) == (len(tasks), len(tasks))
                assert totals["settled_usd"] == f"{len(tasks) * 0.084 * 4:.4f}"  # std-silent, 4 s reported
                unknown = {
                    u["request_id"] for u in client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"]
                }
            seen_upstream = {r.header("x-request-id") for r in fake_upstream.requests_to("POST", SUBMIT)}
            for request_id in seen_upstream:
                assert request_id in tasks or request_id in unknown, f"{request_id} reached the upstream and vanished"
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=15)


@pytest.mark.parametrize("canary", ["sk-canary-upstream-0xDEADBEEF"])
class TestSecretsNeverLeak:
    def test_canaries_absent_from_every_output(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, canary: str
    ) -> None:
        """The upstream key, the admin token and client keys appear in no response, log line or metric."""
        from prometheus_client import generate_latest

        fake_upstream.script(
            "POST",
            SUBMIT,
            json(200, {"id": "task_c", "task_id": "task_c", "status": "queued"}),
            json(401, {"error": {"message": "bad key", "code": "invalid_api_key"}}),
        )
        fake_upstream.always("GET", "/v1/videos/", json(500, {"error": {"message": "boom"}}))
        gw = make_gateway(fake_upstream.url, upstream_key=canary, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        client_key = gw.create_key("team-a")
        auth = gw.as_key(client_key)
        outputs = [
            gw.client.post(SUBMIT, json=BODY, headers=auth),
            gw.client.post(SUBMIT, json=BODY, headers=auth),
            gw.client.get("/v1/videos/task_c", headers=auth),
            gw.client.post(SUBMIT, json={"model": "x"}, headers=auth),
            gw.client.post(SUBMIT, json=BODY, headers={"Authorization": f"Bearer {client_key}x"}),
            gw.client.get("/gateway/keys", headers=ADMIN),
            gw.client.get("/gateway/keys", headers={"Authorization": "Bearer wrong"}),
            gw.client.get("/metrics"),
        ]
        emitted = "\n".join(
            [r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items()) for r in outputs]
            + [gw.logs.getvalue(), generate_latest(gw.registry).decode()]
        )
        assert fake_upstream.requests_to("POST", SUBMIT)[0].header("authorization") == f"Bearer {canary}"
        for secret in (canary, ADMIN_TOKEN, client_key):
            assert secret not in emitted
