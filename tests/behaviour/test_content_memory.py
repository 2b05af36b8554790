"""Bytes stream through in constant memory: a large video through a real gateway server barely moves the RSS.

The gateway runs under uvicorn on loopback, the fake origin in its own thread, both in this test process, so the
process's RSS covers them all; the client reads with a streaming httpx client and drops what it reads.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from support.upstream_fake import FakeUpstream, ServerThread, json, video

from gateway.app import create_app
from gateway.config import load_settings

SIZE = 160 * 1024 * 1024


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_large_video_streams_in_constant_memory(tmp_path: Path) -> None:
    """160 MiB through the gateway: the process's RSS rises by a few MiB at most, and every byte arrives."""
    with FakeUpstream() as fake:
        fake.script("POST", "/v1/video/generations", json(200, {"id": "task_big", "status": "queued"}))
        body = {"id": "task_big", "status": "completed", "video_url": f"{fake.url}/files/big.mp4"}
        fake.always("GET", "/v1/videos/task_big", json(200, body))
        fake.always("*", "/files/", video(SIZE))
        env = {
            "UNIALL_BASE_URL": fake.url,
            "UNIALL_API_KEY": "sk-test",
            "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp_path),
            "KLING_GATEWAY_AUTH_MODE": "open",
            "KLING_GATEWAY_SETTLER_ENABLED": "false",
            "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
        }
        app = create_app(load_settings(env=env), registry=CollectorRegistry(), log_stream=io.StringIO())
        with ServerThread(app, lifespan="on") as server, httpx.Client(base_url=server.url, timeout=30) as client:
            submitted = {"model": "kling-v3-std-silent", "prompt": "a fox", "duration": 5}
            assert client.post("/v1/video/generations", json=submitted).status_code == 200
            warm = client.get("/v1/videos/task_big/content", headers={"Range": "bytes=0-1048575"})
            assert warm.status_code == 206  # every code path loaded before measuring
            before = peak = rss_mib()
            received = 0
            with client.stream("GET", "/v1/videos/task_big/content") as response:
                assert response.status_code == 200
                for chunk in response.iter_raw(1024 * 1024):
                    received += len(chunk)
                    peak = max(peak, rss_mib())
    assert received == SIZE
    assert peak - before < 24, f"RSS rose {peak - before:.1f} MiB streaming {SIZE >> 20} MiB"
