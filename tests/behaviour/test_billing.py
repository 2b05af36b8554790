"""Billing end to end: estimates, settlement, budgets, and usage reports agreeing with /metrics to the cent."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, dynamic, json

from gateway.cli.main import main

SUBMIT = "/v1/video/generations"
KEYS_MODE = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0"}
IMAGE = "https://example.com/first.png"
LAST = "https://example.com/last.png"


class World:
    """A scripted upstream whose tasks' statuses the test sets."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.statuses: dict[str, dict[str, Any]] = {}
        counter = itertools.count(1)

        def accept(request: Any) -> Any:
            task_id = f"task_{next(counter)}"
            self.statuses[task_id] = {"status": "queued", "progress": 0}
            return json(200, {"id": task_id, "task_id": task_id, "status": "queued", "progress": 0})

        def status(request: Any) -> Any:
            task_id = request.path.rsplit("/", 1)[-1]
            return json(200, {"id": task_id, "task_id": task_id, **self.statuses[task_id]})

        fake.always("POST", SUBMIT, dynamic(accept))
        fake.always("GET", "/v1/videos/", dynamic(status))


def body(model: str, mode: str, duration: int | None) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "prompt": "a lighthouse at dusk"}
    if duration is not None:
        request["duration"] = duration
    if mode in ("image", "first_last"):
        request["image"] = IMAGE
    if mode == "first_last":
        request["last_image"] = LAST
    return request


def metric_sum(gw: GatewayHarness, name: str, **labels: str) -> Decimal:
    """Sum of a metric's samples whose labels include ``labels`` (as Decimal, via its text form)."""
    total = Decimal(0)
    for family in gw.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += Decimal(repr(sample.value))
    return total


def cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"))


class TestScriptedDay:
    def test_usage_report_metrics_and_hand_computation_agree(
        self,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Three keys, four models, three modes: CLI usage, /metrics and a hand computation agree to the cent."""
        world = World(fake_upstream)
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        keys = {name: gw.as_key(gw.create_key(name)) for name in ("team-a", "team-b", "team-c")}
        # (key, model, mode, requested duration, final status, reported seconds)
        day = [
            ("team-a", "kling-v3-std-silent", "text", 5, "completed", 5),  # 0.084 * 5 = 0.42
            ("team-a", "kling-v3-pro-audio", "image", 10, "completed", 9),  # 0.168 * 9 = 1.512 (est. 1.68)
            ("team-b", "kling-v3-std-audio", "first_last", 8, "failed", None),  # 0 (est. 1.008)
            ("team-b", "kling-v3-pro-silent", "text", None, "completed", 10),  # over the default 5 s: 0.112 * 5 = 0.56
            ("team-c", "kling-v3-pro-audio", "image", 3, "in_progress", None),  # outstanding est. 0.504
            ("team-c", "kling-v3-std-silent", "first_last", 15, "completed", None),  # 0.084 * 15 = 1.26
        ]
        task_ids = []
        for key, model, mode, duration, _, _ in day:
            response = gw.client.post(SUBMIT, json=body(model, mode, duration), headers=keys[key])
            assert response.status_code == 200, response.text
            if duration is None:
                assert "duration_defaulted" in response.headers["x-gateway-warning"]
            task_ids.append(response.json()["task_id"])
        for task_id, (key, _, _, _, final, seconds) in zip(task_ids, day, strict=True):
            assert gw.client.get(f"/v1/videos/{task_id}", headers=keys[key]).json()["status"] == "queued"
            world.statuses[task_id] = {"status": "in_progress", "progress": 50}
            gw.client.get(f"/v1/videos/{task_id}", headers=keys[key])
            world.statuses[task_id] = {"status": final, "progress": 100 if final == "completed" else 50}
            if seconds is not None:
                world.statuses[task_id]["seconds"] = seconds
            for _ in range(3):  # repeated polls never settle twice
                gw.client.get(f"/v1/videos/{task_id}", headers=keys[key])

        hand_settled = {"team-a": Decimal("1.932"), "team-b": Decimal("0.56"), "team-c": Decimal("1.26")}
        hand_estimated = {"team-a": Decimal("2.10"), "team-b": Decimal("1.568"), "team-c": Decimal("1.764")}
        hand_cost = {"team-a": Decimal("1.932"), "team-b": Decimal("0.56"), "team-c": Decimal("1.764")}

        monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
        assert main(["usage", "--by", "key,model", "--format", "json"]) == 0
        report = orjson.loads(capsys.readouterr().out)
        for key in hand_settled:
            rows = [row for row in report["rows"] if row["key"] == key]
            settled = sum(Decimal(row["settled_usd"]) for row in rows)
            estimated = sum(Decimal(row["estimated_usd"]) for row in rows)
            cost = sum(Decimal(row["cost_usd"]) for row in rows)
            assert (settled, estimated, cost) == (hand_settled[key], hand_estimated[key], hand_cost[key])
            assert cents(metric_sum(gw, "kling_gateway_settled_cost_usd_total", key=key)) == cents(settled)
            assert cents(metric_sum(gw, "kling_gateway_estimated_cost_usd_total", key=key)) == cents(estimated)
        assert Decimal(report["totals"]["settled_usd"]) == Decimal("3.752")
        assert report["totals"]["tasks"] == 6 and report["totals"]["pending"] == 1
        assert report["totals"]["failed"] == 1 and report["totals"]["defaulted"] == 1

        settled_count = metric_sum(gw, "kling_gateway_tasks_settled_total")
        assert settled_count == 5
        assert metric_sum(gw, "kling_gateway_tasks_settled_total", outcome="failed") == 1
        assert metric_sum(gw, "kling_gateway_generations_total") == 6
        assert metric_sum(gw, "kling_gateway_generations_total", mode="first_last") == 2
        assert metric_sum(gw, "kling_gateway_generation_seconds_total", key="team-b") == 13  # 8 + default 5
        assert metric_sum(gw, "kling_gateway_tasks_in_flight") == 1

        # The HTTP usage endpoint says the same as the CLI for the caller, and everything for the admin.
        own = gw.client.get("/gateway/usage?by=model", headers=keys["team-a"]).json()
        assert Decimal(own["totals"]["settled_usd"]) == hand_settled["team-a"]
        assert "key" not in own["rows"][0]
        everyone = gw.client.get("/gateway/usage", headers=ADMIN).json()
        assert everyone["totals"] == report["totals"]

    def test_completed_task_answered_from_ledger_after_restart(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """After a restart, a completed task's status comes from the ledger with zero upstream calls."""
        world = World(fake_upstream)
        first = make_gateway(fake_upstream.url, env=KEYS_MODE)
        secret = first.create_key("team-a")
        task_id = first.client.post(SUBMIT, json=body("kling-v3-std-silent", "text", 5), headers=first.as_key(secret))
        task_id = task_id.json()["task_id"]
        world.statuses[task_id] = {"status": "completed", "progress": 100, "video_url": "https://x/v.mp4"}
        assert first.client.get(f"/v1/videos/{task_id}", headers=first.as_key(secret)).json()["status"] == "completed"
        calls = fake_upstream.calls("GET", f"/v1/videos/{task_id}")
        restarted = make_gateway(fake_upstream.url, env=KEYS_MODE)  # a new process on the same store
        answer = restarted.client.get(f"/v1/videos/{task_id}", headers=restarted.as_key(secret))
        assert answer.json()["video_url"] == "https://x/v.mp4" and answer.headers["x-cache"] == "HIT"
        assert fake_upstream.calls("GET", f"/v1/videos/{task_id}") == calls
        assert metric_sum(restarted, "kling_gateway_tasks_settled_total") == 0


class TestBudgets:
    def test_budget_exhaustion_and_month_rollover(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Past the monthly budget a submission is 429 budget_exceeded with the numbers; a new month resets it."""
        World(fake_upstream)
        now = [datetime(2026, 1, 31, 23, 0, tzinfo=UTC).timestamp()]
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE, clock=lambda: now[0])
        secret = gw.create_key("team-a", monthly_budget_usd="1.00")
        request = body("kling-v3-std-silent", "text", 5)  # 0.42 each
        assert [gw.client.post(SUBMIT, json=request, headers=gw.as_key(secret)).status_code for _ in range(2)] == [
            200,
            200,
        ]
        refused = gw.client.post(SUBMIT, json=request, headers=gw.as_key(secret))
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "budget_exceeded")
        message = refused.json()["error"]["message"]
        assert "$1.0000" in message and "$0.8400" in message and "$0.4200" in message
        assert int(refused.headers["retry-after"]) == 3600
        assert gw.metric("kling_gateway_key_budget_usd", {"key": "team-a"}) == 1.0
        assert gw.metric("kling_gateway_key_spend_usd", {"key": "team-a"}) == pytest.approx(0.84)
        assert fake_upstream.calls("POST", SUBMIT) == 2
        now[0] = datetime(2026, 2, 1, 0, 30, tzinfo=UTC).timestamp()
        assert gw.client.post(SUBMIT, json=request, headers=gw.as_key(secret)).status_code == 200

    def test_failed_tasks_free_their_budget(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A failed task settles at zero, so its estimate no longer counts against the budget."""
        world = World(fake_upstream)
        gw = make_gateway(fake_upstream.url, env=KEYS_MODE)
        secret = gw.create_key("team-a", monthly_budget_usd="0.50")
        request = body("kling-v3-std-silent", "text", 5)
        task_id = gw.client.post(SUBMIT, json=request, headers=gw.as_key(secret)).json()["task_id"]
        assert gw.client.post(SUBMIT, json=request, headers=gw.as_key(secret)).status_code == 429
        world.statuses[task_id] = {"status": "failed", "progress": 20}
        gw.client.get(f"/v1/videos/{task_id}", headers=gw.as_key(secret))
        assert gw.client.post(SUBMIT, json=request, headers=gw.as_key(secret)).status_code == 200
