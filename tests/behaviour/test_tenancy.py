"""Keys and tenancy end to end: auth failures, ownership, allowlists, rate limits, idempotency, the admin API."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, dynamic, json, slow

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a fox in the snow", "duration": 5}
KEYS_MODE = {"KLING_GATEWAY_AUTH_MODE": "keys"}


def numbered_tasks(fake: FakeUpstream) -> None:
    """Every submission creates a new task id; every poll answers in_progress."""
    counter = iter(range(1, 10_000))

    def accept(request: Any) -> Any:
        task_id = f"task_{next(counter)}"
        return json(200, {"id": task_id, "task_id": task_id, "status": "queued", "progress": 0})

    def status(request: Any) -> Any:
        task_id = request.path.rsplit("/", 1)[-1]
        return json(200, {"id": task_id, "task_id": task_id, "status": "in_progress", "progress": 10})

    fake.always("POST", SUBMIT, dynamic(accept))
    fake.always("GET", "/v1/videos/", dynamic(status))


@pytest.fixture
def gw(fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> GatewayHarness:
    numbered_tasks(fake_upstream)
    return make_gateway(fake_upstream.url, env=KEYS_MODE)


class TestAuthentication:
    @pytest.mark.parametrize(
        "authorization",
        [
            None,
            "",
            "Bearer",
            "Basic Z2s6eA==",
            "Bearer sk-not-a-gateway-key",
            "Bearer gk_" + "A" * 49,  # right shape, wrong checksum
            "Bearer gk_short",
        ],
    )
    def test_missing_or_malformed_key_is_401(self, gw: GatewayHarness, authorization: str | None) -> None:
        """Missing and malformed keys get 401 invalid_api_key with one body for all."""
        headers = {"Authorization": authorization} if authorization is not None else {}
        response = gw.client.post(SUBMIT, json=BODY, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_api_key")
        assert response.json()["error"]["type"] == "authentication_error"

    def test_unknown_revoked_and_rotated_out_keys_share_one_body(
        self, gw: GatewayHarness, fake_upstream: FakeUpstream
    ) -> None:
        """Unknown, revoked and rotated-out keys are refused with the same message and code."""
        from gateway.keys import generate_secret

        revoked = gw.create_key("team-revoked")
        assert gw.client.delete("/gateway/keys/team-revoked", headers=ADMIN).status_code == 200
        rotated = gw.create_key("team-rotated")
        assert gw.client.post("/gateway/keys/team-rotated/rotate?grace_s=0", headers=ADMIN).status_code == 200
        bodies = []
        for secret in (generate_secret(), revoked, rotated):
            response = gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret))
            assert response.status_code == 401
            error = response.json()["error"]
            bodies.append((error["code"], error["message"], error["type"]))
        assert len(set(bodies)) == 1
        assert fake_upstream.calls("POST", SUBMIT) == 0

    def test_rotation_grace_keeps_old_secret_working(self, gw: GatewayHarness) -> None:
        """After a rotation with a grace period both the old and the new secret work."""
        old = gw.create_key("team-a")
        rotated = gw.client.post("/gateway/keys/team-a/rotate", headers=ADMIN).json()
        assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(old)).status_code == 200
        assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(rotated["key"])).status_code == 200

    def test_revocation_takes_effect_at_once(self, gw: GatewayHarness) -> None:
        """A revoked key stops working for the very next request."""
        secret = gw.create_key("team-a")
        assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret)).status_code == 200
        gw.client.delete("/gateway/keys/team-a", headers=ADMIN)
        assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret)).status_code == 401

    def test_revocation_by_another_process_within_a_second(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A key revoked through another gateway sharing the store stops here within a second."""
        first = make_gateway(fake_upstream.url, env=KEYS_MODE)
        second = make_gateway(fake_upstream.url, env=KEYS_MODE)  # same data dir: same SQLite store
        secret = first.create_key("team-a")
        deadline = time.monotonic() + 1.5
        while second.client.get("/gateway/tasks", headers=second.as_key(secret)).status_code != 200:
            assert time.monotonic() < deadline, "the second process never saw the new key"
            time.sleep(0.05)
        first.client.delete("/gateway/keys/team-a", headers=ADMIN)
        revoked_at = time.monotonic()
        while second.client.get("/gateway/tasks", headers=second.as_key(secret)).status_code == 200:
            assert time.monotonic() - revoked_at < 1.0, "revocation not seen within a second"
            time.sleep(0.05)


class TestOwnership:
    def test_two_teams_never_see_each_others_tasks(self, gw: GatewayHarness) -> None:
        """Team B gets the same 404 for team A's task as for a task that does not exist."""
        team_a, team_b = gw.create_key("team-a"), gw.create_key("team-b")
        task_id = gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(team_a)).json()["task_id"]
        assert gw.client.get(f"/v1/videos/{task_id}", headers=gw.as_key(team_a)).status_code == 200
        foreign = gw.client.get(f"/v1/videos/{task_id}", headers=gw.as_key(team_b))
        unknown = gw.client.get("/v1/videos/task_does_not_exist", headers=gw.as_key(team_b))
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json()["error"] | {"request_id": None} == unknown.json()["error"] | {"request_id": None}
        listed_b = gw.client.get("/gateway/tasks", headers=gw.as_key(team_b)).json()["data"]
        listed_a = gw.client.get("/gateway/tasks", headers=gw.as_key(team_a)).json()["data"]
        assert listed_b == [] and [t["task_id"] for t in listed_a] == [task_id]

    def test_task_recorded_before_the_answer(self, gw: GatewayHarness) -> None:
        """The ledger row exists (key, model, mode, tier, audio, duration, request id) when the 200 arrives."""
        secret = gw.create_key("team-a")
        response = gw.client.post(SUBMIT, json=BODY, headers={**gw.as_key(secret), "X-Request-ID": "rid-ledger"})
        (task,) = gw.client.get("/gateway/tasks", headers=gw.as_key(secret)).json()["data"]
        assert task["task_id"] == response.json()["task_id"]
        assert (task["key"], task["model"], task["mode"], task["tier"], task["audio"], task["duration"]) == (
            "team-a",
            "kling-v3-std-silent",
            "text",
            "std",
            False,
            5,
        )
        assert task["request_id"] == "rid-ledger" and task["submitted_at"] > 0

    def test_admin_sees_every_task(self, gw: GatewayHarness) -> None:
        """With the admin token, /gateway/tasks lists every key's tasks."""
        for name in ("team-a", "team-b"):
            gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(gw.create_key(name)))
        keys = {t["key"] for t in gw.client.get("/gateway/tasks", headers=ADMIN).json()["data"]}
        assert keys == {"team-a", "team-b"}

    def test_tasks_are_paged(self, gw: GatewayHarness) -> None:
        """Pages follow next_cursor until it is null, newest first, without repeats."""
        secret = gw.create_key("team-a")
        ids = [gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret)).json()["task_id"] for _ in range(5)]
        seen, cursor = [], None
        while True:
            query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
            page = gw.client.get(f"/gateway/tasks{query}", headers=gw.as_key(secret)).json()
            seen += [t["task_id"] for t in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(ids))
        bad = gw.client.get("/gateway/tasks?cursor=garbage", headers=gw.as_key(secret))
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_cursor")


class TestLimits:
    def test_model_outside_allowlist_is_403(self, gw: GatewayHarness, fake_upstream: FakeUpstream) -> None:
        """A key limited to std models gets 403 model_not_allowed for a pro model."""
        secret = gw.create_key("team-std", models=["kling-v3-std-*"])
        assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret)).status_code == 200
        response = gw.client.post(SUBMIT, json={**BODY, "model": "kling-v3-pro-audio"}, headers=gw.as_key(secret))
        assert (response.status_code, response.json()["error"]["code"]) == (403, "model_not_allowed")
        assert fake_upstream.calls("POST", SUBMIT) == 1

    def test_rate_limit_exceeded_and_recovered(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Past rpm requests a key gets 429 rate_limited with Retry-After, and recovers as tokens refill."""
        numbered_tasks(fake_upstream)
        now = [1_000_000.0]
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        gw.client.app.state.services.rate_limits.local._clock = lambda: now[0]  # type: ignore[attr-defined]
        secret = gw.create_key("team-a", rpm=3)
        statuses = [gw.client.get("/gateway/tasks", headers=gw.as_key(secret)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret))
        assert (limited.status_code, limited.json()["error"]["code"]) == (429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
        now[0] += 21  # 3 per minute: one token every 20 s
        assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret)).status_code == 200
        assert fake_upstream.calls("POST", SUBMIT) == 1


class TestIdempotency:
    def test_replay_costs_one_upstream_task(self, gw: GatewayHarness, fake_upstream: FakeUpstream) -> None:
        """A repeat with the same key and body returns the first answer, marked replayed, with no upstream call."""
        secret = gw.create_key("team-a")
        headers = {**gw.as_key(secret), "Idempotency-Key": "order-1"}
        first = gw.client.post(SUBMIT, json=BODY, headers=headers)
        again = gw.client.post(SUBMIT, json=BODY, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert fake_upstream.calls("POST", SUBMIT) == 1

    def test_same_key_other_body_is_422(self, gw: GatewayHarness) -> None:
        """The same Idempotency-Key with another body is 422 idempotency_conflict."""
        secret = gw.create_key("team-a")
        headers = {**gw.as_key(secret), "Idempotency-Key": "order-1"}
        gw.client.post(SUBMIT, json=BODY, headers=headers)
        response = gw.client.post(SUBMIT, json={**BODY, "duration": 6}, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (422, "idempotency_conflict")

    def test_keys_are_scoped_per_client_key(self, gw: GatewayHarness, fake_upstream: FakeUpstream) -> None:
        """Two teams may use the same Idempotency-Key independently."""
        for name in ("team-a", "team-b"):
            headers = {**gw.as_key(gw.create_key(name)), "Idempotency-Key": "shared"}
            assert gw.client.post(SUBMIT, json=BODY, headers=headers).status_code == 200
        assert fake_upstream.calls("POST", SUBMIT) == 2

    def test_in_flight_repeat_is_409(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A repeat while the first is still upstream is 409 idempotency_in_progress."""
        accepted = {"id": "task_slow", "task_id": "task_slow", "status": "queued"}
        fake_upstream.script("POST", SUBMIT, slow(0.6, json(200, accepted)))
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        headers = {**gw.as_key(gw.create_key("team-a")), "Idempotency-Key": "order-1"}
        results: list[int] = []
        first = threading.Thread(
            target=lambda: results.append(gw.client.post(SUBMIT, json=BODY, headers=headers).status_code)
        )
        first.start()
        fake_upstream.wait_for_calls("POST", SUBMIT, 1)
        second = gw.client.post(SUBMIT, json=BODY, headers=headers)
        first.join()
        assert (second.status_code, second.json()["error"]["code"]) == (409, "idempotency_in_progress")
        assert results == [200]
        assert fake_upstream.calls("POST", SUBMIT) == 1

    def test_failed_first_attempt_can_be_retried(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """After an upstream 5xx the same Idempotency-Key may be retried (the failure is not replayed)."""
        accepted = {"id": "task_ok", "task_id": "task_ok", "status": "queued"}
        fake_upstream.script("POST", SUBMIT, json(503, {"error": {"message": "busy"}}), json(200, accepted))
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        headers = {**gw.as_key(gw.create_key("team-a")), "Idempotency-Key": "order-1"}
        assert gw.client.post(SUBMIT, json=BODY, headers=headers).status_code == 503
        assert gw.client.post(SUBMIT, json=BODY, headers=headers).json()["task_id"] == "task_ok"

    def test_malformed_idempotency_key_is_400(self, gw: GatewayHarness) -> None:
        """An Idempotency-Key that is empty or too long is 400 invalid_idempotency_key."""
        headers = {**gw.as_key(gw.create_key("team-a")), "Idempotency-Key": "x" * 300}
        response = gw.client.post(SUBMIT, json=BODY, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_idempotency_key")


class TestAdminApi:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/gateway/keys"),
            ("POST", "/gateway/keys"),
            ("DELETE", "/gateway/keys/x"),
            ("POST", "/gateway/keys/x/rotate"),
            ("GET", "/gateway/keys/x"),
        ],
    )
    @pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Bearer gk_notadmin"])
    def test_without_or_with_wrong_token_is_401(
        self, gw: GatewayHarness, method: str, path: str, authorization: str | None
    ) -> None:
        """Every admin route refuses a missing or wrong admin token."""
        headers = {"Authorization": authorization} if authorization else {}
        response = gw.client.request(method, path, headers=headers, json={"name": "x"})
        assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_admin_token")

    def test_admin_api_absent_without_token(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """With no admin token configured the admin API does not exist (404)."""
        gw = make_gateway(fake_upstream.url, env={**KEYS_MODE, "KLING_GATEWAY_ADMIN_TOKEN": ""})
        assert gw.client.get("/gateway/keys", headers=ADMIN).status_code == 404

    def test_list_never_shows_secrets(self, gw: GatewayHarness) -> None:
        """Listing shows names, prefixes and limits, never a secret or its hash."""
        secret = gw.create_key("team-a", rpm=60, monthly_budget_usd="100", models=["kling-v3-std-*"])
        listed = gw.client.get("/gateway/keys", headers=ADMIN)
        assert secret not in listed.text and "hash" not in listed.text
        (key,) = listed.json()["data"]
        assert (key["name"], key["rpm"], key["monthly_budget_usd"], key["models"]) == (
            "team-a",
            60,
            "100",
            ["kling-v3-std-*"],
        )
        assert secret.startswith(key["prefix"])

    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({}, 400, "missing_field"),
            ({"name": "bad name!"}, 400, "invalid_key_request"),
            ({"name": "ok", "rpm": 0}, 400, "invalid_key_request"),
            ({"name": "ok", "rpm": "ten"}, 400, "invalid_type"),
            ({"name": "ok", "monthly_budget_usd": "lots"}, 400, "invalid_type"),
            ({"name": "ok", "models": 5}, 400, "invalid_type"),
            ({"name": "ok", "webhook_url": "http://127.0.0.1/hook"}, 400, "invalid_key_request"),
            ({"name": "ok", "colour": "red"}, 400, "unknown_field"),
        ],
    )
    def test_bad_key_requests(self, gw: GatewayHarness, body: dict[str, Any], status: int, code: str) -> None:
        """Malformed key creation requests are refused with a named code."""
        response = gw.client.post("/gateway/keys", json=body, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)

    def test_duplicate_and_missing_keys(self, gw: GatewayHarness) -> None:
        """Creating a taken name is 409; revoking or rotating an unknown key is 404."""
        gw.create_key("team-a")
        duplicate = gw.client.post("/gateway/keys", json={"name": "team-a"}, headers=ADMIN)
        assert (duplicate.status_code, duplicate.json()["error"]["code"]) == (409, "key_exists")
        assert gw.client.delete("/gateway/keys/nope", headers=ADMIN).status_code == 404
        assert gw.client.post("/gateway/keys/nope/rotate", headers=ADMIN).status_code == 404
