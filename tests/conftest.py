"""Shared fixtures: a scripted fake upstream and the real sandbox upstream, both on loopback."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient
from upstream_fake import FakeUpstream, SandboxServer, ServerThread

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.sandbox import SandboxOptions, create_sandbox_app

SANDBOX_API_KEY = "sk-test-upstream"
ADMIN_TOKEN = "adm-test-token-canary"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A scripted fake upstream on an ephemeral loopback port."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def sandbox_server() -> Iterator[SandboxServer]:
    """The sandbox app served by uvicorn in a background thread, with fast task timings."""
    options = SandboxOptions(api_key=SANDBOX_API_KEY, queued_s=0.2, run_s=0.5)
    with ServerThread(create_sandbox_app(options), lifespan="off") as server:
        yield SandboxServer(url=server.url, api_key=SANDBOX_API_KEY, options=options)


@dataclass
class GatewayHarness:
    """A gateway app under TestClient, with its log lines and metrics at hand."""

    client: TestClient
    logs: io.StringIO
    registry: CollectorRegistry
    settings: Settings

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def log_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]

    def create_key(self, name: str, **options: Any) -> str:
        """Issue a key through the admin API and return its secret."""
        response = self.client.post("/gateway/keys", json={"name": name, **options}, headers=ADMIN)
        assert response.status_code == 201, response.text
        secret: str = response.json()["key"]
        return secret

    def as_key(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}


GatewayFactory = Callable[..., GatewayHarness]


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Build gateways against a given upstream URL; settings come from ``env`` exactly as in production."""
    with ExitStack() as stack:

        def make(
            upstream_url: str,
            *,
            upstream_key: str = SANDBOX_API_KEY,
            env: dict[str, str] | None = None,
            **create_kwargs: Any,
        ) -> GatewayHarness:
            environ = {
                "UNIALL_BASE_URL": upstream_url,
                "UNIALL_API_KEY": upstream_key,
                "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp_path / "data"),
                "KLING_GATEWAY_AUTH_MODE": "open",
                "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "KLING_GATEWAY_SETTLER_ENABLED": "false",
                "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
                **(env or {}),
            }
            settings = load_settings(env=environ)
            logs = io.StringIO()
            registry = CollectorRegistry()
            app = create_app(settings, registry=registry, log_stream=logs, **create_kwargs)
            client = stack.enter_context(TestClient(app))
            return GatewayHarness(client=client, logs=logs, registry=registry, settings=settings)

        yield make
