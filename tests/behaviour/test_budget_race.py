"""Budgets hold under concurrency: two gateways on one store (the SQLite file ``--workers N`` shares, or one
PostgreSQL schema as replicas do) taking concurrent submissions on one budgeted key never pass the budget."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, fresh_task, json, slow

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}  # $0.42
BUDGET = Decimal(1)
ENV = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_AUTH_REFRESH_INTERVAL_S": "0.05"}


def two_gateways(make_gateway: GatewayFactory, fake: FakeUpstream, store_url: str | None) -> list[GatewayHarness]:
    env = dict(ENV) if store_url is None else {**ENV, "KLING_GATEWAY_STORE_URL": store_url}
    return [make_gateway(fake.url, env=env), make_gateway(fake.url, env=env)]


def shared_key(a: GatewayHarness, b: GatewayHarness, budget: str) -> dict[str, str]:
    """A budgeted key issued on ``a``, once ``b`` has picked it up from the store."""
    headers = a.as_key(a.create_key("team", monthly_budget_usd=budget))
    deadline = time.monotonic() + 3
    while b.client.get("/gateway/tasks", headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "the second gateway never saw the key"
        time.sleep(0.02)
    return headers


def race(gateways: list[GatewayHarness], headers: dict[str, str], per_gateway: int) -> list[int]:
    """``per_gateway`` submissions at once through each gateway; their statuses."""
    jobs = [gw for gw in gateways for _ in range(per_gateway)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda gw: gw.client.post(SUBMIT, json=BODY, headers=headers).status_code, jobs))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
class TestConcurrentBudget:
    def test_never_overshoots(
        self, backend: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, request: pytest.FixtureRequest
    ) -> None:
        """8 concurrent $0.42 submissions on a $1 budget across two gateways: exactly 2 accepted, 6 refused with
        429 budget_exceeded, the ledger's estimates within the budget, and nothing held afterwards."""
        store_url = None if backend == "sqlite" else request.getfixturevalue("postgres_schema_url")
        fake_upstream.always("POST", SUBMIT, slow(0.3, fresh_task()))  # every submission in flight at once
        a, b = two_gateways(make_gateway, fake_upstream, store_url)
        headers = shared_key(a, b, str(BUDGET))
        statuses = race([a, b], headers, per_gateway=4)
        assert sorted(statuses) == [200, 200] + [429] * 6
        tasks = a.client.get("/gateway/tasks", headers=ADMIN).json()["data"]
        assert len(tasks) == 2 and sum(Decimal(t["estimate"]["usd"]) for t in tasks) <= BUDGET
        assert len(fake_upstream.requests_to("POST", SUBMIT)) == 2
        # the holds are gone: the room left ($0.16) is still refused, a cheaper request fits
        cheap = {**BODY, "duration": 3, "model": "kling-v3-std-silent"}  # $0.252: over the $0.16 left
        assert b.client.post(SUBMIT, json=cheap, headers=headers).status_code == 429

    def test_refused_submission_releases_its_hold(
        self, backend: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, request: pytest.FixtureRequest
    ) -> None:
        """A submission the upstream refuses (or that fails) gives its hold back: the budget is whole again."""
        store_url = None if backend == "sqlite" else request.getfixturevalue("postgres_schema_url")
        fake_upstream.script("POST", SUBMIT, json(400, {"error": {"message": "no"}}), json(500, {"error": {}}))
        fake_upstream.always("POST", SUBMIT, fresh_task())
        a, b = two_gateways(make_gateway, fake_upstream, store_url)
        headers = shared_key(a, b, "0.5")
        assert a.client.post(SUBMIT, json=BODY, headers=headers).status_code == 400
        assert b.client.post(SUBMIT, json=BODY, headers=headers).status_code == 500
        assert a.client.post(SUBMIT, json=BODY, headers=headers).status_code == 200
        denied = b.client.post(SUBMIT, json=BODY, headers=headers)
        assert (denied.status_code, denied.json()["error"]["code"]) == (429, "budget_exceeded")
