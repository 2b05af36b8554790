"""The sandbox's video files as a CDN serves them: GET, HEAD and single byte ranges (206 / 416)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import httpx
import pytest

from gateway.sandbox import SandboxOptions, byte_range, create_sandbox_app, mp4_bytes

KEY = "sk-sandbox"
AUTH = {"Authorization": f"Bearer {KEY}"}


class TestByteRange:
    @pytest.mark.parametrize(
        ("header", "size", "expected"),
        [
            (None, 100, None),
            ("", 100, None),
            ("bytes=0-9", 100, (0, 9)),
            ("bytes=0-0", 100, (0, 0)),
            ("bytes=10-", 100, (10, 99)),
            ("bytes=90-200", 100, (90, 99)),
            ("bytes=-10", 100, (90, 99)),
            ("bytes=-500", 100, (0, 99)),
            ("BYTES = 5-6", 100, (5, 6)),
            ("bytes=100-", 100, "unsatisfiable"),
            ("bytes=100-200", 100, "unsatisfiable"),
            ("bytes=-0", 100, "unsatisfiable"),
            ("bytes=0-", 0, "unsatisfiable"),
            ("bytes=9-3", 100, None),
            ("bytes=0-1,5-6", 100, None),
            ("items=0-9", 100, None),
            ("bytes=a-b", 100, None),
            ("bytes=-", 100, None),
            ("bytes=5", 100, None),
            ("bytes=1-x", 100, None),
        ],
    )
    def test_table(
        self, header: str | None, size: int, expected: tuple[int, int] | Literal["unsatisfiable"] | None
    ) -> None:
        """One row per form of the header: satisfiable, unsatisfiable, or ignored (the whole file)."""
        assert byte_range(header, size) == expected


@pytest.fixture
async def client_and_url() -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client of a fresh sandbox whose tasks complete at once, and the video_url of one completed task."""
    app = create_sandbox_app(SandboxOptions(api_key=KEY, queued_s=0, run_s=0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox.test") as client:
        task = await client.post(
            "/v1/video/generations", json={"model": "m", "prompt": "p", "duration": 7}, headers=AUTH
        )
        body = (await client.get(f"/v1/videos/{task.json()['id']}", headers=AUTH)).json()
        yield client, body["video_url"]


class TestVideoFile:
    async def test_get_whole(self, client_and_url: tuple[httpx.AsyncClient, str]) -> None:
        """GET serves the whole deterministic MP4 and says ranges are accepted."""
        client, url = client_and_url
        response = await client.get(url)
        assert response.status_code == 200
        assert response.content == mp4_bytes(7)
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["content-length"] == str(len(mp4_bytes(7)))

    async def test_head(self, client_and_url: tuple[httpx.AsyncClient, str]) -> None:
        """HEAD answers the headers of GET without a body."""
        client, url = client_and_url
        response = await client.head(url)
        assert response.status_code == 200 and response.content == b""
        assert response.headers["content-length"] == str(len(mp4_bytes(7)))
        assert response.headers["content-type"] == "video/mp4"

    async def test_range_206(self, client_and_url: tuple[httpx.AsyncClient, str]) -> None:
        """A single byte range answers 206 with exactly those bytes and Content-Range."""
        client, url = client_and_url
        data = mp4_bytes(7)
        response = await client.get(url, headers={"Range": "bytes=4-7"})
        tail = await client.get(url, headers={"Range": "bytes=-8"})
        assert response.status_code == 206 and response.content == b"ftyp" == data[4:8]
        assert response.headers["content-range"] == f"bytes 4-7/{len(data)}"
        assert tail.status_code == 206 and tail.content == data[-8:]

    async def test_range_416(self, client_and_url: tuple[httpx.AsyncClient, str]) -> None:
        """A range past the end answers 416 with the size in Content-Range."""
        client, url = client_and_url
        size = len(mp4_bytes(7))
        response = await client.get(url, headers={"Range": f"bytes={size}-"})
        assert response.status_code == 416
        assert response.headers["content-range"] == f"bytes */{size}"
