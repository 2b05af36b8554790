"""``check-config --connect`` against real loopback servers: one line per backend, exit 1 on any failure, no secret."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from support.upstream_fake import FakeUpstream, SandboxServer, dynamic, json, slow

from gateway.cli.main import main

UPSTREAM_KEY = "sk-upstream-canary-7731"
DB_PASSWORD = "pg-canary-pass"
REDIS_PASSWORD = "redis-canary-pass"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("KLING_GATEWAY_", "UNIALL_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UNIALL_API_KEY", UPSTREAM_KEY)
    return monkeypatch


def lines(out: str) -> dict[str, str]:
    """``{backend: rest of its line}`` for the per-backend lines."""
    found = {}
    for line in out.splitlines():
        name, sep, rest = line.partition(": ")
        if sep and (name in ("store", "cache", "archive", "upstream") or name.startswith("upstream ")):
            found[name] = rest
    return found


def run(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str], str]:
    status = main(["check-config", "--connect"])
    out = capsys.readouterr()
    text = out.out + out.err
    for secret in (UPSTREAM_KEY, DB_PASSWORD, REDIS_PASSWORD):
        assert secret not in text
    return status, lines(out.out), out.out


def test_all_reachable(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(404, {"error": {"code": "task_not_found"}}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    status, found, _ = run(capsys)
    assert status == 0
    assert found["store"].startswith("ok: sqlite:///")
    assert found["cache"] == "ok: memory:// (in-process, nothing to reach)"
    assert found["archive"] == "ok: off ([archive] url is not set; nothing to reach)"
    assert found["upstream"].startswith("ok: ") and "HTTP 404" in found["upstream"]
    [probe] = fake_upstream.requests
    assert probe.path.startswith("/v1/videos/kling-gateway-check-")
    assert probe.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_the_real_sandbox(
    env: pytest.MonkeyPatch, sandbox_server: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sandbox (which answers like UniAll) takes its own key and refuses another."""
    env.setenv("UNIALL_BASE_URL", sandbox_server.url)
    env.setenv("UNIALL_API_KEY", sandbox_server.api_key)
    assert main(["check-config", "--connect"]) == 0
    assert lines(capsys.readouterr().out)["upstream"].startswith("ok: ")
    env.setenv("UNIALL_API_KEY", UPSTREAM_KEY)
    status, found, _ = run(capsys)
    assert status == 1
    assert (
        found["upstream"].startswith("FAILED: ")
        and "refuses the upstream key of account 'default' (HTTP 401)" in found["upstream"]
    )


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "(HTTP 401): check UNIALL_API_KEY"), (403, "(HTTP 403): check UNIALL_API_KEY"), (500, "HTTP 500")],
)
def test_upstream_answers_wrongly(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str], status: int, reason: str
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(status, {"error": {"message": f"no {UPSTREAM_KEY}"}}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    code, found, _ = run(capsys)
    assert code == 1
    assert found["store"].startswith("ok: ") and found["upstream"].startswith("FAILED: ")
    assert reason in found["upstream"]


def test_upstream_unreachable(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env.setenv("UNIALL_BASE_URL", FakeUpstream.closed_port())
    env.setenv("KLING_GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S", "1")
    code, found, _ = run(capsys)
    assert code == 1
    assert found["upstream"].startswith("FAILED: could not connect to the upstream")


def test_upstream_silent(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", slow(5.0, json(404, {})))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    env.setenv("KLING_GATEWAY_UPSTREAM_TIMEOUT_S", "0.5")
    env.setenv("KLING_GATEWAY_UPSTREAM_READ_TIMEOUT_S", "0.5")
    code, found, _ = run(capsys)
    assert code == 1
    assert found["upstream"].startswith("FAILED: ")


def test_redis_reachable(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(404, {}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    env.setenv("KLING_GATEWAY_CACHE_URL", redis_url)
    code, found, _ = run(capsys)
    assert code == 0
    assert found["cache"].startswith("ok: Redis at ") and found["cache"].endswith("answers PING")


def test_redis_unreachable(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(404, {}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    port = FakeUpstream.closed_port().rsplit(":", 1)[1]
    env.setenv("KLING_GATEWAY_CACHE_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0")
    code, found, _ = run(capsys)
    assert code == 1
    assert found["cache"].startswith("FAILED: cannot reach Redis at redis://:***@127.0.0.1:")
    assert found["store"].startswith("ok: ") and found["upstream"].startswith("ok: ")


def test_postgres_reachable(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, postgres_schema_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(404, {}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    env.setenv("KLING_GATEWAY_STORE_URL", postgres_schema_url)
    code, found, _ = run(capsys)
    assert code == 0
    assert found["store"].startswith("ok: postgresql://")


def test_postgres_unreachable(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(404, {}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    port = FakeUpstream.closed_port().rsplit(":", 1)[1]
    env.setenv("KLING_GATEWAY_STORE_URL", f"postgresql://gw:{DB_PASSWORD}@127.0.0.1:{port}/gateway")
    code, found, _ = run(capsys)
    assert code == 1
    assert found["store"].startswith("FAILED: ")
    assert found["upstream"].startswith("ok: ")


def test_each_account_key_is_tried(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several upstream accounts: one line each, and a refused key names its account (never the key)."""

    def by_key(request: Any) -> Any:
        accepted = request.header("authorization") == f"Bearer {UPSTREAM_KEY}"
        return json(404 if accepted else 401, {"error": {"code": "task_not_found" if accepted else "invalid_api_key"}})

    fake_upstream.always("GET", "/v1/videos/", dynamic(by_key))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    env.delenv("UNIALL_API_KEY")
    env.setenv("UNIALL_API_KEYS", f"main={UPSTREAM_KEY},spare=sk-spare-canary-99")
    status = main(["check-config", "--connect"])
    out = capsys.readouterr().out
    assert status == 1 and "sk-spare-canary-99" not in out and UPSTREAM_KEY not in out
    found = lines(out)
    assert found["upstream main"].startswith("ok: ")
    assert found["upstream spare"].startswith("FAILED: ")
    assert "refuses the upstream key of account 'spare' (HTTP 401): check UNIALL_API_KEYS" in found["upstream spare"]


def test_file_archive(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_upstream.always("GET", "/v1/videos/", json(404, {}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    (tmp_path / "videos").mkdir()
    env.setenv("KLING_GATEWAY_ARCHIVE_URL", f"file://{tmp_path / 'videos'}")
    code, found, _ = run(capsys)
    assert code == 0
    assert found["archive"] == f"ok: file://{tmp_path / 'videos'}: a probe object written, read back and deleted"
    assert list((tmp_path / "videos").iterdir()) == []


def test_archive_unwritable(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An archive path under a regular file cannot be written: one FAILED line, exit 1, the rest still checked."""
    fake_upstream.always("GET", "/v1/videos/", json(404, {}))
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    (tmp_path / "a-file").write_text("not a folder")
    env.setenv("KLING_GATEWAY_ARCHIVE_URL", f"file://{tmp_path / 'a-file' / 'videos'}")
    code, found, _ = run(capsys)
    assert code == 1
    assert found["archive"].startswith("FAILED: ")
    assert found["store"].startswith("ok: ") and found["upstream"].startswith("ok: ")


def test_without_connect_nothing_is_reached(
    env: pytest.MonkeyPatch, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("UNIALL_BASE_URL", fake_upstream.url)
    assert main(["check-config"]) == 0
    assert lines(capsys.readouterr().out) == {}
    assert fake_upstream.requests == []
