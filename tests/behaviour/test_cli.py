"""The command line: validate, check-config, keys, usage, and the real processes (serve --sandbox, --workers).

The Dockerfile's ENTRYPOINT/CMD and HEALTHCHECK are run in test_deploy_docker.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from support.paths import REPO_ROOT
from support.processes import free_port
from support.seed_examples import SEED_PAGE, SEEDS, bodies_in_page

from gateway.cli.main import main

ROOT = REPO_ROOT
CLI = [sys.executable, "-m", "gateway"]


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run CLI commands against a fresh data dir, with no configuration from the caller's environment."""
    for name in list(os.environ):
        if name.startswith("KLING_GATEWAY_") or name.startswith("UNIALL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


class TestSeedPage:
    @pytest.mark.skipif(not SEED_PAGE.exists(), reason="shared/seeds is not beside this checkout")
    def test_seed_page_unchanged(self) -> None:
        """The examples the tests use are exactly the ones on the upstream page."""
        assert bodies_in_page(SEED_PAGE.read_text()) == list(SEEDS.values())


class TestValidateCommand:
    @pytest.mark.parametrize("name", list(SEEDS))
    def test_seed_examples_valid(self, data_env: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Each seed example validates (exit 0) and comes back unchanged as normalized."""
        path = data_env / "body.json"
        path.write_bytes(orjson.dumps(SEEDS[name]))
        assert main(["validate", str(path)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["valid"] is True and report["normalized"] == SEEDS[name]

    def test_invalid_exit_1_with_errors(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An invalid body exits 1 and prints every problem as JSON."""
        path = data_env / "body.json"
        path.write_text('{"model": "kling-v3-std-silent", "duration": 99}')
        assert main(["validate", str(path)]) == 1
        codes = {e["code"] for e in json.loads(capsys.readouterr().out)["errors"]}
        assert codes == {"missing_field", "duration_out_of_range"}

    def test_stdin_and_unparseable(self, data_env: Path) -> None:
        """'-' reads standard input; text that is not JSON is invalid (exit 1, invalid_json)."""
        done = subprocess.run([*CLI, "validate", "-"], input=b"{nope", capture_output=True, check=False)
        assert done.returncode == 1
        assert json.loads(done.stdout)["errors"][0]["code"] == "invalid_json"

    def test_missing_file_exit_2(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A file that cannot be read is a usage error (exit 2) with a message."""
        assert main(["validate", str(data_env / "nope.json")]) == 2
        assert "cannot read" in capsys.readouterr().err


class TestCheckConfig:
    def test_ok(self, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """A complete configuration passes and the summary shows no secret."""
        monkeypatch.setenv("UNIALL_API_KEY", "sk-canary-check-config")
        assert main(["check-config", "--config", str(ROOT / "config" / "gateway.toml")]) == 0
        out = capsys.readouterr().out
        assert out.startswith("configuration ok:") and "canary" not in out

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({}, "UNIALL_API_KEY: not set"),
            ({"UNIALL_API_KEY": "k", "KLING_GATEWAY_SERVER_PORT": "eighty"}, "server.port: expected an integer"),
            ({"UNIALL_API_KEY": "k", "UNIALL_BASE_URL": "gopher://x"}, "upstream.base_url: scheme must be"),
            (
                {"UNIALL_API_KEY": "k", "KLING_GATEWAY_ADMIN_TOKEN": "admin"},
                "KLING_GATEWAY_ADMIN_TOKEN: must be at least 32",
            ),
        ],
    )
    def test_bad_config_one_line(
        self,
        data_env: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        env: dict[str, str],
        message: str,
    ) -> None:
        """A missing or malformed setting exits 2 with one line naming it."""
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["check-config"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


class TestKeysCommand:
    def test_create_list_rotate_revoke(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Keys are created (secret printed once), listed without secrets, rotated and revoked."""
        assert (
            main(["keys", "create", "team-a", "--models", "kling-v3-std-*", "--rpm", "60", "--monthly-budget", "25"])
            == 0
        )
        secret = capsys.readouterr().out.strip().splitlines()[-1]
        assert re.fullmatch(r"gk_[A-Za-z0-9_\-]+", secret)
        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert "team-a" in listing and "kling-v3-std-*" in listing and secret not in listing
        assert main(["keys", "rotate", "team-a", "--grace-s", "60"]) == 0
        rotated = capsys.readouterr().out.strip().splitlines()[-1]
        assert rotated != secret and rotated.startswith("gk_")
        assert main(["keys", "revoke", "team-a"]) == 0
        capsys.readouterr()
        assert main(["keys", "list"]) == 0
        assert "revoked" in capsys.readouterr().out

    def test_list_lines_have_no_trailing_spaces(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Short values in the last columns are not padded out to the header's width."""
        assert main(["keys", "create", "a-much-longer-key-name", "--rpm", "60"]) == 0
        assert main(["keys", "create", "b"]) == 0
        capsys.readouterr()
        assert main(["keys", "list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3 and [line for line in lines if line != line.rstrip()] == []

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["keys", "revoke", "ghost"], "no key named 'ghost'"),
            (["keys", "rotate", "ghost"], "no key named 'ghost'"),
            (["keys", "create", "bad name"], "name"),
            (["keys", "create", "x", "--monthly-budget", "lots"], "--monthly-budget"),
            (["keys", "create", "x", "--rpm", "0"], "rpm"),
        ],
    )
    def test_errors(self, data_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
        """Unknown keys and bad options exit 1 with a message."""
        assert main(argv) == 1
        assert message in capsys.readouterr().err

    def test_duplicate(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Creating a key twice is refused."""
        assert main(["keys", "create", "team-a"]) == 0
        assert main(["keys", "create", "team-a"]) == 1
        assert "exists already" in capsys.readouterr().err


class TestScaleOutBackends:
    def test_keys_and_usage_on_postgresql(
        self,
        data_env: Path,
        postgres_schema_url: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The CLI works on the shared PostgreSQL store exactly as on the SQLite file."""
        monkeypatch.setenv("KLING_GATEWAY_STORE_URL", postgres_schema_url)
        assert main(["keys", "create", "team-pg", "--rpm", "60"]) == 0
        capsys.readouterr()
        assert main(["keys", "list"]) == 0
        assert "team-pg" in capsys.readouterr().out
        assert main(["usage", "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["rows"] == []
        assert not (data_env / "data" / "gateway.db").exists()

    @pytest.mark.parametrize(
        ("env", "argv", "message"),
        [
            (
                {"KLING_GATEWAY_STORE_URL": "postgresql://gw:s3cret-pw@127.0.0.1:{port}/gw"},
                ["keys", "list"],
                "kling-gateway: store unavailable: cannot connect to PostgreSQL",
            ),
            (
                {"KLING_GATEWAY_STORE_URL": "postgresql://gw:s3cret-pw@127.0.0.1:{port}/gw", "UNIALL_API_KEY": "sk-x"},
                ["serve"],
                "kling-gateway: store unavailable: cannot connect to PostgreSQL",
            ),
            (
                {"KLING_GATEWAY_CACHE_URL": "redis://:s3cret-pw@127.0.0.1:{port}/0", "UNIALL_API_KEY": "sk-x"},
                ["serve"],
                "kling-gateway: cache unavailable: cannot reach Redis at redis://:***@127.0.0.1:",
            ),
        ],
    )
    def test_a_backend_that_does_not_answer_is_one_line_and_exit_1(
        self,
        data_env: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        env: dict[str, str],
        argv: list[str],
        message: str,
    ) -> None:
        """Before serving, the store and Redis are reached once: a dead one is a clear line, never a traceback."""
        port = free_port()  # nothing listens there
        for name, value in env.items():
            monkeypatch.setenv(name, value.format(port=port))
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message)
        assert err.count("\n") == 1
        assert "s3cret-pw" not in err


class TestUsageCommand:
    @pytest.mark.parametrize("fmt", ["table", "csv", "json"])
    def test_empty_ledger(self, data_env: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
        """Every format answers on an empty ledger (of an existing store: usage never creates one)."""
        assert main(["keys", "create", "team"]) == 0
        capsys.readouterr()
        assert main(["usage", "--by", "key,model", "--format", fmt]) == 0
        assert capsys.readouterr().out

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["usage", "--by", "modle"], "did you mean 'model'"),
            (["usage", "--since", "yesterday-ish"], "--since"),
            (["usage", "--since", "2026-02-01", "--until", "2026-01-01"], "--since"),
        ],
    )
    def test_bad_options(
        self, data_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
    ) -> None:
        """Bad grouping or dates exit 1 with a message naming the flag."""
        assert main(argv) == 1
        assert message in capsys.readouterr().err


@pytest.fixture
def sandbox_gateway(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """``kling-gateway serve --sandbox`` as a user runs it; yields its base URL and printed dev key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env["KLING_GATEWAY_SERVER_DATA_DIR"] = str(tmp_path / "data")
    process = subprocess.Popen(
        [*CLI, "serve", "--sandbox", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        assert process.stdout is not None
        while not any(line.strip().startswith("dev key") for line in lines):
            line = process.stdout.readline()
            assert line, f"serve --sandbox exited early: {''.join(lines)}"
            lines.append(line)
        dev_key = next(line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("dev key"))
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield base, dev_key, process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def wait_healthy(base: str, within_s: float = 15.0, stderr_log: Path | None = None) -> None:
    """Wait for /healthz; on a time-out, say what the server wrote on stderr (if it was sent to ``stderr_log``)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    said = stderr_log.read_text(errors="replace")[-4000:] if stderr_log is not None and stderr_log.exists() else ""
    raise AssertionError(f"{base} never became healthy; its stderr ends:\n{said}")


class TestQuickStart:
    def test_seed_examples_through_sandbox_to_completed(self, sandbox_gateway: tuple[str, str, Any]) -> None:
        """The README's first command, then the seed's three curl bodies: three tasks polled to completed."""
        base, dev_key, _ = sandbox_gateway
        headers = {"Authorization": f"Bearer {dev_key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            task_ids = []
            for body in SEEDS.values():
                response = client.post("/v1/video/generations", json=body)
                assert response.status_code == 200, response.text
                task_ids.append(response.json()["task_id"])
            invalid = client.post("/v1/video/generations", json={"model": "kling-v3-pro-audio", "duration": 30})
            assert invalid.status_code == 400 and len(invalid.json()["error"]["errors"]) == 2
            deadline = time.monotonic() + 20
            statuses: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline and len(statuses) < 3:
                for task_id in task_ids:
                    answer = client.get(f"/v1/videos/{task_id}").json()
                    if answer["status"] == "completed":
                        statuses[task_id] = answer
                time.sleep(0.5)
            assert set(statuses) == set(task_ids)
            video = httpx.get(statuses[task_ids[0]]["video_url"], timeout=5)
            assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
            tasks = client.get("/gateway/tasks").json()["data"]
            assert {t["task_id"] for t in tasks} == set(task_ids)
            assert all(t["outcome"] == "completed" for t in tasks)


def _serve_env(tmp_path: Path, port: int, sandbox_server: Any, **settings: str) -> dict[str, str]:
    """The environment of a ``serve`` subprocess: none of the caller's gateway settings, the sandbox upstream."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_", "PROMETHEUS_"))}
    env.update(
        KLING_GATEWAY_SERVER_PORT=str(port),
        KLING_GATEWAY_SERVER_DATA_DIR=str(tmp_path / "data"),
        UNIALL_API_KEY=sandbox_server.api_key,
        UNIALL_BASE_URL=sandbox_server.url,
        **settings,
    )
    return env


class TestWorkers:
    def test_two_workers_share_metrics(self, tmp_path: Path, sandbox_server: Any) -> None:
        """serve --workers 2 runs in Prometheus multiprocess mode: /metrics counts every worker's requests."""
        port = free_port()
        env = _serve_env(tmp_path, port, sandbox_server)
        stderr_log = tmp_path / "serve.err"
        with stderr_log.open("wb") as stderr:
            process = subprocess.Popen(
                [*CLI, "serve", "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, within_s=45.0, stderr_log=stderr_log)
            for _ in range(40):
                with httpx.Client() as client:  # a new connection each time, so both workers get some
                    assert client.get(f"{base}/healthz").status_code == 200
            text = httpx.get(f"{base}/metrics").text
            line = next(
                row
                for row in text.splitlines()
                if row.startswith("kling_gateway_requests_total{") and "/healthz" in row
            )
            assert float(line.rsplit(" ", 1)[1]) >= 40
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)

    def test_two_workers_on_postgresql_and_redis_share_limits_and_the_cache(
        self, tmp_path: Path, sandbox_server: Any, postgres_schema_url: str, redis_url: str, redis_prefix: str
    ) -> None:
        """serve --workers 2 on the scale-out backends: one rate limit and one status cache for both workers."""
        port = free_port()
        env = _serve_env(
            tmp_path,
            port,
            sandbox_server,
            KLING_GATEWAY_STORE_URL=postgres_schema_url,
            KLING_GATEWAY_CACHE_URL=redis_url,
            KLING_GATEWAY_CACHE_KEY_PREFIX=redis_prefix,
            KLING_GATEWAY_ADMIN_TOKEN="adm-workers-0123456789abcdefghijklmn",
        )
        stderr_log = tmp_path / "serve.err"
        with stderr_log.open("wb") as stderr:
            process = subprocess.Popen(
                [*CLI, "serve", "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, within_s=45.0, stderr_log=stderr_log)
            created = httpx.post(
                f"{base}/gateway/keys",
                json={"name": "team", "rpm": 6},
                headers={"Authorization": "Bearer " + "adm-workers-0123456789abcdefghijklmn"},
            )
            headers = {"Authorization": f"Bearer {created.json()['key']}"}
            time.sleep(1.0)  # the other worker picks the key up from the store
            submitted = httpx.post(
                f"{base}/v1/video/generations",
                json={"model": "kling-v3-std-silent", "prompt": "a fox", "duration": 5},
                headers=headers,
            )
            task_id = submitted.json()["id"]
            answers = []
            for _ in range(6):
                with httpx.Client() as client:  # a new connection each time, so both workers answer
                    answers.append(client.get(f"{base}/v1/videos/{task_id}", headers=headers))

            assert submitted.status_code == 200
            assert [a.status_code for a in answers] == [200] * 5 + [429]  # 6 rpm: the submission took one
            assert [a.headers["x-cache"] for a in answers[:5]] == ["MISS"] + ["HIT"] * 4
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
