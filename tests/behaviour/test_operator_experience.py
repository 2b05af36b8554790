"""The first hour of an operator and a client: keys that work at once everywhere, usage by key, key updates."""

from __future__ import annotations

import time
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


class TestKeyUpdates:
    def test_patch_changes_limits_and_every_replica_applies_them_within_a_second(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        env = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_AUTH_REFRESH_INTERVAL_S": "0.05"}
        a, b = make_gateway(fake_upstream.url, env=env), make_gateway(fake_upstream.url, env=env)
        headers = a.as_key(a.create_key("team", models=["kling-v3-pro-*"]))
        body = {"model": "kling-v3-std-silent", "prompt": "a fox", "duration": 5}
        refused = b.client.post("/v1/video/generations", json=body, headers=headers)
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "model_not_allowed")

        patched = a.client.patch(
            "/gateway/keys/team",
            json={"models": ["kling-v3-std-*"], "rpm": 1, "monthly_budget_usd": "5"},
            headers=ADMIN,
        )
        assert patched.status_code == 200, patched.text
        assert (patched.json()["models"], patched.json()["rpm"], patched.json()["monthly_budget_usd"]) == (
            ["kling-v3-std-*"],
            1,
            "5",
        )
        deadline = time.monotonic() + 1.0
        while b.client.post("/gateway/validate", json=body, headers=headers).status_code == 200:
            assert time.monotonic() < deadline, "the rpm change never reached the other replica"
            time.sleep(0.05)
        limited = b.client.post("/gateway/validate", json=body, headers=headers)
        assert (limited.status_code, limited.json()["error"]["code"]) == (429, "rate_limited")
        assert [line.get("code") for line in b.log_lines() if line.get("status") == 429][-1] == "rate_limited"

    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({"rpm": 0}, 400, "invalid_key_request"),
            ({"models": ["kling-v9-*"]}, 400, "invalid_key_request"),
            ({"models": "+json"}, 400, "invalid_key_request"),
            ({"rmp": 5}, 400, "unknown_field"),
            ({"name": "other"}, 400, "unknown_field"),
            ({"rpm": "fast"}, 400, "invalid_type"),
        ],
    )
    def test_patch_refusals(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream, body: dict[str, object], status: int, code: str
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        gw.create_key("team")
        response = gw.client.patch("/gateway/keys/team", json=body, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)

    def test_unknown_field_gets_a_did_you_mean(self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post("/gateway/keys", json={"name": "t", "rmp": 5}, headers=ADMIN)
        error = response.json()["error"]
        assert (response.status_code, error["code"], error["param"]) == (400, "unknown_field", "rmp")
        assert "did you mean 'rpm'?" in error["message"]

    def test_a_glob_matching_no_model_is_refused_at_creation(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post("/gateway/keys", json={"name": "t", "models": ["kling-v3-standard-*"]}, headers=ADMIN)
        error = response.json()["error"]
        assert (response.status_code, error["code"]) == (400, "invalid_key_request")
        assert "matches no model" in error["message"]

    def test_patch_unknown_and_revoked(self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
        gw = make_gateway(fake_upstream.url)
        missing = gw.client.patch("/gateway/keys/nobody", json={"rpm": 5}, headers=ADMIN)
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "key_not_found")
        gw.create_key("gone")
        gw.client.delete("/gateway/keys/gone", headers=ADMIN)
        revoked = gw.client.patch("/gateway/keys/gone", json={"rpm": 5}, headers=ADMIN)
        assert (revoked.status_code, revoked.json()["error"]["code"]) == (409, "key_revoked")

    def test_a_revoked_name_cannot_be_recreated_and_the_error_says_why(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        old = gw.create_key("gone")
        gw.client.delete("/gateway/keys/gone", headers=ADMIN)
        again = gw.client.post("/gateway/keys", json={"name": "gone"}, headers=ADMIN)
        error = again.json()["error"]
        assert (again.status_code, error["code"]) == (409, "key_revoked")
        assert "revoked" in error["message"]
        assert gw.client.get("/gateway/tasks", headers=gw.as_key(old)).status_code == 401

    def test_key_creation_logs_the_key_name(self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
        gw = make_gateway(fake_upstream.url)
        gw.create_key("logged-team")
        created = [line for line in gw.log_lines() if line.get("route") == "/gateway/keys" and line["status"] == 201]
        assert created and created[0]["key_name"] == "logged-team"


class TestBudgetVisibility:
    def test_usage_for_a_client_shows_the_month_budget(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        headers = gw.as_key(gw.create_key("team", monthly_budget_usd="20"))
        response = gw.client.get("/gateway/usage", headers=headers)
        budget = response.json()["budget"]
        assert (response.status_code, budget["spent_usd"], budget["monthly_budget_usd"], budget["remaining_usd"]) == (
            200,
            "0.0000",
            "20.0000",
            "20.0000",
        )
        assert "budget" not in gw.client.get("/gateway/usage", headers=ADMIN).json()


class TestRateLimitHeaders:
    def test_authenticated_responses_carry_the_key_allowance(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        headers = gw.as_key(gw.create_key("team", rpm=3))
        seen = []
        for path in ("/gateway/tasks", "/v1/videos/task_0123456789", "/gateway/tasks", "/gateway/tasks"):
            response = gw.client.get(path, headers=headers)
            seen.append(
                (
                    response.status_code,
                    response.headers.get("x-ratelimit-limit-requests"),
                    response.headers.get("x-ratelimit-remaining-requests"),
                )
            )
        assert seen == [(200, "3", "2"), (404, "3", "1"), (200, "3", "0"), (429, "3", "0")]

    def test_no_headers_for_a_key_without_a_limit(
        self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
    ) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        response = gw.client.get("/gateway/tasks", headers=gw.as_key(gw.create_key("team")))
        assert response.status_code == 200 and "x-ratelimit-limit-requests" not in response.headers


class TestNoRawMarkup:
    def test_openapi_description_is_markdown(self, make_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
        gw = make_gateway(fake_upstream.url)
        description = gw.client.get("/gateway/openapi.json").json()["info"]["description"]
        assert "``" not in description and "`[proxy] passthrough`" in description

    def test_help_has_no_docstring_markup(self, capsys: pytest.CaptureFixture[str]) -> None:
        from gateway.cli.main import build_parser

        text = build_parser().format_help()
        assert "``" not in text and "Kling v3" in text
