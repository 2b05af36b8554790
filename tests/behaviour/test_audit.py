"""The audit trail end to end: admin API and CLI actions recorded once each, read back paged, never a secret."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from support.harness import ADMIN, ADMIN_TOKEN, SANDBOX_API_KEY, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream

from gateway.cli.main import main

KEYS_MODE = {"KLING_GATEWAY_AUTH_MODE": "keys"}


@pytest.fixture
def gw(fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> GatewayHarness:
    return make_gateway(fake_upstream.url, env=KEYS_MODE)


def audit(gw: GatewayHarness, query: str = "") -> dict[str, Any]:
    response = gw.client.get(f"/gateway/audit{query}", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def dump(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return "\n".join(conn.iterdump())


class TestAdminApi:
    def test_each_action_recorded_once_with_its_fields(self, gw: GatewayHarness, tmp_path: Path) -> None:
        created = gw.client.post(
            "/gateway/keys",
            json={
                "name": "team-a",
                "models": ["kling-v3-std-*"],
                "rpm": 60,
                "monthly_budget_usd": "25.50",
                "webhook_url": "https://hooks.example.com/done",
            },
            headers=ADMIN,
        )
        assert created.status_code == 201, created.text
        first_secret = created.json()["key"]
        rotated = gw.client.post("/gateway/keys/team-a/rotate?grace_s=60", headers=ADMIN)
        second_secret = rotated.json()["key"]
        assert gw.client.delete("/gateway/keys/team-a", headers=ADMIN).status_code == 200
        assert gw.client.delete("/gateway/keys/team-a", headers=ADMIN).status_code == 200  # changes nothing
        assert gw.client.post("/gateway/keys/ghost/rotate", headers=ADMIN).status_code == 404  # nothing done

        entries = audit(gw)["data"]
        assert [e["action"] for e in entries] == ["key.revoked", "key.rotated", "key.created"]
        revoked, rotation, creation = entries
        for entry in entries:
            assert (entry["actor"], entry["address"], entry["target"]) == ("admin-token", "testclient", "team-a")
        assert creation["changes"] == {
            "models": ["kling-v3-std-*"],
            "rpm": 60,
            "monthly_budget_usd": "25.50",
            "webhook_url": "https://hooks.example.com/done",
        }
        assert rotation["changes"] == {"previous_secret_valid_until": pytest.approx(rotation["at"] + 60)}
        assert revoked["changes"] == {"revoked_at": revoked["at"]}

        table = dump(tmp_path / "data" / "gateway.db")
        assert 'INSERT INTO "audit_log"' in table
        audit_rows = "\n".join(line for line in table.splitlines() if "audit_log" in line)
        for secret in (first_secret, second_secret, ADMIN_TOKEN, SANDBOX_API_KEY):
            assert secret not in audit_rows
            assert secret not in json.dumps(entries)

    def test_update_records_only_the_changed_fields(self, gw: GatewayHarness) -> None:
        gw.create_key("team-a", rpm=10)
        response = gw.client.patch(
            "/gateway/keys/team-a", json={"rpm": 90, "monthly_budget_usd": "12.5"}, headers=ADMIN
        )
        assert response.status_code == 200, response.text
        assert gw.client.patch("/gateway/keys/ghost", json={"rpm": 1}, headers=ADMIN).status_code == 404
        updated, created = audit(gw)["data"]
        assert (updated["action"], created["action"]) == ("key.updated", "key.created")
        assert updated["changes"] == {"rpm": 90, "monthly_budget_usd": "12.5"}
        assert (updated["actor"], updated["target"]) == ("admin-token", "team-a")

    def test_paging_and_since(self, gw: GatewayHarness) -> None:
        for i in range(5):
            gw.create_key(f"team-{i}")
        first = audit(gw, "?limit=2")
        second = audit(gw, f"?limit=2&cursor={first['next_cursor']}")
        third = audit(gw, f"?limit=2&cursor={second['next_cursor']}")
        assert third["next_cursor"] is None
        names = [e["target"] for page in (first, second, third) for e in page["data"]]
        assert sorted(names) == [f"team-{i}" for i in range(5)] and len(names) == 5
        assert audit(gw, "?since=2000-01-01")["data"] != []
        assert audit(gw, "?since=2999-01-01")["data"] == []

    @pytest.mark.parametrize(
        ("query", "code"),
        [
            ("?limit=0", "invalid_parameter"),
            ("?limit=x", "invalid_parameter"),
            ("?since=yesterday-ish", "invalid_parameter"),
            ("?cursor=not-ours", "invalid_cursor"),
        ],
    )
    def test_bad_parameters_are_400(self, gw: GatewayHarness, query: str, code: str) -> None:
        response = gw.client.get(f"/gateway/audit{query}", headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (400, code)

    def test_admin_only(self, gw: GatewayHarness) -> None:
        secret = gw.create_key("team-a")
        for headers in ({}, {"Authorization": f"Bearer {secret}"}, {"Authorization": "Bearer wrong"}):
            response = gw.client.get("/gateway/audit", headers=headers)
            assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_admin_token")

    def test_absent_without_an_admin_token(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_ADMIN_TOKEN": ""})
        response = gw.client.get("/gateway/audit", headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (404, "not_found")


class TestAdminUi:
    def test_ui_actions_are_recorded_as_the_ui(self, gw: GatewayHarness) -> None:
        """The web UI goes through key_admin too: its actions are recorded as admin-ui, once each."""
        signed_in = gw.client.post("/gateway/ui/signin", data={"token": ADMIN_TOKEN}, follow_redirects=False)
        assert signed_in.status_code == 303, signed_in.text
        match = re.search(r'name="csrf" value="([^"]+)"', gw.client.get("/gateway/ui/keys").text)
        assert match is not None
        csrf = match.group(1)
        created = gw.client.post("/gateway/ui/keys", data={"csrf": csrf, "name": "team-ui", "rpm": "30"})
        assert created.status_code < 300 and "Key created" in created.text
        assert gw.client.post("/gateway/ui/keys/team-ui/rotate", data={"csrf": csrf}).status_code == 200
        assert gw.client.post("/gateway/ui/keys/team-ui/revoke", data={"csrf": csrf}).status_code == 200
        entries = audit(gw)["data"]
        assert [(e["action"], e["actor"], e["address"], e["target"]) for e in entries] == [
            ("key.revoked", "admin-ui", "testclient", "team-ui"),
            ("key.rotated", "admin-ui", "testclient", "team-ui"),
            ("key.created", "admin-ui", "testclient", "team-ui"),
        ]
        assert entries[2]["changes"]["rpm"] == 30
        assert ADMIN_TOKEN not in json.dumps(entries) and csrf not in json.dumps(entries)


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith(("KLING_GATEWAY_", "UNIALL_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOGNAME", "operator-jo")
    return tmp_path


class TestCli:
    def test_cli_actions_name_the_os_user(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["keys", "create", "team-a", "--rpm", "30"]) == 0
        secret = capsys.readouterr().out.strip().splitlines()[-1]
        assert main(["keys", "rotate", "team-a", "--grace-s", "0"]) == 0
        rotated = capsys.readouterr().out.strip().splitlines()[-1]
        assert main(["keys", "revoke", "team-a"]) == 0
        assert main(["keys", "revoke", "ghost"]) == 1
        capsys.readouterr()

        assert main(["audit", "--format", "json"]) == 0
        entries = json.loads(capsys.readouterr().out)["data"]
        assert [(e["action"], e["actor"], e["address"], e["target"]) for e in entries] == [
            ("key.revoked", "cli:operator-jo", None, "team-a"),
            ("key.rotated", "cli:operator-jo", None, "team-a"),
            ("key.created", "cli:operator-jo", None, "team-a"),
        ]
        assert entries[2]["changes"]["rpm"] == 30

        assert main(["audit"]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == ["at", "actor", "address", "action", "target", "changes"]
        assert "key.rotated" in table and "rpm=30" in table
        for text in (table, dump(data_env / "data" / "gateway.db")):
            assert secret not in text and rotated not in text

    def test_since(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["keys", "create", "team-a"]) == 0
        capsys.readouterr()
        assert main(["audit", "--since", "2999-01-01"]) == 0
        assert capsys.readouterr().out.strip() == "no admin actions recorded since then"
        assert main(["audit", "--since", "1d", "--format", "json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["data"]) == 1

    def test_bad_since_exits_1(self, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["audit", "--since", "whenever"]) == 1
        assert "--since" in capsys.readouterr().err
