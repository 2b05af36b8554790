"""Real ``kling-gateway serve`` processes for end-to-end suites: a free port, a clean environment, start, wait, stop.

env = gateway_env(UNIALL_BASE_URL=upstream.url, UNIALL_API_KEY=key)
process = start_gateway(env, port=free_port(), data_dir=tmp_path / "data")
wait_for(f"http://127.0.0.1:{port}/healthz")
...
stop(process)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

CLI = [sys.executable, "-m", "gateway"]
#: Variables of the test's own environment a started gateway must not inherit (they would configure it).
_OWN_SETTINGS = ("KLING_GATEWAY_", "UNIALL_", "PROMETHEUS_")


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_env(**settings: str) -> dict[str, str]:
    """This process's environment without any gateway, upstream or Prometheus setting, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_SETTINGS)}
    env.update(settings)
    return env


def start_gateway(
    env: dict[str, str], *, port: int, data_dir: Path, log: IO[Any] | None = None
) -> subprocess.Popen[bytes]:
    """``kling-gateway serve`` on loopback ``port`` with ``data_dir``, configured by ``env`` (see ``gateway_env``).

    Its output goes to ``log`` (both streams), or without one its log lines are dropped and its standard error
    is the test's. Returns at once: ``wait_for`` its ``/healthz``."""
    env = {**env, "KLING_GATEWAY_SERVER_PORT": str(port), "KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir)}
    if log is None:
        return subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.DEVNULL)
    return subprocess.Popen([*CLI, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(url: str, within_s: float = 20.0) -> None:
    """Until ``url`` answers 200 (an AssertionError after ``within_s``)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
