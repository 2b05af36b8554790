"""The Dockerfile, run without a container engine: its exact ENTRYPOINT/CMD and HEALTHCHECK against this checkout.

No Docker daemon runs here, so the image is never built. What the image would run is parsed from the Dockerfile and
run as a local process with the image's environment (bar the listen host, kept on loopback); the dependency pins it
installs from (constraints.txt) are checked against pyproject.toml and the installed runtime closure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.paths import REPO_ROOT
from support.processes import free_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
CONSTRAINTS = REPO_ROOT / "constraints.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    parsed = []
    for line in joined:
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            parsed.append((word.upper(), rest.strip()))
    return parsed


def exec_form(instruction: str) -> list[str]:
    """The JSON (exec) form of the one ``instruction`` in the Dockerfile."""
    (arguments,) = [rest for word, rest in instructions() if word == instruction]
    if instruction == "HEALTHCHECK":
        arguments = arguments[arguments.index("CMD ") + len("CMD ") :]
    command: list[str] = json.loads(arguments)
    return command


def image_env() -> dict[str, str]:
    """The ENV the image sets."""
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def local(command: list[str]) -> list[str]:
    """The image's command on this machine: its ``python`` and console scripts are this venv's."""
    program = command[0]
    path = sys.executable if program == "python" else str(Path(sys.executable).parent / program)
    return [path, *command[1:]]


def clean_env(*layers: dict[str, str]) -> dict[str, str]:
    """This machine's environment without any gateway setting, then ``layers`` in order."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_", "PROMETHEUS_"))}
    for layer in layers:
        env.update(layer)
    return env


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(local(exec_form("HEALTHCHECK")), env=env, capture_output=True, text=True, timeout=10)


def wait_healthy(base: str, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} never became healthy")


@pytest.fixture
def image_process(tmp_path: Path, sandbox_server: Any) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """The Dockerfile's ENTRYPOINT + CMD as a process, with the image's ENV; the port comes from the environment."""
    port = free_port()
    env = clean_env(
        image_env(),
        {
            "KLING_GATEWAY_SERVER_HOST": "127.0.0.1",  # the image says 0.0.0.0; tests stay on loopback
            "KLING_GATEWAY_SERVER_PORT": str(port),
            "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp_path / "data"),
            "UNIALL_API_KEY": sandbox_server.api_key,
            "UNIALL_BASE_URL": sandbox_server.url,
        },
    )
    command = local(exec_form("ENTRYPOINT") + exec_form("CMD"))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        yield process, env
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


class TestEntrypoint:
    def test_command_is_the_gateway(self) -> None:
        """ENTRYPOINT is the console script and CMD its ``serve``, so ``docker run IMAGE keys ...`` works too."""
        assert exec_form("ENTRYPOINT") == ["kling-gateway"]
        assert exec_form("CMD") == ["serve"]

    def test_command_serves_healthcheck_passes_sigterm_stops(
        self, tmp_path: Path, image_process: tuple[subprocess.Popen[str], dict[str, str]]
    ) -> None:
        """The exact ENTRYPOINT + CMD answers /healthz and /readyz; the HEALTHCHECK command, with the container's
        environment (host 0.0.0.0 as in the image), passes on the port from the environment and on one from
        $KLING_GATEWAY_CONFIG; SIGTERM (docker stop) ends the gateway cleanly (one process for all: it is slow)."""
        process, env = image_process
        base = f"http://127.0.0.1:{env['KLING_GATEWAY_SERVER_PORT']}"
        assert httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        container_env = {**env, "KLING_GATEWAY_SERVER_HOST": "0.0.0.0"}
        result = healthcheck(container_env)
        assert result.returncode == 0, result.stderr
        config = tmp_path / "gateway.toml"
        config.write_text(f"[server]\nport = {env['KLING_GATEWAY_SERVER_PORT']}\n", encoding="utf-8")
        from_file = {k: v for k, v in container_env.items() if k != "KLING_GATEWAY_SERVER_PORT"}
        result = healthcheck({**from_file, "KLING_GATEWAY_CONFIG": str(config)})
        assert result.returncode == 0, result.stderr
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
        # uvicorn finishes in-flight work, closes, then re-raises the signal: a clean stop, as Docker expects.
        assert process.returncode in (0, -signal.SIGTERM), err
        assert '"event":"shutdown"' in out
        assert healthcheck(container_env).returncode != 0


class TestHealthcheck:
    def test_fails_when_nothing_answers(self, tmp_path: Path) -> None:
        """On a port where no gateway listens the check fails (non-zero), as Docker needs to mark it unhealthy."""
        port = str(free_port())
        env = clean_env(
            image_env(), {"KLING_GATEWAY_SERVER_PORT": port, "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp_path)}
        )
        assert healthcheck(env).returncode != 0

    def test_not_hard_coded(self) -> None:
        """The check names no port of its own: it reads the gateway's settings."""
        command = " ".join(exec_form("HEALTHCHECK"))
        assert "load_settings" in command
        assert not re.search(r":\d{2,5}/", command)


def _load_freezer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("freeze_constraints", REPO_ROOT / "deploy" / "freeze_constraints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            found[canonicalize_name(name)] = version.strip()
    return found


class TestImageContents:
    def test_installs_from_the_constraints(self) -> None:
        """The image copies constraints.txt and pip installs the project under it."""
        copies = [rest for word, rest in instructions() if word == "COPY"]
        assert any("constraints.txt" in rest for rest in copies)
        (run,) = [rest for word, rest in instructions() if word == "RUN" and "pip install" in rest]
        assert re.search(r"pip install .*-c constraints\.txt .*'\.\[scale,archive,otel\]'", run)

    def test_no_volume(self) -> None:
        """No VOLUME: replicas keep no state in the container (an anonymous volume per replica would mislead)."""
        assert [word for word, _ in instructions() if word == "VOLUME"] == []

    def test_pins_cover_the_runtime_closure(self) -> None:
        """Every package kling-gateway[scale,archive,otel] needs (as installed here) has an exact pin."""
        needed = set(_load_freezer().runtime_closure())
        assert needed - set(pins()) == set()

    def test_pins_satisfy_pyproject(self) -> None:
        """Each pinned direct dependency is within the range pyproject.toml asks for."""
        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        pinned = pins()
        extras = project["optional-dependencies"]
        for line in [*project["dependencies"], *extras["scale"], *extras["archive"], *extras["otel"]]:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            name = canonicalize_name(requirement.name)
            assert name in pinned, name
            assert requirement.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
