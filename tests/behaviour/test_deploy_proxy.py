"""deploy/nginx.conf run by a real nginx in front of two real gateway replicas on PostgreSQL and Redis.

The compose topology without containers: the proxy configuration is the shipped one with only the replicas'
addresses and the listen address rewritten to loopback ports. nginx comes from Debian (``nginx-light``, which
``make bench`` also uses); without it the test is skipped. PostgreSQL and Redis are the local test services.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.harness import ADMIN_TOKEN
from support.paths import REPO_ROOT
from support.processes import free_port, gateway_env, start_gateway, stop, wait_for

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed (Debian package `nginx-light`)")

VALID = {"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}


def proxy_config(tmp_path: Path, listen: int, replicas: dict[str, int]) -> Path:
    """The shipped server block, replicas and listen port on loopback, inside a minimal nginx.conf."""
    server_block = (REPO_ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    for name, port in replicas.items():
        server_block, count = re.subn(rf"\b{name}:8080\b", f"127.0.0.1:{port}", server_block)
        assert count == 1, name
    server_block, count = re.subn(r"listen 8080;", f"listen 127.0.0.1:{listen};", server_block)
    assert count == 1
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
{server_block}
}}
""",
        encoding="utf-8",
    )
    return conf


@pytest.fixture
def deployment(
    tmp_path: Path, sandbox_server: Any, postgres_schema_url: str, redis_url: str, redis_prefix: str
) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]], dict[str, int]]]:
    """Two gateway replicas sharing one PostgreSQL schema and one Redis prefix, behind the shipped nginx config."""
    ports = {"gateway-1": free_port(), "gateway-2": free_port()}
    listen = free_port()
    base_env = gateway_env(
        KLING_GATEWAY_STORE_URL=postgres_schema_url,
        KLING_GATEWAY_CACHE_URL=redis_url,
        KLING_GATEWAY_CACHE_KEY_PREFIX=redis_prefix,
        KLING_GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN,
        KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS="false",
        UNIALL_API_KEY=sandbox_server.api_key,
        UNIALL_BASE_URL=sandbox_server.url,
    )
    replicas: dict[str, subprocess.Popen[bytes]] = {}
    conf = proxy_config(tmp_path, listen, ports)
    assert NGINX is not None
    checked = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    nginx: subprocess.Popen[bytes] | None = None
    try:
        for name, port in ports.items():
            replicas[name] = start_gateway(base_env, port=port, data_dir=tmp_path / name)
        for port in ports.values():
            wait_for(f"http://127.0.0.1:{port}/healthz")
        nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(conf)], stderr=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{listen}/healthz")
        yield f"http://127.0.0.1:{listen}", replicas, ports
    finally:
        if nginx is not None:
            stop(nginx)
        for process in replicas.values():
            stop(process)


def served(port: int, route: str) -> float:
    """Requests on ``route`` that replica answered, from its own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kling_gateway_requests_total{") and f'route="{route}"' in line
    )


class TestProxyInFrontOfReplicas:
    def test_balances_shares_state_hides_metrics_and_survives_a_replica(
        self, deployment: tuple[str, dict[str, subprocess.Popen[bytes]], dict[str, int]]
    ) -> None:
        """nginx accepts the shipped config; through it a key issued on one replica works on the other, polls of
        one task reach both replicas and finish, /metrics is hidden, and with one replica down requests still pass."""
        base, replicas, ports = deployment
        assert httpx.get(f"{base}/metrics").status_code == 404
        created = httpx.post(
            f"{base}/gateway/keys", json={"name": "team-a"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert created.status_code == 201, created.text
        auth = {"Authorization": f"Bearer {created.json()['key']}"}
        # The other replica sees a new key at its next key refresh ([auth] refresh_interval_s, 0.5 s): until then
        # a request that nginx sends there is refused with 401, as the README's scale-out table says.
        deadline = time.monotonic() + 5
        submitted = httpx.post(f"{base}/v1/video/generations", json=VALID, headers=auth)
        while submitted.status_code == 401 and time.monotonic() < deadline:
            time.sleep(0.1)
            submitted = httpx.post(f"{base}/v1/video/generations", json=VALID, headers=auth)
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["id"]
        deadline = time.monotonic() + 15
        status = ""
        while status != "completed" and time.monotonic() < deadline:
            with httpx.Client() as client:  # a new connection each time, as many clients would
                response = client.get(f"{base}/v1/videos/{task_id}", headers=auth)
            assert response.status_code == 200, response.text
            status = response.json()["status"]
            time.sleep(0.05)
        assert status == "completed"
        poll_route = "/v1/videos/{task_id}"
        assert all(served(port, poll_route) > 0 for port in ports.values()), "nginx sent every poll to one replica"

        stop(replicas["gateway-1"])
        for _ in range(6):
            response = httpx.get(f"{base}/v1/videos/{task_id}", headers=auth)
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "completed"
