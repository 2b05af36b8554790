"""The first hour of an operator and a client: keys that work at once everywhere, usage by key, key updates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream

from gateway.keys import generate_secret

# A refresh interval far beyond the test: only the look-up on a miss can make a new key work.
SLOW_REFRESH = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_AUTH_REFRESH_INTERVAL_S": "600"}

Pair = Callable[[], tuple[GatewayHarness, GatewayHarness]]


@pytest.fixture(params=["sqlite", "postgres"])
def two_replicas(request: pytest.FixtureRequest, make_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> Pair:
    """Two gateways on one store (the SQLite file both open, or one PostgreSQL schema)."""
    env = dict(SLOW_REFRESH)
    if request.param == "postgres":
        env["KLING_GATEWAY_STORE_URL"] = request.getfixturevalue("postgres_schema_url")

    def make() -> tuple[GatewayHarness, GatewayHarness]:
        return make_gateway(fake_upstream.url, env=env), make_gateway(fake_upstream.url, env=env)

    return make


class TestNewKeysWorkAtOnce:
    def test_a_key_created_on_one_replica_works_at_once_on_the_other(self, two_replicas: Pair) -> None:
        a, b = two_replicas()
        b.client.get("/gateway/tasks", headers=ADMIN)  # b has loaded its (empty) key table
        secret = a.create_key("fresh")
        response = b.client.get("/gateway/tasks", headers=a.as_key(secret))
        assert response.status_code == 200, response.text

    def test_a_rotated_secret_works_at_once_on_the_other(self, two_replicas: Pair) -> None:
        a, b = two_replicas()
        old = a.create_key("rolling")
        assert b.client.get("/gateway/tasks", headers=a.as_key(old)).status_code == 200
        rotated = a.client.post("/gateway/keys/rolling/rotate?grace_s=0", headers=ADMIN)
        assert rotated.status_code == 200
        new = rotated.json()["key"]
        assert b.client.get("/gateway/tasks", headers=a.as_key(new)).status_code == 200

    def test_an_unknown_well_formed_key_is_401_and_remembered(self, two_replicas: Pair) -> None:
        a, _ = two_replicas()
        headers = a.as_key(generate_secret())
        for _ in range(3):
            response = a.client.get("/gateway/tasks", headers=headers)
            assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_api_key")


class TestUsageForAClient:
    @pytest.mark.parametrize("by", ["key", "model,key", "key,model", "model"])
    def test_usage_grouped_by_key_is_200(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream, by: str
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        headers = gw.as_key(gw.create_key("team"))
        response = gw.client.get(f"/gateway/usage?by={by}", headers=headers)
        assert response.status_code == 200, response.text

    @pytest.mark.parametrize(
        ("query", "param"), [("by=colour", "by"), ("since=yesterday", "since"), ("until=nope", "until")]
    )
    def test_usage_errors_name_the_parameter(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream, query: str, param: str
    ) -> None:
        gw = make_gateway(fake_upstream.url)
        response = gw.client.get(f"/gateway/usage?{query}", headers=ADMIN)
        error = response.json()["error"]
        assert (response.status_code, error["code"], error["param"]) == (400, "invalid_parameter", param)


class TestWrongMethods:
    @pytest.mark.parametrize(
        ("method", "path", "allow"),
        [
            ("GET", "/v1/video/generations", "POST"),
            ("PUT", "/v1/video/generations", "POST"),
            ("DELETE", "/v1/videos/task_abc123", "GET, HEAD"),
            ("POST", "/v1/videos/task_abc123", "GET, HEAD"),
        ],
    )
    @pytest.mark.parametrize("passthrough", ["false", "true"])
    def test_405_with_allow(
        self,
        make_gateway: GatewayFactory,
        fake_upstream: FakeUpstream,
        method: str,
        path: str,
        allow: str,
        passthrough: str,
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_PROXY_PASSTHROUGH": passthrough})
        response = gw.client.request(method, path)
        assert (response.status_code, response.json()["error"]["code"]) == (405, "method_not_allowed")
        assert response.headers["allow"] == allow

    def test_post_v1_videos_points_at_the_submit_route(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post("/v1/videos", json={"model": "kling-v3-std-silent", "prompt": "a fox"})
        error = response.json()["error"]
        assert (response.status_code, error["code"]) == (404, "not_found")
        assert "POST /v1/video/generations" in error["message"]
