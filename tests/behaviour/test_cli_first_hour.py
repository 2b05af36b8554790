"""The CLI as a newcomer meets it: a second ``serve --sandbox`` on a busy port, the dev key across restarts,
read-only commands that never create a store, and the store named when it is not the default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.processes import free_port

from gateway.cli.main import main

CLI = [sys.executable, "-m", "gateway"]


def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env["KLING_GATEWAY_SERVER_DATA_DIR"] = str(data_dir)
    return env


class Sandbox:
    """One ``serve --sandbox`` process: its printed lines and dev key."""

    def __init__(self, port: int, data_dir: Path, *extra: str) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [*CLI, "serve", "--sandbox", "--port", str(port), *extra],
            env=clean_env(data_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []

    def dev_key(self) -> str:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            assert line, f"serve --sandbox exited early: {''.join(self.lines)}"
            self.lines.append(line)
            if line.strip().startswith("dev key"):
                return line.split(":", 1)[1].strip()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("never became healthy")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def sandboxes() -> Iterator[list[Sandbox]]:
    started: list[Sandbox] = []
    yield started
    for sandbox in started:
        sandbox.stop()


def tasks_status(port: int, key: str) -> int:
    return httpx.get(
        f"http://127.0.0.1:{port}/gateway/tasks", headers={"Authorization": f"Bearer {key}"}, timeout=5
    ).status_code


class TestSandboxStartUp:
    def test_a_second_sandbox_on_a_busy_port_fails_first_and_leaves_the_dev_key_alone(
        self, tmp_path: Path, sandboxes: list[Sandbox]
    ) -> None:
        port = free_port()
        first = Sandbox(port, tmp_path / "data")
        sandboxes.append(first)
        key = first.dev_key()
        first.wait_healthy()

        second = subprocess.run(
            [*CLI, "serve", "--sandbox", "--port", str(port)],
            env=clean_env(tmp_path / "data"),
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert second.returncode == 1
        assert "dev key" not in second.stdout and "base URL" not in second.stdout
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert tasks_status(port, key) == 200

    def test_the_dev_key_survives_a_restart_and_new_dev_key_replaces_it(
        self, tmp_path: Path, sandboxes: list[Sandbox]
    ) -> None:
        port = free_port()
        first = Sandbox(port, tmp_path / "data")
        sandboxes.append(first)
        key = first.dev_key()
        first.stop()

        again = Sandbox(port, tmp_path / "data")
        sandboxes.append(again)
        assert again.dev_key() == key
        again.wait_healthy()
        assert tasks_status(port, key) == 200
        again.stop()

        renewed = Sandbox(port, tmp_path / "data", "--new-dev-key")
        sandboxes.append(renewed)
        new_key = renewed.dev_key()
        renewed.wait_healthy()
        assert new_key != key
        assert (tasks_status(port, new_key), tasks_status(port, key)) == (200, 401)


@pytest.fixture
def in_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment (no gateway settings) and the working directory an empty folder."""
    for name in list(os.environ):
        if name.startswith(("KLING_GATEWAY_", "UNIALL_")):
            monkeypatch.delenv(name)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


class TestStores:
    @pytest.mark.parametrize(
        "argv", [["keys", "list"], ["usage"], ["keys", "list", "--format", "json"], ["audit"], ["archive", "status"]]
    )
    def test_read_only_commands_never_create_a_store(
        self, in_folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"no store at {in_folder / 'data' / 'gateway.db'}" in err
        assert "KLING_GATEWAY_SERVER_DATA_DIR" in err
        assert not (in_folder / "data").exists()

    def test_accounts_shows_the_settings_without_creating_a_store(
        self, in_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("UNIALL_API_KEY", "sk-x")
        assert main(["accounts"]) == 0
        assert "no store at" in capsys.readouterr().err
        assert not (in_folder / "data").exists()

    def test_a_store_other_than_the_default_is_named(
        self, in_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(in_folder / "team-data"))
        assert main(["keys", "create", "team"]) == 0
        assert f"created a new store at sqlite:///{in_folder / 'team-data' / 'gateway.db'}" in capsys.readouterr().err
        assert main(["keys", "list"]) == 0
        assert f"store sqlite:///{in_folder / 'team-data' / 'gateway.db'}" in capsys.readouterr().err


class TestKeysUpdateAndList:
    def test_update_then_list_in_every_format(self, in_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["keys", "create", "team", "--monthly-budget", "10"]) == 0
        assert (
            main(["keys", "update", "team", "--models", "kling-v3-std-*", "--rpm", "30", "--monthly-budget", "25"]) == 0
        )
        assert "updated key 'team'" in capsys.readouterr().out
        assert main(["keys", "list", "--format", "json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["data"]
        assert (row["models"], row["rpm"], row["monthly_budget_usd"], row["spent_usd"], row["remaining_usd"]) == (
            ["kling-v3-std-*"],
            30,
            "25",
            "0.0000",
            "25.0000",
        )
        assert main(["keys", "list", "--format", "csv"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split(",")[-3:] == ["spent_usd", "remaining_usd", "created_at"]
        assert main(["keys", "update", "team", "--rpm", "none"]) == 0
        capsys.readouterr()
        assert main(["keys", "list"]) == 0
        assert "remaining_usd" in capsys.readouterr().out

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["keys", "update", "team"], "nothing to change"),
            (["keys", "update", "team", "--rpm", "fast"], "--rpm: not a whole number"),
            (["keys", "update", "team", "--models", "kling-v9-*"], "matches no model"),
            (["keys", "update", "nobody", "--rpm", "5"], "no key named 'nobody'"),
        ],
    )
    def test_update_refusals(
        self, in_folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
    ) -> None:
        assert main(["keys", "create", "team"]) == 0
        capsys.readouterr()
        assert main(argv) == 1
        assert message in capsys.readouterr().err

    def test_a_revoked_name_says_it_is_revoked(self, in_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["keys", "create", "team"]) == 0
        assert main(["keys", "revoke", "team"]) == 0
        capsys.readouterr()
        assert main(["keys", "create", "team"]) == 1
        assert "was revoked" in capsys.readouterr().err


class TestCheckConfig:
    def test_a_postgres_url_is_shown_with_its_scheme_and_no_password(
        self, in_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("UNIALL_API_KEY", "sk-x")
        monkeypatch.setenv("KLING_GATEWAY_STORE_URL", "postgresql://gw:s3cret-pw@db.internal:5432/gw")
        assert main(["check-config"]) == 0
        out = capsys.readouterr().out
        assert "store postgresql://gw:***@db.internal:5432/gw" in out and "s3cret-pw" not in out

    def test_a_misspelt_environment_variable_is_not_ok(
        self, in_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("UNIALL_API_KEY", "sk-x")
        monkeypatch.setenv("KLING_GATEWAY_SERVER_PROT", "1")
        assert main(["check-config"]) == 2
        assert "did you mean 'KLING_GATEWAY_SERVER_PORT'" in capsys.readouterr().err
