"""``kling-gateway accounts`` and the start-up errors of the account variables."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from gateway.accounts.parse import fingerprint
from gateway.cli.main import main
from gateway.store import open_store


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data dir, and no configuration from the caller's environment."""
    for name in list(os.environ):
        if name.startswith("KLING_GATEWAY_") or name.startswith("UNIALL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_table_and_json(data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Both formats list every account with its limit and fingerprint, never a key."""
    monkeypatch.setenv("UNIALL_API_KEYS", "main=sk-main-secret,spare=sk-spare-secret")
    monkeypatch.setenv("KLING_GATEWAY_UPSTREAM_ACCOUNTS", '{"main": {"max_in_flight": 4, "weight": 2}}')
    assert main(["accounts"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "name",
        "state",
        "in_flight",
        "max_in_flight",
        "weight",
        "models",
        "key_fingerprint",
    ]
    assert table.splitlines()[1].split() == ["main", "ok", "0", "4", "2", "*", fingerprint("sk-main-secret")]
    assert main(["accounts", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["data"]
    assert [(r["name"], r["max_in_flight"], r["weight"]) for r in rows] == [("main", 4, 2.0), ("spare", 0, 1.0)]
    assert "secret" not in table


def test_shows_the_running_gateways_set_asides(
    data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The marks the gateways share in the store: a capacity set-aside reads full; a rejected key reads
    unauthorized while it is the key configured here."""
    url = f"sqlite:///{data_env / 'marks.db'}"

    async def mark() -> None:
        store = await open_store(url)
        try:
            await store.mark_account_aside("main", time.time() + 600, time.time())
            await store.mark_account_unauthorized("spare", fingerprint("sk-spare-secret"), time.time())
            await store.mark_account_unauthorized("third", fingerprint("sk-an-older-key"), time.time())
        finally:
            await store.close()

    asyncio.run(mark())
    monkeypatch.setenv("KLING_GATEWAY_STORE_URL", url)
    monkeypatch.setenv("UNIALL_API_KEYS", "main=sk-main-secret,spare=sk-spare-secret,third=sk-third-secret")
    assert main(["accounts", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["data"]
    assert {r["name"]: r["state"] for r in rows} == {"main": "full", "spare": "unauthorized", "third": "ok"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"UNIALL_API_KEY": "sk-x", "UNIALL_API_KEYS": "a=sk-y"}, "UNIALL_API_KEYS: set only one of"),
        ({"UNIALL_API_KEYS": "a=sk-y,a=sk-z"}, "UNIALL_API_KEYS: item 2: account 'a' named twice"),
        ({"UNIALL_API_KEYS_FILE": "/nonexistent/keys"}, "UNIALL_API_KEYS_FILE: cannot read"),
        (
            {"UNIALL_API_KEYS": "main=sk-y", "KLING_GATEWAY_UPSTREAM_ACCOUNTS": '{"mian": {"weight": 2}}'},
            "upstream.accounts.mian: no such account in UNIALL_API_KEYS; did you mean 'main'?",
        ),
    ],
)
def test_startup_errors_exit_2(
    data_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    message: str,
) -> None:
    """A bad account variable: one line naming it, exit 2, no key in it."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert "sk-" not in err
