"""Video content end to end: GET/HEAD /v1/videos/{id}/content through the gateway, ranges, SSRF rules, the archive."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from support.harness import GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, Video, json, redirect, video, video_bytes

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a fox in the snow", "duration": 5}
KEYS_MODE = {"KLING_GATEWAY_AUTH_MODE": "keys"}
SIZE = 300_000


def completed(task_id: str, video_url: str) -> dict[str, Any]:
    return {"id": task_id, "task_id": task_id, "status": "completed", "progress": 100, "video_url": video_url}


def submit(gw: GatewayHarness, headers: dict[str, str] | None = None) -> str:
    response = gw.client.post(SUBMIT, json=BODY, headers=headers or {})
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


def script_task(fake: FakeUpstream, task_id: str, video_url: str | None, status: str = "completed") -> None:
    fake.script("POST", SUBMIT, json(200, {"id": task_id, "task_id": task_id, "status": "queued"}))
    body = completed(task_id, video_url or "") if status == "completed" else {"id": task_id, "status": status}
    fake.always("GET", f"/v1/videos/{task_id}", json(200, body))


def content(task_id: str) -> str:
    return f"/v1/videos/{task_id}/content"


@pytest.fixture
def served(fake_upstream: FakeUpstream) -> Video:
    file = video(SIZE, etag='"v1"')
    fake_upstream.always("*", "/files/", file)
    return file


class TestDownload:
    def test_owner_gets_the_bytes_with_headers(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video
    ) -> None:
        """The owner downloads the whole video: 200, length, type, Accept-Ranges, ETag, the exact bytes."""
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        response = gw.client.get(content("task_1"), headers={"Authorization": "Bearer client-secret"})
        assert response.status_code == 200
        assert response.content == video_bytes(0, SIZE)
        assert response.headers["content-length"] == str(SIZE)
        assert response.headers["content-type"] == "video/mp4"
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["etag"] == '"v1"'
        fetches = fake_upstream.requests_to("GET", "/files/task_1.mp4")
        assert len(fetches) == 1
        # Same origin as the upstream: the account's key goes there, never the client's Authorization.
        assert fetches[0].header("authorization") == "Bearer sk-test-upstream"
        assert gw.metric("kling_gateway_content_bytes_total", {"source": "upstream"}) == SIZE

    def test_other_key_and_unknown_task_are_404(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video
    ) -> None:
        """Another key's task and an unknown task get the same 404 task_not_found; nothing is fetched."""
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        owner, other = gw.create_key("owner"), gw.create_key("other")
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw, gw.as_key(owner))
        for path, key in ((content("task_1"), other), (content("task_nope"), owner)):
            for method in ("GET", "HEAD"):
                response = gw.client.request(method, path, headers=gw.as_key(key))
                assert response.status_code == 404
                if method == "GET":
                    assert response.json()["error"]["code"] == "task_not_found"
        assert gw.client.get(content("task_1")).status_code == 401
        assert fake_upstream.calls("GET", "/files/task_1.mp4") == 0

    @pytest.mark.parametrize("status", ["queued", "in_progress", "failed"])
    def test_not_completed_is_409(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, status: str) -> None:
        """Before completion: 409 video_not_ready, the message naming the task's status."""
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", None, status=status)
        submit(gw)
        response = gw.client.get(content("task_1"))
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "video_not_ready"
        assert status in response.json()["error"]["message"]

    @pytest.mark.parametrize(
        ("range_header", "status", "start", "end"),
        [
            ("bytes=0-99", 206, 0, 100),
            ("bytes=1000-", 206, 1000, SIZE),
            ("bytes=-500", 206, SIZE - 500, SIZE),
            (f"bytes=10-{SIZE * 2}", 206, 10, SIZE),
            ("bytes=0-1,5-9", 200, 0, SIZE),  # several ranges: served whole
            ("items=0-1", 200, 0, SIZE),
        ],
    )
    @pytest.mark.parametrize("origin_ranges", [True, False])
    def test_ranges(
        self,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        range_header: str,
        status: int,
        start: int,
        end: int,
        origin_ranges: bool,
    ) -> None:
        """Single byte ranges give 206 with Content-Range, whether the origin honours ranges or not."""
        fake_upstream.always("*", "/files/", video(SIZE, ranges=origin_ranges))
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        response = gw.client.get(content("task_1"), headers={"Range": range_header})
        assert response.status_code == status
        assert response.content == video_bytes(start, end)
        assert response.headers["content-length"] == str(end - start)
        if status == 206:
            assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"

    @pytest.mark.parametrize("origin_ranges", [True, False])
    def test_unsatisfiable_range_is_416(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, origin_ranges: bool
    ) -> None:
        """A range past the end: 416 range_not_satisfiable with Content-Range bytes */size."""
        fake_upstream.always("*", "/files/", video(SIZE, ranges=origin_ranges))
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        response = gw.client.get(content("task_1"), headers={"Range": f"bytes={SIZE}-"})
        assert response.status_code == 416
        assert response.json()["error"]["code"] == "range_not_satisfiable"
        assert response.headers["content-range"] == f"bytes */{SIZE}"

    def test_head_gives_headers_only(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video
    ) -> None:
        """HEAD answers the headers a GET would, with no body."""
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        response = gw.client.head(content("task_1"))
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["content-length"] == str(SIZE)
        assert response.headers["accept-ranges"] == "bytes"
        ranged = gw.client.head(content("task_1"), headers={"Range": "bytes=0-9"})
        assert (ranged.status_code, ranged.headers["content-length"]) == (206, "10")

    @pytest.mark.parametrize(
        ("if_none_match", "status"), [('"v1"', 304), ('W/"v1"', 304), ('"v0", "v1"', 304), ("*", 304), ('"v0"', 200)]
    )
    def test_if_none_match(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video, if_none_match: str, status: int
    ) -> None:
        """If-None-Match naming the video's ETag: 304 with the ETag and no body; another tag: the video."""
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        response = gw.client.get(content("task_1"), headers={"If-None-Match": if_none_match})
        assert response.status_code == status
        assert response.headers["etag"] == '"v1"'
        assert len(response.content) == (0 if status == 304 else SIZE)

    def test_expired_url_without_archive_is_502(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video
    ) -> None:
        """The upstream's URL expired and nothing is archived: 502 video_unavailable."""
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        served.expired = True
        response = gw.client.get(content("task_1"))
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "video_unavailable"

    def test_size_cap(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video) -> None:
        """A video over [content] max_bytes is 502 video_unavailable before any byte is sent."""
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_CONTENT_MAX_BYTES": str(SIZE - 1)})
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        response = gw.client.get(content("task_1"))
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "video_unavailable"
        assert "limit" in response.json()["error"]["message"]

    def test_status_route_still_fast_and_content_not_swallowed(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video
    ) -> None:
        """The fast lane keeps GET /v1/videos/{id}; /content is routed to the content handler."""
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        assert gw.client.get("/v1/videos/task_1").json()["status"] == "completed"
        assert gw.client.get(content("task_1")).status_code == 200
        assert gw.metric(
            "kling_gateway_requests_total",
            {"route": "/v1/videos/{task_id}/content", "method": "GET", "status": "200"},
        )


class TestOffOriginUrls:
    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:{port}/files/task_1.mp4",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost:{port}/files/task_1.mp4",
            "http://10.0.0.7/v.mp4",
            "http://[::1]:{port}/v.mp4",
            "http://user:pw@cdn.example.com/v.mp4",
            "ftp://cdn.example.com/v.mp4",
        ],
    )
    def test_private_or_unusable_urls_are_refused_unfetched(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, url: str
    ) -> None:
        """A video_url off the upstream's origin that is private or unusable: 502, and nothing is fetched."""
        other = FakeUpstream()
        with other:
            other.always("*", "/", video(SIZE))
            gw = make_gateway(fake_upstream.url)
            script_task(fake_upstream, "task_1", url.format(port=other.url.rsplit(":", 1)[1]))
            submit(gw)
            response = gw.client.get(content("task_1"))
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "video_unavailable"
            assert other.requests == []

    def test_name_resolving_to_private_address_is_refused(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A host name whose addresses are private is refused at resolution, before any connection."""

        async def resolve(host: str) -> list[str]:
            return ["93.184.216.34", "127.0.0.1"] if host == "cdn.example.com" else []

        other = FakeUpstream()
        with other:
            other.always("*", "/", video(SIZE))
            gw = make_gateway(fake_upstream.url, resolver=resolve)
            port = other.url.rsplit(":", 1)[1]
            script_task(fake_upstream, "task_1", f"http://cdn.example.com:{port}/v.mp4")
            submit(gw)
            response = gw.client.get(content("task_1"))
            assert response.status_code == 502
            assert "private" in response.json()["error"]["message"]
            assert other.requests == []

    def test_redirect_hops_are_rechecked(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """The upstream's origin redirecting to a private address: refused at that hop, the target never asked."""
        other = FakeUpstream()
        with other:
            other.always("*", "/", video(SIZE))
            fake_upstream.always("GET", "/files/", redirect(f"{other.url}/stolen"))
            gw = make_gateway(fake_upstream.url)
            script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
            submit(gw)
            response = gw.client.get(content("task_1"))
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "video_unavailable"
            assert fake_upstream.calls("GET", "/files/task_1.mp4") == 1
            assert other.requests == []

    def test_same_origin_redirects_followed_up_to_three(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Three redirects are followed; a fourth is refused."""
        fake_upstream.always("GET", "/hop1", redirect("/hop2"))
        fake_upstream.always("GET", "/hop2", redirect("/hop3"))
        fake_upstream.always("GET", "/hop3", redirect("/files/v.mp4"))
        fake_upstream.always("GET", "/hop0", redirect("/hop1"))
        fake_upstream.always("*", "/files/", video(SIZE))
        gw = make_gateway(fake_upstream.url)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/hop1")
        submit(gw)
        assert gw.client.get(content("task_1")).status_code == 200
        script_task(fake_upstream, "task_2", f"{fake_upstream.url}/hop0")
        submit(gw)
        response = gw.client.get(content("task_2"))
        assert response.status_code == 502
        assert "redirected more than 3" in response.json()["error"]["message"]


def wait_for(predicate: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def archive_env(url: str, **more: str) -> dict[str, str]:
    return {"KLING_GATEWAY_ARCHIVE_URL": url, "KLING_GATEWAY_ARCHIVE_SCAN_S": "0.05", **more}


class TestArchive:
    def test_archived_copy_outlives_the_upstream_url(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video, tmp_path: Path
    ) -> None:
        """A completed task is archived once (size and SHA-256 in the ledger) and served after the URL expires."""
        folder = tmp_path / "archive"
        gw = make_gateway(fake_upstream.url, env=archive_env(folder.as_uri()))
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        assert gw.client.get("/v1/videos/task_1").status_code == 200  # settles the task
        wait_for(lambda: gw.metric("kling_gateway_archive_total", {"result": "stored"}) == 1)
        assert (folder / "task_1.mp4").read_bytes() == video_bytes(0, SIZE)
        served.expired = True
        response = gw.client.get(content("task_1"), headers={"Range": "bytes=100-199"})
        assert response.status_code == 206
        assert response.content == video_bytes(100, 200)
        assert response.headers["etag"] == f'"{hashlib.sha256(video_bytes(0, SIZE)).hexdigest()}"'
        whole = gw.client.get(content("task_1"))
        assert whole.content == video_bytes(0, SIZE)
        assert gw.client.head(content("task_1")).headers["content-length"] == str(SIZE)
        assert gw.client.get(content("task_1"), headers={"Range": f"bytes={SIZE}-"}).status_code == 416
        etag = whole.headers["etag"]
        cached = gw.client.get(content("task_1"), headers={"If-None-Match": etag})
        assert (cached.status_code, cached.content, cached.headers["etag"]) == (304, b"", etag)
        assert gw.metric("kling_gateway_content_bytes_total", {"source": "archive"}) == 100 + SIZE
        time.sleep(0.2)  # several more scans: still one copy, one fetch
        assert fake_upstream.calls("GET", "/files/task_1.mp4") == 1
        assert gw.metric("kling_gateway_archive_total", {"result": "stored"}) == 1

    def test_failing_store_retries_and_loses_nothing(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video, tmp_path: Path
    ) -> None:
        """An archive that cannot be written: attempts fail and are retried, clients still get the video."""
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the archive folder should be")
        env = archive_env((blocker / "archive").as_uri(), KLING_GATEWAY_ARCHIVE_RETRY_BASE_S="0.05")
        gw = make_gateway(fake_upstream.url, env=env)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        assert gw.client.get("/v1/videos/task_1").status_code == 200
        wait_for(lambda: gw.metric("kling_gateway_archive_total", {"result": "failed"}) >= 2)
        response = gw.client.get(content("task_1"))
        assert (response.status_code, response.content) == (200, video_bytes(0, SIZE))
        blocker.unlink()  # the store comes back
        wait_for(lambda: gw.metric("kling_gateway_archive_total", {"result": "stored"}) == 1)
        assert (blocker / "archive" / "task_1.mp4").read_bytes() == video_bytes(0, SIZE)
        assert not any(line.get("status", 0) >= 500 for line in gw.log_lines() if "status" in line)

    def test_rewrite_video_url(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video, tmp_path: Path
    ) -> None:
        """With rewrite_video_url, status answers point at the gateway's own content URL."""
        env = archive_env(
            (tmp_path / "a").as_uri(),
            KLING_GATEWAY_ARCHIVE_REWRITE_VIDEO_URL="true",
            KLING_GATEWAY_SERVER_PUBLIC_URL="https://videos.example.com",
        )
        gw = make_gateway(fake_upstream.url, env=env)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        answer = gw.client.get("/v1/videos/task_1").json()
        assert answer["video_url"] == "https://videos.example.com/v1/videos/task_1/content"
        assert gw.client.get("/v1/videos/task_1").json()["video_url"] == answer["video_url"]  # cached answer too

    def test_s3_archive_once_across_replicas(
        self,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        served: Video,
        s3_bucket: str,
        s3_endpoint: str,
    ) -> None:
        """Two replicas on one store and one S3 bucket: one copy, one fetch; either serves it after expiry."""
        env = archive_env(f"s3://{s3_bucket}/videos", KLING_GATEWAY_ARCHIVE_ENDPOINT_URL=s3_endpoint)
        first, second = make_gateway(fake_upstream.url, env=env), make_gateway(fake_upstream.url, env=env)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(first)
        assert first.client.get("/v1/videos/task_1").status_code == 200

        def stored() -> float:
            return sum(gw.metric("kling_gateway_archive_total", {"result": "stored"}) for gw in (first, second))

        wait_for(lambda: stored() == 1)
        time.sleep(0.3)
        assert stored() == 1
        assert fake_upstream.calls("GET", "/files/task_1.mp4") == 1
        served.expired = True
        response = second.client.get(content("task_1"), headers={"Range": "bytes=-1000"})
        assert (response.status_code, response.content) == (206, video_bytes(SIZE - 1000, SIZE))
        assert second.metric("kling_gateway_content_bytes_total", {"source": "archive"}) == 1000


class TestSandbox:
    def test_sandbox_video_through_the_gateway(self, sandbox_server: Any, make_gateway: GatewayFactory) -> None:
        """Against the sandbox, a completed task's video downloads through the gateway, whole and by range."""
        from gateway.sandbox import mp4_bytes

        gw = make_gateway(sandbox_server.url, upstream_key=sandbox_server.api_key)
        task_id = submit(gw)
        assert gw.client.get(content(task_id)).status_code == 409
        wait_for(lambda: gw.client.get(f"/v1/videos/{task_id}").json()["status"] == "completed")
        expected = mp4_bytes(5)
        assert gw.client.get(content(task_id)).content == expected
        part = gw.client.get(content(task_id), headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content) == (206, expected[10:20])


class TestArchiveFallback:
    def test_missing_copy_falls_back_to_the_upstream(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video, tmp_path: Path
    ) -> None:
        """A recorded copy that has gone missing from the archive: the upstream's URL serves instead, no 500."""
        folder = tmp_path / "archive"
        gw = make_gateway(fake_upstream.url, env=archive_env(folder.as_uri()))
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        assert gw.client.get("/v1/videos/task_1").status_code == 200
        wait_for(lambda: gw.metric("kling_gateway_archive_total", {"result": "stored"}) == 1)
        (folder / "task_1.mp4").unlink()
        response = gw.client.get(content("task_1"))
        assert (response.status_code, response.content) == (200, video_bytes(0, SIZE))
        assert gw.metric("kling_gateway_content_bytes_total", {"source": "upstream"}) == SIZE
        assert any(line.get("event") == "archive_read_failed" for line in gw.log_lines())
        assert "sk-test-upstream" not in gw.logs.getvalue()


class TestAccounts:
    def test_video_fetched_with_the_key_of_the_tasks_account(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, served: Video
    ) -> None:
        """With several upstream accounts, the video is fetched with the key of the account that created the task."""
        env = {
            "UNIALL_API_KEY": "",
            "UNIALL_API_KEYS": "first=sk-first-account,second=sk-second-account",
            # Only "second" serves the std models, so the task is bound to it.
            "KLING_GATEWAY_UPSTREAM_ACCOUNTS": '{"first": {"models": ["kling-v3-pro-*"]}}',
        }
        gw = make_gateway(fake_upstream.url, env=env)
        script_task(fake_upstream, "task_1", f"{fake_upstream.url}/files/task_1.mp4")
        submit(gw)
        assert fake_upstream.requests_to("POST", SUBMIT)[0].header("authorization") == "Bearer sk-second-account"
        assert gw.client.get(content("task_1")).status_code == 200
        (fetch,) = fake_upstream.requests_to("GET", "/files/task_1.mp4")
        assert fetch.header("authorization") == "Bearer sk-second-account"
