"""The CLI as a newcomer meets it: a second ``serve --sandbox`` on a busy port, the dev key across restarts,
read-only commands that never create a store, and the store named when it is not the default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "gateway"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
