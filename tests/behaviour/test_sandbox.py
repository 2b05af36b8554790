"""The simulated UniAll upstream: submission, the timed lifecycle, failures, auth, files and serving."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from support.upstream_fake import SandboxServer

from gateway.sandbox import SandboxOptions, bind_socket, create_sandbox_app, mp4_bytes, serve_sandbox

KEY = "sk-sandbox"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT_BODY: dict[str, Any] = {
    "model": "kling-v3-std-silent",
    "prompt": "A wide cinematic shot of a traveler walking through dusty desert ruins.",
    "aspect_ratio": "16:9",
    "duration": 8,
}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_client(options: SandboxOptions, clock: FakeClock, **kwargs: Any) -> httpx.AsyncClient:
    app = create_sandbox_app(options, clock=clock, wall_clock=lambda: 1_700_000_000.0, **kwargs)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox.test")


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(SandboxOptions(api_key=KEY, queued_s=1.0, run_s=4.0), clock) as c:
        yield c


async def submit(client: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    response = await client.post("/v1/video/generations", json=body or TEXT_BODY, headers=AUTH)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


async def poll(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/videos/{task_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


class TestSubmit:
    async def test_returns_a_queued_job(self, client: httpx.AsyncClient) -> None:
        """A valid submission answers 200 with a queued job in the upstream's shape."""
        response = await client.post("/v1/video/generations", json=TEXT_BODY, headers=AUTH)
        assert response.status_code == 200
        body = response.json()
        assert body["id"].startswith("task_")
        assert body == {
            "id": body["id"],
            "task_id": body["id"],
            "object": "video.generation.job",
            "model": "kling-v3-std-silent",
            "status": "queued",
            "progress": 0,
            "created_at": 1_700_000_000,
        }

    async def test_ids_are_unique(self, client: httpx.AsyncClient) -> None:
        """Every submission gets its own task id."""
        ids = {await submit(client) for _ in range(5)}
        assert len(ids) == 5

    async def test_multi_prompt_without_prompt_is_accepted(self, client: httpx.AsyncClient) -> None:
        """A multi-shot request needs no top-level prompt."""
        body = {
            "model": "kling-v3-pro-silent",
            "image": "https://example.com/a.png",
            "duration": 6,
            "extra_body": {"multi_prompt": [{"index": 1, "prompt": "walk", "duration": 6}]},
        }
        assert (await client.post("/v1/video/generations", json=body, headers=AUTH)).status_code == 200

    @pytest.mark.parametrize(
        ("content", "param"),
        [
            (b"{not json", None),
            (b"[1, 2]", None),
            (b'{"prompt": "x"}', "model"),
            (b'{"model": 3, "prompt": "x"}', "model"),
            (b'{"model": "kling-v3-std-silent"}', "prompt"),
        ],
    )
    async def test_minimal_checks(self, client: httpx.AsyncClient, content: bytes, param: str | None) -> None:
        """Non-JSON, non-object, missing model or prompt answer an OpenAI-style 400."""
        response = await client.post("/v1/video/generations", content=content, headers=AUTH)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert error["message"]

    async def test_validates_nothing_else(self, client: httpx.AsyncClient) -> None:
        """Out-of-range values that the gateway rejects still pass the sandbox, as they would upstream."""
        body = {**TEXT_BODY, "duration": 99, "aspect_ratio": "4:3", "surprise": True}
        assert (await client.post("/v1/video/generations", json=body, headers=AUTH)).status_code == 200


class TestLifecycle:
    async def test_starts_queued(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """Within queued_s a task is queued at progress 0."""
        task_id = await submit(client)
        clock.advance(0.9)
        body = await poll(client, task_id)
        assert (body["status"], body["progress"]) == ("queued", 0)
        assert "video_url" not in body

    async def test_progress_rises_while_in_progress(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """After queued_s the task runs with progress rising linearly below 100."""
        task_id = await submit(client)
        seen = []
        for _ in range(4):
            clock.advance(1.0)
            body = await poll(client, task_id)
            assert body["status"] == "in_progress"
            seen.append(body["progress"])
        assert seen == sorted(seen)
        assert seen[0] == 0
        assert 0 < seen[1] < seen[2] < seen[3] <= 99
        assert seen[2] == 49

    async def test_completes_with_video(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """After queued_s + run_s the task is completed with video_url, seconds and completed_at."""
        task_id = await submit(client)
        clock.advance(5.0)
        body = await poll(client, task_id)
        assert body == {
            "id": task_id,
            "task_id": task_id,
            "object": "video.generation.job",
            "model": "kling-v3-std-silent",
            "status": "completed",
            "progress": 100,
            "created_at": 1_700_000_000,
            "completed_at": 1_700_000_005,
            "video_url": f"http://sandbox.test/sandbox/files/{task_id}.mp4",
            "seconds": 8,
        }

    @pytest.mark.parametrize(("duration", "seconds"), [(None, 5), (3, 3), ("6", 6), (15, 15), (7.0, 7)])
    async def test_seconds_follow_the_requested_duration(
        self, client: httpx.AsyncClient, clock: FakeClock, duration: object, seconds: int
    ) -> None:
        """Output seconds are the requested duration as an int, 5 when absent."""
        body = {k: v for k, v in TEXT_BODY.items() if k != "duration"}
        if duration is not None:
            body["duration"] = duration
        task_id = await submit(client, body)
        clock.advance(10)
        assert (await poll(client, task_id))["seconds"] == seconds

    async def test_public_base_url_builds_video_url(self, clock: FakeClock) -> None:
        """A configured public base URL replaces the request's base in video_url."""
        options = SandboxOptions(api_key=KEY, queued_s=0, run_s=0, public_base_url="https://cdn.example/")
        async with make_client(options, clock) as c:
            task_id = await submit(c)
            body = await poll(c, task_id)
        assert body["video_url"] == f"https://cdn.example/sandbox/files/{task_id}.mp4"

    async def test_zero_timings_complete_at_once(self, clock: FakeClock) -> None:
        """With queued_s = run_s = 0 the first poll already sees completed."""
        async with make_client(SandboxOptions(api_key=KEY, queued_s=0, run_s=0), clock) as c:
            assert (await poll(c, await submit(c)))["status"] == "completed"


class TestFailures:
    async def test_fail_marker_fails_the_task(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """A prompt containing the fail marker runs normally, then ends failed with an error."""
        task_id = await submit(client, {**TEXT_BODY, "prompt": "a cat [sandbox:fail] on a mat"})
        clock.advance(2.0)
        assert (await poll(client, task_id))["status"] == "in_progress"
        clock.advance(3.0)
        body = await poll(client, task_id)
        assert body["status"] == "failed"
        assert body["error"]["code"] == "generation_failed"
        assert body["error"]["message"]
        assert "video_url" not in body
        assert "seconds" not in body

    async def test_fail_marker_in_multi_prompt(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """The marker also counts inside a multi-shot prompt."""
        body = {
            "model": "kling-v3-pro-silent",
            "image": "https://example.com/a.png",
            "duration": 6,
            "extra_body": {"multi_prompt": [{"index": 1, "prompt": "[sandbox:fail]", "duration": 6}]},
        }
        task_id = await submit(client, body)
        clock.advance(5.0)
        assert (await poll(client, task_id))["status"] == "failed"

    async def test_fail_rate_one_fails_everything(self, clock: FakeClock) -> None:
        """fail_rate = 1 fails every task."""
        async with make_client(SandboxOptions(api_key=KEY, queued_s=0, run_s=0, fail_rate=1.0), clock) as c:
            statuses = {(await poll(c, await submit(c)))["status"] for _ in range(5)}
        assert statuses == {"failed"}

    async def test_fail_rate_is_reproducible_with_a_seeded_rng(self, clock: FakeClock) -> None:
        """The same seed fails the same submissions."""
        runs = []
        for _ in range(2):
            options = SandboxOptions(api_key=KEY, queued_s=0, run_s=0, fail_rate=0.5)
            async with make_client(options, clock, rng=random.Random(7)) as c:
                runs.append([(await poll(c, await submit(c)))["status"] for _ in range(20)])
        assert runs[0] == runs[1]
        assert set(runs[0]) == {"failed", "completed"}

    @pytest.mark.parametrize(
        "kwargs", [{"fail_rate": 1.5}, {"fail_rate": -0.1}, {"queued_s": -1}, {"run_s": -1}, {"max_tasks": 0}]
    )
    def test_bad_options_are_rejected(self, kwargs: dict[str, Any]) -> None:
        """Impossible options fail at construction."""
        with pytest.raises(ValueError):
            SandboxOptions(api_key=None, **kwargs)


class TestAuth:
    @pytest.mark.parametrize(
        "headers",
        [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Bearer "}, {"Authorization": KEY}],
    )
    async def test_rejects_missing_or_wrong_key(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        """Submissions without the right bearer key answer an OpenAI-style 401."""
        response = await client.post("/v1/video/generations", json=TEXT_BODY, headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
        assert error["message"]

    async def test_status_needs_the_key(self, client: httpx.AsyncClient) -> None:
        """Status polls need the key too."""
        task_id = await submit(client)
        response = await client.get(f"/v1/videos/{task_id}", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401

    async def test_scheme_is_case_insensitive(self, client: httpx.AsyncClient) -> None:
        """`bearer` works as well as `Bearer`."""
        response = await client.post(
            "/v1/video/generations", json=TEXT_BODY, headers={"Authorization": f"bearer {KEY}"}
        )
        assert response.status_code == 200

    async def test_no_configured_key_accepts_any_bearer(self, clock: FakeClock) -> None:
        """With api_key None any non-empty bearer token is accepted, but not none at all."""
        async with make_client(SandboxOptions(api_key=None), clock) as c:
            ok = await c.post("/v1/video/generations", json=TEXT_BODY, headers={"Authorization": "Bearer x"})
            missing = await c.post("/v1/video/generations", json=TEXT_BODY)
        assert (ok.status_code, missing.status_code) == (200, 401)


class TestNotFound:
    async def test_unknown_task(self, client: httpx.AsyncClient) -> None:
        """An unknown task id answers an OpenAI-style 404."""
        response = await client.get("/v1/videos/task_nope", headers=AUTH)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "invalid_request_error"

    async def test_unknown_route_is_json(self, client: httpx.AsyncClient) -> None:
        """Unknown paths answer 404 in the same JSON shape."""
        response = await client.get("/v1/nothing", headers=AUTH)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"

    async def test_oldest_tasks_are_forgotten(self, clock: FakeClock) -> None:
        """Beyond max_tasks the oldest task is evicted and then answers 404."""
        async with make_client(SandboxOptions(api_key=KEY, max_tasks=2), clock) as c:
            first, second, third = [await submit(c) for _ in range(3)]
            assert (await c.get(f"/v1/videos/{first}", headers=AUTH)).status_code == 404
            assert (await c.get(f"/v1/videos/{second}", headers=AUTH)).status_code == 200
            assert (await c.get(f"/v1/videos/{third}", headers=AUTH)).status_code == 200


class TestFiles:
    async def test_completed_video_downloads(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """The video_url of a completed task serves a small MP4 without auth."""
        task_id = await submit(client)
        clock.advance(5.0)
        video_url = (await poll(client, task_id))["video_url"]
        response = await client.get(video_url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "video/mp4"
        assert response.content[4:8] == b"ftyp"
        assert response.content == mp4_bytes(8)

    async def test_not_before_completion(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """There is no file while the task runs, nor for unknown tasks."""
        task_id = await submit(client)
        clock.advance(2.0)
        assert (await client.get(f"/sandbox/files/{task_id}.mp4")).status_code == 404
        assert (await client.get("/sandbox/files/task_nope.mp4")).status_code == 404

    async def test_not_for_failed_tasks(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """A failed task has no file."""
        task_id = await submit(client, {**TEXT_BODY, "prompt": "[sandbox:fail]"})
        clock.advance(10.0)
        assert (await client.get(f"/sandbox/files/{task_id}.mp4")).status_code == 404

    def test_mp4_boxes_are_well_formed(self) -> None:
        """The blob is a chain of ISO-BMFF boxes whose sizes add up, starting with ftyp."""
        data = mp4_bytes(5)
        kinds, offset = [], 0
        while offset < len(data):
            size = int.from_bytes(data[offset : offset + 4], "big")
            kinds.append(data[offset + 4 : offset + 8])
            offset += size
        assert offset == len(data)
        assert kinds == [b"ftyp", b"moov", b"mdat"]


class TestHealth:
    async def test_health(self, client: httpx.AsyncClient) -> None:
        """The health route answers 200 without auth."""
        assert (await client.get("/sandbox/health")).status_code == 200


class TestServing:
    def test_bind_socket_picks_a_port(self) -> None:
        """Port 0 binds an OS-chosen port that accepts connections."""
        with bind_socket("127.0.0.1", 0) as sock:
            port = sock.getsockname()[1]
            assert port > 0
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass

    async def test_serve_sandbox_on_loopback(self) -> None:
        """serve_sandbox serves a working sandbox on a real port for the duration of the block."""
        options = SandboxOptions(api_key=KEY, queued_s=0, run_s=0)
        async with serve_sandbox(options) as running, httpx.AsyncClient(base_url=running.url) as c:
            assert running.url == f"http://127.0.0.1:{running.port}"
            task_id = await submit(c)
            body = await poll(c, task_id)
            assert body["video_url"] == f"{running.url}/sandbox/files/{task_id}.mp4"
            assert (await c.get(body["video_url"])).status_code == 200
        async with httpx.AsyncClient() as after:
            with pytest.raises(httpx.ConnectError):
                await after.get(f"{running.url}/sandbox/health")

    def test_fixture_runs_the_full_lifecycle(self, sandbox_server: SandboxServer) -> None:
        """The sandbox_server fixture is a real upstream whose tasks complete within a second."""
        headers = {"Authorization": f"Bearer {sandbox_server.api_key}"}
        with httpx.Client(base_url=sandbox_server.url, headers=headers) as c:
            task_id = c.post("/v1/video/generations", json=TEXT_BODY).json()["id"]
            assert c.get(f"/v1/videos/{task_id}").json()["status"] == "queued"
            deadline = time.monotonic() + 5
            while (body := c.get(f"/v1/videos/{task_id}").json())["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.get(body["video_url"]).headers["content-type"] == "video/mp4"
