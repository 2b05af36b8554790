"""Every client example in examples/ runs against a gateway + sandbox on loopback, for each of the seed's three modes.

Each example is run as a user runs it (a subprocess, configured only by KLING_GATEWAY_URL / KLING_GATEWAY_KEY); the
test checks what it printed, that the gateway received an authenticated submission with an Idempotency-Key, and that
the upstream received exactly the seed page's body for that mode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loopback import Stack, serve_stack
from support.paths import REPO_ROOT
from support.seed_examples import SEEDS

EXAMPLES = REPO_ROOT / "examples"
NODE = shutil.which("node")

COMMANDS: dict[str, list[str]] = {
    "curl.sh": ["bash", str(EXAMPLES / "curl.sh")],
    "python_httpx_sync.py": [sys.executable, str(EXAMPLES / "python_httpx_sync.py")],
    "python_httpx_async.py": [sys.executable, str(EXAMPLES / "python_httpx_async.py")],
    "openai_sdk.py": [sys.executable, str(EXAMPLES / "openai_sdk.py")],
    "fetch.mjs": [NODE or "node", str(EXAMPLES / "fetch.mjs")],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway + sandbox for the module; each test looks only at the requests its example added."""
    with serve_stack(tmp_path_factory.mktemp("examples")) as served:
        yield served


def test_every_example_is_covered() -> None:
    """Every runnable file in examples/ is exercised below (a new example needs a row here)."""
    runnable = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".py", ".mjs")}
    assert runnable == set(COMMANDS)


@pytest.mark.parametrize("mode", list(SEEDS))
@pytest.mark.parametrize("example", list(COMMANDS))
def test_example_runs_to_completed(stack: Stack, example: str, mode: str) -> None:
    """The example submits the seed's body for the mode and prints the task id and the final status."""
    if example == "fetch.mjs" and NODE is None:
        pytest.skip("node is not installed: the fetch example needs Node 18 or later")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env.update(KLING_GATEWAY_URL=stack.url, KLING_GATEWAY_KEY=stack.key, KLING_POLL_INTERVAL_S="0.5")
    gateway_seen, upstream_seen = len(stack.gateway.requests), len(stack.upstream.requests)

    done = subprocess.run(
        [*COMMANDS[example], mode], env=env, capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT
    )

    assert done.returncode == 0, done.stderr
    task_id = re.search(r"^task_id: (task_\w+)$", done.stdout, re.MULTILINE)
    assert task_id, done.stdout
    assert re.search(r"^status: completed$", done.stdout, re.MULTILINE), done.stdout
    assert "video_url: http://127.0.0.1:" in done.stdout
    (submitted,) = [r for r in stack.gateway.requests[gateway_seen:] if r.method == "POST"]
    assert submitted.headers["authorization"] == f"Bearer {stack.key}"
    assert submitted.headers.get("idempotency-key")
    (forwarded,) = [r for r in stack.upstream.requests[upstream_seen:] if r.method == "POST"]
    assert forwarded.json() == SEEDS[mode]
    polls = [r for r in stack.gateway.requests[gateway_seen:] if r.path == f"/v1/videos/{task_id.group(1)}"]
    assert polls and all(r.method == "GET" for r in polls)


def test_invalid_request_shows_the_gateways_problems(stack: Stack, tmp_path: Path) -> None:
    """An example's error path prints the gateway's message and each problem (here: a key the gateway refuses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_GATEWAY_", "UNIALL_"))}
    env.update(KLING_GATEWAY_URL=stack.url, KLING_GATEWAY_KEY="gk_wrong")
    done = subprocess.run(
        COMMANDS["python_httpx_sync.py"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "HTTP 401 invalid_api_key" in done.stderr
