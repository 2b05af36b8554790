"""Upstream accounts end to end (SPEC section 9), against a fake UniAll that keeps each key's tasks and limits."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, KlingAccounts

from gateway.accounts.parse import fingerprint

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {
    "model": "kling-v3-std-silent",
    "prompt": "A lighthouse at dusk, waves rolling in.",
    "duration": 5,
}
KEYS = "a=sk-acct-a,b=sk-acct-b"
KEYED = {"KLING_GATEWAY_AUTH_MODE": "keys"}


def accounts_env(keys: str = KEYS, settings: str = "", **extra: str) -> dict[str, str]:
    env = {"UNIALL_API_KEYS": keys, **extra}
    if settings:
        env["KLING_GATEWAY_UPSTREAM_ACCOUNTS"] = settings
    return env


def submit(gw: GatewayHarness) -> httpx.Response:
    return gw.client.post(SUBMIT, json=BODY)


def accounts_of(gw: GatewayHarness) -> dict[str, dict[str, Any]]:
    response = gw.client.get("/gateway/accounts", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {row["name"]: row for row in response.json()["data"]}


def upstream_submits(fake: FakeUpstream) -> list[str]:
    return [r.header("authorization") or "" for r in fake.requests_to("POST", SUBMIT)]


class TestAffinity:
    def test_each_task_polled_with_its_accounts_key_across_a_restart(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Tasks spread over the accounts; every poll of a task uses the key that created it, after a restart too."""
        kling = KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        first, second = submit(gw), submit(gw)
        assert (first.status_code, second.status_code) == (200, 200)
        ids = [first.json()["task_id"], second.json()["task_id"]]
        assert {kling.owner[i] for i in ids} == {"sk-acct-a", "sk-acct-b"}  # least loaded: one each
        for task_id in ids:
            assert gw.client.get(f"/v1/videos/{task_id}").status_code == 200
        gw.client.close()
        again = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        for task_id in ids:
            kling.finish(task_id)
            response = again.client.get(f"/v1/videos/{task_id}")
            assert response.status_code == 200 and response.json()["status"] == "completed"
        polls = [r for r in fake_upstream.requests if r.method == "GET" and r.path.startswith("/v1/videos/")]
        assert len(polls) == 4
        assert all(r.header("authorization") == f"Bearer {kling.owner[r.path.rsplit('/', 1)[-1]]}" for r in polls)

    def test_content_is_downloaded_with_the_tasks_account_key(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """/content fetches each task's video with the key of the account that created it (another key: 404)."""
        kling = KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        ids = [submit(gw).json()["task_id"] for _ in range(2)]
        assert {kling.owner[i] for i in ids} == {"sk-acct-a", "sk-acct-b"}
        for task_id in ids:
            kling.finish(task_id)
            response = gw.client.get(f"/v1/videos/{task_id}/content")
            assert response.status_code == 200, response.text
            assert response.content.endswith(task_id.encode())
        fetches = [r for r in fake_upstream.requests if r.path.startswith("/videos/")]
        assert [r.header("authorization") for r in fetches] == [f"Bearer {kling.owner[i]}" for i in ids]

    def test_single_key_is_the_default_account(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """UNIALL_API_KEY alone: one account named default, listed with its fingerprint and no key."""
        KlingAccounts({"sk-only": 0}).install(fake_upstream)
        gw = make_gateway(fake_upstream.url, upstream_key="sk-only")
        assert submit(gw).status_code == 200
        rows = accounts_of(gw)
        assert rows == {
            "default": {
                "name": "default",
                "state": "ok",
                "in_flight": 1,
                "max_in_flight": 0,
                "weight": 1.0,
                "models": [],
                "key_fingerprint": fingerprint("sk-only"),
            }
        }
        assert "sk-only" not in gw.client.get("/gateway/accounts", headers=ADMIN).text

    def test_accounts_needs_the_admin_token(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Without the admin token: 401 invalid_admin_token."""
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        response = gw.client.get("/gateway/accounts")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_admin_token"


class TestCapacity:
    def test_full_is_429_upstream_capacity_without_an_upstream_call(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Every account at max_in_flight: 429 upstream_capacity with Retry-After, nothing forwarded; a settled
        task frees its slot."""
        kling = KlingAccounts({"sk-acct-a": 0}).install(fake_upstream)
        gw = make_gateway(
            fake_upstream.url, upstream_key="", env=accounts_env("a=sk-acct-a", '{"a": {"max_in_flight": 1}}')
        )
        first = submit(gw)
        assert first.status_code == 200
        refused = submit(gw)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "upstream_capacity"
        assert refused.headers["retry-after"] == "5"
        assert fake_upstream.calls("POST", SUBMIT) == 1
        assert accounts_of(gw)["a"]["state"] == "full"
        assert gw.metric("kling_gateway_upstream_account_in_flight", {"account": "a"}) == 1
        kling.finish(first.json()["task_id"])
        assert gw.client.get(f"/v1/videos/{first.json()['task_id']}").json()["status"] == "completed"
        assert submit(gw).status_code == 200
        assert fake_upstream.calls("POST", SUBMIT) == 2

    def test_model_served_by_no_account_is_upstream_capacity(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """An account limited to other models never takes the task: 429 upstream_capacity, nothing forwarded."""
        KlingAccounts({"sk-acct-a": 0}).install(fake_upstream)
        gw = make_gateway(
            fake_upstream.url,
            upstream_key="",
            env=accounts_env("a=sk-acct-a", '{"a": {"models": ["kling-v3-pro-*"], "max_in_flight": 5}}'),
        )
        response = submit(gw)
        assert (response.status_code, response.json()["error"]["code"]) == (429, "upstream_capacity")
        assert fake_upstream.calls("POST", SUBMIT) == 0

    def test_wait_for_room(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """capacity_wait_s: a submission waits for a slot freed meanwhile instead of answering 429."""
        kling = KlingAccounts({"sk-acct-a": 0}).install(fake_upstream)
        gw = make_gateway(
            fake_upstream.url,
            upstream_key="",
            env=accounts_env("a=sk-acct-a", '{"a": {"max_in_flight": 1}}', KLING_GATEWAY_UPSTREAM_CAPACITY_WAIT_S="5"),
        )
        first = submit(gw).json()["task_id"]
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(submit, gw)
            time.sleep(0.5)
            assert not waiting.done()
            kling.finish(first)
            assert gw.client.get(f"/v1/videos/{first}").json()["status"] == "completed"
            assert waiting.result(timeout=10).status_code == 200


class TestBudgetAcrossAccounts:
    """A budgeted key's hold is taken with the first intent admitted and kept while the submission moves."""

    def test_moved_submission_keeps_its_one_hold(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A budget of exactly one request: refused on a, moved to b, accepted (a second hold would not have fit);
        the next request is over budget and answered without an upstream call."""
        kling = KlingAccounts({"sk-acct-a": 1, "sk-acct-b": 0}).install(fake_upstream)
        httpx.post(fake_upstream.url + SUBMIT, json=BODY, headers={"Authorization": "Bearer sk-acct-a"})  # elsewhere
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env(**KEYED))
        headers = gw.as_key(gw.create_key("team", monthly_budget_usd="0.42"))
        response = gw.client.post(SUBMIT, json=BODY, headers=headers)
        assert response.status_code == 200, response.text
        assert kling.owner[response.json()["task_id"]] == "sk-acct-b"
        assert kling.refusals == [("sk-acct-a", 429)]
        calls = fake_upstream.calls("POST", SUBMIT)
        denied = gw.client.post(SUBMIT, json=BODY, headers=headers)
        assert (denied.status_code, denied.json()["error"]["code"]) == (429, "budget_exceeded")
        assert fake_upstream.calls("POST", SUBMIT) == calls

    def test_over_budget_is_answered_before_waiting_for_capacity(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The only account is set aside (a capacity refusal), so a submission would wait capacity_wait_s for it:
        an over-budget one is refused at once with 429 budget_exceeded, without an upstream call."""
        KlingAccounts({"sk-acct-a": 1}).install(fake_upstream)
        httpx.post(fake_upstream.url + SUBMIT, json=BODY, headers={"Authorization": "Bearer sk-acct-a"})  # elsewhere
        gw = make_gateway(
            fake_upstream.url,
            upstream_key="",
            env=accounts_env(
                "a=sk-acct-a",
                '{"a": {"max_in_flight": 5}}',
                KLING_GATEWAY_UPSTREAM_CAPACITY_WAIT_S="5",
                **KEYED,
            ),
        )
        free = gw.as_key(gw.create_key("free"))
        poor = gw.as_key(gw.create_key("poor", monthly_budget_usd="0.3"))
        refused = gw.client.post(SUBMIT, json=BODY, headers=free)
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "upstream_capacity")
        assert accounts_of(gw)["a"]["state"] == "full"  # set aside for the upstream's Retry-After (7 s)
        started = time.monotonic()
        denied = gw.client.post(SUBMIT, json=BODY, headers=poor)
        assert (denied.status_code, denied.json()["error"]["code"]) == (429, "budget_exceeded")
        assert time.monotonic() - started < 2.5  # not after the 5 s wait
        assert fake_upstream.calls("POST", SUBMIT) == 2  # the one elsewhere, and the refused one


class TestRefusals:
    def test_capacity_refusal_moves_the_submission(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Kling 1303 on one account: the client never sees it; the task lands on the other account, and the
        refusing account is set aside for its Retry-After."""
        kling = KlingAccounts({"sk-acct-a": 1, "sk-acct-b": 0}).install(fake_upstream)
        httpx.post(fake_upstream.url + SUBMIT, json=BODY, headers={"Authorization": "Bearer sk-acct-a"})  # elsewhere
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        response = submit(gw)
        assert response.status_code == 200
        assert kling.owner[response.json()["task_id"]] == "sk-acct-b"
        assert kling.refusals == [("sk-acct-a", 429)]
        assert gw.metric("kling_gateway_upstream_account_refusals_total", {"account": "a", "reason": "capacity"}) == 1
        assert accounts_of(gw)["a"]["state"] == "full"
        assert submit(gw).status_code == 200  # straight to b: a is set aside
        assert kling.refusals == [("sk-acct-a", 429)]

    def test_revoked_key_is_set_aside_until_it_changes(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """401 from one account: submission moved, account unauthorized (error line, metric), key never logged."""
        kling = KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        kling.revoked.add("sk-acct-a")
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        assert submit(gw).status_code == 200
        assert submit(gw).status_code == 200
        assert kling.refusals == [("sk-acct-a", 401)]
        assert accounts_of(gw)["a"]["state"] == "unauthorized"
        assert gw.metric("kling_gateway_upstream_account_unauthorized", {"account": "a"}) == 1
        assert (
            gw.metric("kling_gateway_upstream_account_refusals_total", {"account": "a", "reason": "unauthorized"}) == 1
        )
        lines = [line for line in gw.log_lines() if line.get("event") == "upstream_account_unauthorized"]
        assert lines and lines[0]["account"] == "a" and lines[0]["level"] == "error"
        assert "sk-acct" not in gw.logs.getvalue()

    def test_every_account_refusing_for_capacity_is_429_upstream_capacity(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """No account can take it: 429 upstream_capacity with the upstream's Retry-After (both accounts come back
        only when it passes: nothing of theirs is in flight here); the next submission forwards nothing."""
        kling = KlingAccounts({"sk-acct-a": 1, "sk-acct-b": 1}).install(fake_upstream)
        for key in ("sk-acct-a", "sk-acct-b"):
            httpx.post(fake_upstream.url + SUBMIT, json=BODY, headers={"Authorization": f"Bearer {key}"})
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        response = submit(gw)
        assert (response.status_code, response.json()["error"]["code"]) == (429, "upstream_capacity")
        assert response.headers["retry-after"] == "7"
        assert len(kling.refusals) == 2
        again = submit(gw)  # both set aside now: nothing forwarded
        assert (again.status_code, again.json()["error"]["code"]) == (429, "upstream_capacity")
        assert again.headers["retry-after"] in ("6", "7")
        assert len(kling.refusals) == 2

    def test_every_account_unauthorized_is_502_without_an_upstream_call(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Every key rejected: 502 upstream_auth_failed (not 429: waiting helps nobody), then nothing forwarded."""
        kling = KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        kling.revoked.update({"sk-acct-a", "sk-acct-b"})
        env = accounts_env(KLING_GATEWAY_UPSTREAM_CAPACITY_WAIT_S="30")  # no key to wait for: answered at once
        gw = make_gateway(fake_upstream.url, upstream_key="", env=env)
        started = time.monotonic()
        first = submit(gw)
        assert (first.status_code, first.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert len(kling.refusals) == 2
        again = submit(gw)
        assert (again.status_code, again.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert "retry-after" not in again.headers
        assert len(kling.refusals) == 2  # nothing forwarded
        assert time.monotonic() - started < 5
        assert "sk-acct" not in again.text

    def test_unauthorized_and_full_is_capacity(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A mix: one key rejected, the other account at its limit; it may take the task later, so capacity wins."""
        kling = KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        kling.revoked.add("sk-acct-a")
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env(settings='{"b": {"max_in_flight": 1}}'))
        assert submit(gw).status_code == 200  # a refused (401), b takes it
        response = submit(gw)
        assert (response.status_code, response.json()["error"]["code"]) == (429, "upstream_capacity")
        assert response.headers["retry-after"] == "5"
        assert kling.refusals == [("sk-acct-a", 401)]
        assert fake_upstream.calls("POST", SUBMIT) == 2

    def test_timeout_is_never_retried_on_another_account(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A submission the upstream may have accepted (reset mid-answer) is not moved: 502, one upstream call."""
        from support.upstream_fake import reset

        fake_upstream.script("POST", SUBMIT, reset())
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env())
        response = submit(gw)
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_unavailable")
        assert fake_upstream.calls("POST", SUBMIT) == 1


class TestSingleAccount:
    def test_rejected_key_is_refused_without_an_upstream_call_until_it_changes(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """One account, no limit: after a 401 the next submission is 502 upstream_auth_failed with no upstream
        call; a rotated key in the key file clears it."""
        KlingAccounts({"sk-good": 0}).install(fake_upstream)
        key_file = tmp_path / "uniall-keys"
        key_file.write_text("main=sk-bad\n")
        gw = make_gateway(fake_upstream.url, upstream_key="", env={"UNIALL_API_KEYS_FILE": str(key_file)})
        pool = gw.client.app.state.services.accounts  # type: ignore[attr-defined]
        assert pool.simple
        first = submit(gw)
        assert (first.status_code, first.json()["error"]["code"]) == (502, "upstream_auth_failed")
        again = submit(gw)
        assert (again.status_code, again.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert fake_upstream.calls("POST", SUBMIT) == 1
        assert accounts_of(gw)["main"]["state"] == "unauthorized"
        key_file.write_text("main=sk-good\n")
        os.utime(key_file, (time.time() + 5, time.time() + 5))
        assert pool.reload_keys()
        assert submit(gw).status_code == 200
        assert fake_upstream.calls("POST", SUBMIT) == 2
        assert accounts_of(gw)["main"]["state"] == "ok"

    def test_rejected_key_from_the_environment(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """UNIALL_API_KEY rejected: 502 upstream_auth_failed, then refused here (the key cannot change without a
        restart)."""
        KlingAccounts({"sk-good": 0}).install(fake_upstream)
        gw = make_gateway(fake_upstream.url, upstream_key="sk-revoked")
        assert [submit(gw).json()["error"]["code"] for _ in range(2)] == ["upstream_auth_failed"] * 2
        assert fake_upstream.calls("POST", SUBMIT) == 1


class TestKeyFile:
    def test_rotation_without_restart(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """The key file is re-read when it changes: an unauthorized account works again with its new key."""
        kling = KlingAccounts({"sk-new": 0}).install(fake_upstream)
        key_file = tmp_path / "uniall-keys"
        key_file.write_text("main=sk-old\nspare=sk-spare\n")
        kling.limits["sk-spare"] = 0
        kling.revoked.add("sk-spare")
        gw = make_gateway(fake_upstream.url, upstream_key="", env={"UNIALL_API_KEYS_FILE": str(key_file)})
        refused = submit(gw)
        # both keys rejected: the operator's problem, never a 401 that reads as the client's key failing
        assert (refused.status_code, refused.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert {name: row["state"] for name, row in accounts_of(gw).items()} == {
            "main": "unauthorized",
            "spare": "unauthorized",
        }
        key_file.write_text("main=sk-new\nspare=sk-spare\n")
        os.utime(key_file, (time.time() + 5, time.time() + 5))
        pool = gw.client.app.state.services.accounts  # type: ignore[attr-defined]
        assert pool.reload_keys()
        rows = accounts_of(gw)
        assert rows["main"]["state"] == "ok" and rows["main"]["key_fingerprint"] == fingerprint("sk-new")
        assert rows["spare"]["state"] == "unauthorized"  # its key did not change
        response = submit(gw)
        assert response.status_code == 200
        assert kling.owner[response.json()["task_id"]] == "sk-new"
        assert "sk-new" not in gw.logs.getvalue() and "sk-old" not in gw.logs.getvalue()

    def test_broken_file_keeps_the_last_good_keys(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """A rewrite that does not parse is refused with an error line; the accounts keep working."""
        KlingAccounts({"sk-a": 0}).install(fake_upstream)
        key_file = tmp_path / "uniall-keys"
        key_file.write_text("main=sk-a\n")
        gw = make_gateway(fake_upstream.url, upstream_key="", env={"UNIALL_API_KEYS_FILE": str(key_file)})
        key_file.write_text("main=\n")
        os.utime(key_file, (time.time() + 5, time.time() + 5))
        assert not gw.client.app.state.services.accounts.reload_keys()  # type: ignore[attr-defined]
        assert any(line.get("event") == "upstream_keys_reload_failed" for line in gw.log_lines())
        assert submit(gw).status_code == 200

    def test_keys_loaded_later_are_masked_in_answers_and_logs(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """After a rotation the new key, and the one it replaced, are masked wherever they turn up: in an upstream
        answer sent with another account's key (body and header) and in any log line."""
        from support.upstream_fake import dynamic, json

        key_file = tmp_path / "uniall-keys"
        key_file.write_text("main=sk-old-main-0001\nspare=sk-spare-0002\n")
        env = {
            "UNIALL_API_KEYS_FILE": str(key_file),
            "KLING_GATEWAY_UPSTREAM_ACCOUNTS": '{"main": {"models": ["kling-v3-pro-*"]}}',  # STD goes to spare
        }
        gw = make_gateway(fake_upstream.url, upstream_key="", env=env)
        key_file.write_text("main=sk-new-main-0003\nspare=sk-spare-0002\n")
        os.utime(key_file, (time.time() + 5, time.time() + 5))
        services = gw.client.app.state.services  # type: ignore[attr-defined]
        assert services.accounts.reload_keys()
        echo = "keys sk-new-main-0003 and sk-old-main-0001"
        fake_upstream.always(
            "POST",
            SUBMIT,
            dynamic(lambda _request: json(400, {"error": {"message": echo}}, {"X-RateLimit-Echo": echo})),
        )
        response = submit(gw)
        assert response.status_code == 400
        assert fake_upstream.requests_to("POST", SUBMIT)[0].header("authorization") == "Bearer sk-spare-0002"
        assert response.json()["error"]["message"] == "keys sk-*** and sk-***"
        assert response.headers["x-ratelimit-echo"] == "keys sk-*** and sk-***"
        services.log.error("operator_note", detail=f"pasted {echo}")
        assert any(line.get("event") == "operator_note" for line in gw.log_lines())
        assert "sk-new-main" not in gw.logs.getvalue() and "sk-old-main" not in gw.logs.getvalue()


class TestRemovedAccount:
    def test_removed_account_is_reported(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Tasks left on an account no longer configured: a start-up warning with the count, listed as removed."""
        KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env("old=sk-acct-a"))
        task_id = submit(gw).json()["task_id"]
        gw.client.close()
        again = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env("b=sk-acct-b"))
        warnings = [line for line in again.log_lines() if line.get("event") == "upstream_account_removed"]
        assert [(w["account"], w["unfinished_tasks"]) for w in warnings] == [("old", 1)]
        rows = accounts_of(again)
        assert rows["old"]["state"] == "removed" and rows["old"]["in_flight"] == 1
        assert rows["old"]["key_fingerprint"] is None
        response = again.client.get(f"/v1/videos/{task_id}")
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_unavailable")


class TestReplicas:
    def test_two_replicas_never_exceed_max_in_flight(
        self,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        postgres_schema_url: str,
        redis_url: str,
        redis_prefix: str,
    ) -> None:
        """Two gateways on one PostgreSQL schema and Redis, concurrent submissions: the account's limit holds."""
        kling = KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        env = accounts_env(
            settings='{"a": {"max_in_flight": 3}, "b": {"max_in_flight": 2}}',
            KLING_GATEWAY_STORE_URL=postgres_schema_url,
            KLING_GATEWAY_CACHE_URL=redis_url,
            KLING_GATEWAY_CACHE_KEY_PREFIX=redis_prefix,
        )
        replicas = [make_gateway(fake_upstream.url, upstream_key="", env=env) for _ in range(2)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: submit(replicas[n % 2]), range(16)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * 5 + [429] * 11
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"upstream_capacity"}
        assert fake_upstream.calls("POST", SUBMIT) == 5
        assert kling.running("sk-acct-a") == 3 and kling.running("sk-acct-b") == 2
        rows = accounts_of(replicas[1])
        assert (rows["a"]["in_flight"], rows["b"]["in_flight"]) == (3, 2)


class TestSharedSetAside:
    @pytest.mark.parametrize("backend", ["sqlite", "postgresql", "postgresql+redis"])
    def test_a_refusal_on_one_replica_sets_the_account_aside_on_the_other(
        self, backend: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, request: pytest.FixtureRequest
    ) -> None:
        """Replica one is refused by a (capacity) and b (key rejected); within about a second replica two skips
        both without asking the upstream, and GET /gateway/accounts there shows them set aside."""
        kling = KlingAccounts({"sk-acct-a": 1, "sk-acct-b": 0, "sk-acct-c": 0}).install(fake_upstream)
        kling.revoked.add("sk-acct-b")
        httpx.post(fake_upstream.url + SUBMIT, json=BODY, headers={"Authorization": "Bearer sk-acct-a"})  # elsewhere
        env = accounts_env("a=sk-acct-a,b=sk-acct-b,c=sk-acct-c")
        if backend.startswith("postgresql"):  # else both use the default SQLite file of the one data dir
            env["KLING_GATEWAY_STORE_URL"] = request.getfixturevalue("postgres_schema_url")
        if backend.endswith("redis"):
            env["KLING_GATEWAY_CACHE_URL"] = request.getfixturevalue("redis_url")
            env["KLING_GATEWAY_CACHE_KEY_PREFIX"] = request.getfixturevalue("redis_prefix")
        one, two = (
            make_gateway(fake_upstream.url, upstream_key="", env=env),
            make_gateway(fake_upstream.url, upstream_key="", env=env),
        )
        response = submit(one)
        assert response.status_code == 200 and kling.owner[response.json()["task_id"]] == "sk-acct-c"
        assert kling.refusals == [("sk-acct-a", 429), ("sk-acct-b", 401)]
        seen_at = time.monotonic()
        pool = two.client.app.state.services.accounts  # type: ignore[attr-defined]
        while {row["name"]: row["state"] for row in pool.describe()} != {"a": "full", "b": "unauthorized", "c": "ok"}:
            assert time.monotonic() - seen_at < 2.5, pool.describe()
            time.sleep(0.05)
        assert time.monotonic() - seen_at < 1.6  # one read a second, plus a little
        answer = submit(two)
        assert answer.status_code == 200 and kling.owner[answer.json()["task_id"]] == "sk-acct-c"
        assert len(kling.refusals) == 2  # replica two asked neither a nor b
        states = {name: row["state"] for name, row in accounts_of(two).items()}
        assert states == {"a": "full", "b": "unauthorized", "c": "ok"}
        assert two.metric("kling_gateway_upstream_account_unauthorized", {"account": "b"}) == 1

    def test_one_account_rejected_on_one_replica_is_refused_on_the_other(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A single account without a limit, two gateways on one store: after one sees a 401, the other answers
        502 upstream_auth_failed without an upstream call within about a second."""
        KlingAccounts({"sk-good": 0}).install(fake_upstream)
        one, two = (make_gateway(fake_upstream.url, upstream_key="sk-revoked") for _ in range(2))
        assert submit(one).json()["error"]["code"] == "upstream_auth_failed"
        pool = two.client.app.state.services.accounts  # type: ignore[attr-defined]
        deadline = time.monotonic() + 2.5
        while not pool.unauthorized("default"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = submit(two)
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert fake_upstream.calls("POST", SUBMIT) == 1


class TestUsageByAccount:
    def test_admin_usage_by_account(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """/gateway/usage?by=account groups by account for the admin; a client key asking for it gets 400."""
        KlingAccounts({"sk-acct-a": 0, "sk-acct-b": 0}).install(fake_upstream)
        gw = make_gateway(fake_upstream.url, upstream_key="", env=accounts_env(KLING_GATEWAY_AUTH_MODE="keys"))
        secret = gw.create_key("team")
        for _ in range(3):
            assert gw.client.post(SUBMIT, json=BODY, headers=gw.as_key(secret)).status_code == 200
        report = gw.client.get("/gateway/usage?by=account", headers=ADMIN)
        assert report.status_code == 200
        assert {row["account"]: row["tasks"] for row in report.json()["rows"]} == {"a": 2, "b": 1}
        refused = gw.client.get("/gateway/usage?by=account", headers=gw.as_key(secret))
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_parameter")
