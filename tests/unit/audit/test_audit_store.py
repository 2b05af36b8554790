"""The audit trail in both stores: append, newest-first pages with cursors, ``since``, and copy-store."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.audit.trail import KEY_CREATED, KEY_REVOKED, Actor, record
from gateway.store import open_store
from gateway.store.base import AuditRecord, Store
from gateway.store.copy import copy_store

T0 = 1_767_225_600.0


async def fill(store: Store, n: int) -> list[AuditRecord]:
    return [
        await record(store, Actor.admin_api("10.0.0.7"), KEY_CREATED, f"team-{i}", {"rpm": i}, now=T0 + i // 2)
        for i in range(n)
    ]


async def test_round_trip(store: Store) -> None:
    written = await record(
        store, Actor("cli:ops"), KEY_REVOKED, "team-a", {"revoked_at": T0, "models": ["kling-*"]}, now=T0
    )
    [read], cursor = await store.audit_list(None)
    assert read == written and cursor is None
    assert (read.actor, read.address, read.action, read.target) == ("cli:ops", None, "key.revoked", "team-a")
    assert read.changes == {"revoked_at": T0, "models": ["kling-*"]}


async def test_pages_newest_first_without_gaps_or_repeats(store: Store) -> None:
    """Seven rows (several sharing a timestamp) in pages of three: every row once, newest first."""
    written = await fill(store, 7)
    seen: list[AuditRecord] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await store.audit_list(None, 3, cursor)
        seen += page
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert sorted(e.audit_id for e in seen) == sorted(e.audit_id for e in written)
    assert [e.at for e in seen] == sorted((e.at for e in written), reverse=True)


async def test_since_is_inclusive(store: Store) -> None:
    await fill(store, 6)  # at T0, T0, T0+1, T0+1, T0+2, T0+2
    page, _ = await store.audit_list(T0 + 1, 50)
    assert sorted(e.target for e in page) == ["team-2", "team-3", "team-4", "team-5"]


@pytest.mark.parametrize("cursor", ["garbage!", "bm90IGEgY3Vyc29y"])
async def test_foreign_cursor_is_value_error(store: Store, cursor: str) -> None:
    with pytest.raises(ValueError):
        await store.audit_list(None, 10, cursor)


@pytest.mark.parametrize("limit", [0, 1001])
async def test_limit_bounds(store: Store, limit: int) -> None:
    with pytest.raises(ValueError):
        await store.audit_list(None, limit)


@pytest.mark.parametrize("field", ["key", "secret", "key_hash", "previous_hash", "token", "password"])
async def test_secret_fields_are_refused(store: Store, field: str) -> None:
    with pytest.raises(ValueError, match="secrets"):
        await record(store, Actor("cli:ops"), KEY_CREATED, "team-a", {field: "x"}, now=T0)
    assert (await store.audit_list(None))[0] == []


async def test_copy_store_copies_the_trail(store: Store, tmp_path: Path) -> None:
    written = await fill(store, 5)
    destination = await open_store(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        report = await copy_store(store, destination)
        copied, _ = await destination.audit_list(None, 100)
    finally:
        await destination.close()
    assert report.audit == 5
    assert sorted(copied, key=lambda e: e.audit_id) == sorted(written, key=lambda e: e.audit_id)


def test_cli_actor_names_the_os_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "operator-jo")
    assert Actor.cli() == Actor("cli:operator-jo", None)
