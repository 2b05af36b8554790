"""The gateway harness tests drive: a gateway app under TestClient with its log lines and metrics, and test secrets."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from gateway.config import Settings

SANDBOX_API_KEY = "sk-test-upstream"
ADMIN_TOKEN = "adm-test-token-canary-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


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
