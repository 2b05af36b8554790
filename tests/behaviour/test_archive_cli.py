"""``kling-gateway archive backfill`` / ``archive status``, and the archive settings check-config rejects."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from support.records import std_task
from support.upstream_fake import FakeUpstream, video, video_bytes

from gateway.cli.archive import archive_reachable
from gateway.cli.main import main
from gateway.config import load_settings
from gateway.store import open_store

T0 = 1_767_225_600.0


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("KLING_GATEWAY_") or name.startswith("UNIALL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UNIALL_API_KEY", "sk-cli-test")
    return tmp_path


def completed_task(task_id: str, video_url: str, at: float) -> None:
    async def write() -> None:
        store = await open_store(load_settings().store_url)
        try:
            task = std_task(task_id, "team", at, request_id="r")
            await store.resolve_intent(f"i-{task_id}", task)
            body = orjson.dumps({"id": task_id, "status": "completed", "video_url": video_url})
            await store.settle(task_id, "completed", Decimal(5), Decimal("0.42"), body, at)
        finally:
            await store.close()

    asyncio.run(write())


class TestBackfill:
    def test_backfill_archives_older_tasks_then_status_counts_them(
        self, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Tasks completed before the archive was on are copied once; status shows counts and bytes."""
        with FakeUpstream() as fake:
            fake.always("*", "/files/", video(4096))
            monkeypatch.setenv("UNIALL_BASE_URL", fake.url)
            completed_task("old_1", f"{fake.url}/files/old_1.mp4", T0)
            completed_task("old_2", f"{fake.url}/files/old_2.mp4", T0 + 86400 * 30)
            folder = data_env / "archive"
            monkeypatch.setenv("KLING_GATEWAY_ARCHIVE_URL", folder.as_uri())
            assert main(["archive", "backfill", "--since", "2026-01-15"]) == 0
            assert "archived 1 videos" in capsys.readouterr().out
            assert main(["archive", "backfill"]) == 0
            assert "archived 1 videos" in capsys.readouterr().out
            assert main(["archive", "backfill"]) == 0  # nothing left: nothing fetched again
            assert "archived 0 videos" in capsys.readouterr().out
            assert fake.calls("GET", "/files/old_1.mp4") == 1
            assert fake.requests[0].header("authorization") == "Bearer sk-cli-test"
        assert (folder / "old_1.mp4").read_bytes() == video_bytes(0, 4096)
        assert main(["archive", "status", "--format", "json"]) == 0
        states = {row["state"]: row for row in orjson.loads(capsys.readouterr().out)["states"]}
        assert (states["stored"]["tasks"], states["stored"]["bytes"]) == (2, 8192)
        assert main(["archive", "status"]) == 0
        assert "stored" in capsys.readouterr().out

    def test_backfill_failure_exits_1(
        self, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An expired URL: the attempt fails, is recorded for a retry, and the command exits 1."""
        with FakeUpstream() as fake:
            fake.always("*", "/files/", video(10, expired=True))
            monkeypatch.setenv("UNIALL_BASE_URL", fake.url)
            completed_task("gone", f"{fake.url}/files/gone.mp4", T0)
            monkeypatch.setenv("KLING_GATEWAY_ARCHIVE_URL", (data_env / "archive").as_uri())
            assert main(["archive", "backfill"]) == 1
        assert "1 attempts failed" in capsys.readouterr().out

    def test_backfill_without_archive_is_a_config_error(
        self, data_env: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["archive", "backfill"]) == 2
        assert "archive.url" in capsys.readouterr().err


class TestNoStore:
    @pytest.mark.parametrize("argv", [["archive", "status"], ["archive", "status", "--format", "json"]])
    def test_status_never_creates_a_store(
        self, data_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        assert main(argv) == 2
        assert f"no store at {data_env / 'data' / 'gateway.db'}" in capsys.readouterr().err
        assert not (data_env / "data").exists()

    def test_backfill_refuses_a_store_that_does_not_exist(
        self, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("KLING_GATEWAY_ARCHIVE_URL", (data_env / "archive").as_uri())
        assert main(["archive", "backfill"]) == 2
        assert f"no store at {data_env / 'data' / 'gateway.db'}" in capsys.readouterr().err
        assert not (data_env / "data").exists()
        assert not (data_env / "archive").exists()


class TestCheckConfig:
    @pytest.mark.parametrize(
        ("name", "value", "message"),
        [
            ("KLING_GATEWAY_ARCHIVE_URL", "ftp://host/x", "archive.url: scheme must be file or s3"),
            ("KLING_GATEWAY_ARCHIVE_URL", "file://relative/path", "archive.url: a file URL needs an absolute"),
            ("KLING_GATEWAY_ARCHIVE_URL", "s3:///prefix", "archive.url: no bucket"),
            ("KLING_GATEWAY_ARCHIVE_ENDPOINT_URL", "tcp://s3", "archive.endpoint_url"),
            ("KLING_GATEWAY_ARCHIVE_CONCURRENCY", "0", "archive.concurrency"),
            ("KLING_GATEWAY_ARCHIVE_KEEP_DAYS", "-1", "archive.keep_days"),
            ("KLING_GATEWAY_ARCHIVE_REWRITE_VIDEO_URL", "true", "needs server.public_url"),
            ("KLING_GATEWAY_CONTENT_MAX_BYTES", "0", "content.max_bytes"),
            ("KLING_GATEWAY_CONTENT_READ_TIMEOUT_S", "0", "content.read_timeout_s"),
            ("KLING_GATEWAY_SERVER_PUBLIC_URL", "videos.example.com", "server.public_url"),
        ],
    )
    def test_bad_archive_settings_stop_check_config(
        self,
        data_env: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        name: str,
        value: str,
        message: str,
    ) -> None:
        monkeypatch.setenv(name, value)
        assert main(["check-config"]) == 2
        assert message in capsys.readouterr().err

    def test_summary_names_the_archive(
        self, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-config's one line says where videos are archived, or that the archive is off."""
        assert main(["check-config"]) == 0
        assert ", archive off, " in capsys.readouterr().out
        monkeypatch.setenv("KLING_GATEWAY_ARCHIVE_URL", "s3://videos/kling")
        assert main(["check-config"]) == 0
        assert ", archive s3://videos/kling, " in capsys.readouterr().out

    def test_archive_reachability(self, data_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The reachability check check-config --connect runs: a writable folder passes, a file in the way not."""
        assert asyncio.run(archive_reachable(load_settings())) is None  # off
        monkeypatch.setenv("KLING_GATEWAY_ARCHIVE_URL", (data_env / "ok").as_uri())
        assert asyncio.run(archive_reachable(load_settings())) is None
        (data_env / "blocked").write_text("x")
        monkeypatch.setenv("KLING_GATEWAY_ARCHIVE_URL", (data_env / "blocked" / "a").as_uri())
        problem = asyncio.run(archive_reachable(load_settings()))
        assert problem is not None and "file archive" in problem
