"""The store on both backends: keys, intents, the ledger, usage and idempotency; SQLite files, group commit.

Backend-agnostic tests take the ``store`` fixture (or ``backend_url`` to open several stores on one database),
both parametrized over SQLite and PostgreSQL; the PostgreSQL runs are skipped when no server is reachable
(see ``postgres_url`` in conftest). PostgreSQL-only behaviour is in ``test_store_postgres.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from support.paths import REPO_ROOT

from gateway.keys import KeyRecord, hash_secret, issue_key, new_secret
from gateway.store import open_store
from gateway.store.base import (
    Admission,
    HoldRequest,
    IdemKind,
    IntentOutcome,
    KeyExists,
    KeyNotFound,
    KeyRevoked,
    OutboxEntry,
    OutboxRecord,
    Settlement,
    Store,
    StoreError,
    TaskRecord,
    UsageRow,
    from_fixed,
    to_fixed,
)
from gateway.store.rows import decode_cursor, encode_cursor
from gateway.store.sqlite import MIGRATIONS, SQLiteStore

ADMITTED = IntentOutcome(Admission.ADMITTED)
DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
PRICES = {
    "kling-v3-std-silent": Decimal("0.084"),
    "kling-v3-std-audio": Decimal("0.126"),
    "kling-v3-pro-silent": Decimal("0.112"),
    "kling-v3-pro-audio": Decimal("0.168"),
}


def db_url(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute, so this is the four-slash form


def make_task(
    task_id: str,
    *,
    key: str = "team-a",
    model: str = "kling-v3-std-silent",
    mode: str = "text",
    seconds: int | None = 5,
    at: float = T0,
    default_s: int = 5,
) -> TaskRecord:
    """A task as the submission path would record it, priced from the public list prices."""
    price = PRICES[model]
    estimate_seconds = seconds if seconds is not None else default_s
    return TaskRecord(
        task_id=task_id,
        key_name=key,
        model=model,
        mode=mode,
        tier=model.split("-")[2],
        audio=model.endswith("audio"),
        duration=seconds,
        duration_defaulted=seconds is None,
        estimate_seconds=estimate_seconds,
        estimate_usd=price * estimate_seconds,
        price_per_second_usd=price,
        mode_multiplier=Decimal("1"),
        request_id=f"req-{task_id}",
        submitted_at=at,
    )


async def add_task(store: Store, task: TaskRecord) -> None:
    await store.record_intent(
        f"intent-{task.task_id}", task.key_name, task.request_id, task.model, task.mode, task.submitted_at
    )
    assert await store.resolve_intent(f"intent-{task.task_id}", task)


async def first(settling: Awaitable[Settlement]) -> bool:
    """Whether the settlement awaited was the first (to count beside ``mark_unknown``'s plain answers)."""
    return (await settling).first


class TestOpen:
    @pytest.mark.parametrize(
        ("url", "fragment"),
        [
            ("postgresql://gateway:s3cret-pw@db.internal/gw?schema=no-dashes", "schema"),
            ("redis://:s3cret-pw@localhost:6379/0", "'redis'"),
            ("mysql://u:s3cret-pw@h/d", "'mysql'"),
            ("no-scheme-s3cret-pw", "must start with a scheme"),
            ("sqlite://host/s3cret-pw.db", "sqlite:///"),
            ("sqlite:///", "sqlite:///"),
            ("sqlite:///x.db?mode=s3cret-pw", "no query"),
        ],
    )
    async def test_bad_urls(self, url: str, fragment: str) -> None:
        """Unusable URLs are a ValueError that names the scheme or the expected form, never the secret."""
        with pytest.raises(ValueError, match=re.escape(fragment)) as info:
            await open_store(url)
        assert "s3cret" not in str(info.value)

    async def test_relative_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """sqlite:///rel/path.db is relative to the working directory; missing directories are created."""
        monkeypatch.chdir(tmp_path)
        store = await open_store("sqlite:///data/sub/gateway.db")
        await store.close()
        assert (tmp_path / "data" / "sub" / "gateway.db").is_file()

    async def test_absolute_path(self, tmp_path: Path) -> None:
        """sqlite:////abs/path.db is absolute."""
        target = tmp_path / "abs.db"
        store = await open_store("sqlite:///" + str(target))
        await store.close()
        assert target.is_file()

    async def test_memory(self) -> None:
        """sqlite:///:memory: works (tests), reads and writes on one connection."""
        store = await open_store("sqlite:///:memory:")
        try:
            await store.create_key(issue_key("mem", now=1.0)[1])
            assert [k.name for k in await store.list_keys()] == ["mem"]
        finally:
            await store.close()

    async def test_pragmas(self, tmp_path: Path) -> None:
        """The file is in WAL mode."""
        store = await open_store(db_url(tmp_path / "g.db"))
        await store.close()
        with sqlite3.connect(tmp_path / "g.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async def test_migrations_once(self, tmp_path: Path) -> None:
        """The first open applies every migration; reopening applies none and keeps the data."""
        url = db_url(tmp_path / "g.db")
        first = await SQLiteStore.open(str(tmp_path / "g.db"))
        assert first.applied_migrations == tuple(v for v, _ in MIGRATIONS)
        await first.create_key(issue_key("team-a", now=1.0)[1])
        await first.close()
        second = await open_store(url)
        assert isinstance(second, SQLiteStore)
        assert second.applied_migrations == ()
        assert [k.name for k in await second.list_keys()] == ["team-a"]
        await second.close()
        with sqlite3.connect(tmp_path / "g.db") as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
        assert versions == [v for v, _ in MIGRATIONS]

    async def test_concurrent_starts(self, tmp_path: Path) -> None:
        """Several processes starting at once on a new file: exactly one applies the migrations."""
        path = str(tmp_path / "g.db")
        stores = await asyncio.gather(*(SQLiteStore.open(path) for _ in range(6)))
        try:
            applied = sorted(s.applied_migrations for s in stores)
            assert applied[-1] == tuple(v for v, _ in MIGRATIONS)
            assert all(a == () for a in applied[:-1])
            assert await stores[0].keys_version() == 0
        finally:
            for s in stores:
                await s.close()

    async def test_busy_open_is_retried(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """SQLITE_BUSY while opening (another process migrating a new file) is retried on a fresh connection."""
        import gateway.store.sqlite as store_sqlite

        real_migrate = store_sqlite._migrate
        seen: list[int] = []

        def flaky(conn: sqlite3.Connection) -> tuple[int, ...]:
            seen.append(id(conn))
            if len(seen) < 3:
                raise sqlite3.OperationalError("database is locked")
            return real_migrate(conn)

        monkeypatch.setattr(store_sqlite, "_migrate", flaky)
        store = await SQLiteStore.open(str(tmp_path / "g.db"))
        try:
            assert len(seen) == 3
            assert store.applied_migrations == tuple(v for v, _ in MIGRATIONS)
        finally:
            await store.close()

    async def test_busy_open_gives_up_at_deadline(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file that stays locked past the open deadline is a StoreError naming the lock, not a hang."""
        import gateway.store.sqlite as store_sqlite

        def locked(conn: sqlite3.Connection) -> tuple[int, ...]:
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(store_sqlite, "_migrate", locked)
        monkeypatch.setattr(store_sqlite, "_OPEN_DEADLINE_S", 0.2)
        with pytest.raises(StoreError, match="database is locked"):
            await SQLiteStore.open(str(tmp_path / "g.db"))

    async def test_other_open_errors_not_retried(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Errors other than busy/locked fail the open at once."""
        import gateway.store.sqlite as store_sqlite

        calls: list[int] = []

        def corrupt(conn: sqlite3.Connection) -> tuple[int, ...]:
            calls.append(1)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store_sqlite, "_migrate", corrupt)
        with pytest.raises(StoreError, match="disk I/O error"):
            await SQLiteStore.open(str(tmp_path / "g.db"))
        assert calls == [1]

    async def test_newer_schema_refused(self, tmp_path: Path) -> None:
        """A database migrated by a newer gateway is not opened by an older one."""
        path = tmp_path / "g.db"
        await (await open_store(db_url(path))).close()
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
        with pytest.raises(StoreError, match="newer"):
            await open_store(db_url(path))

    async def test_unopenable_file(self, tmp_path: Path) -> None:
        """A path that cannot be a database is a StoreError."""
        (tmp_path / "dir.db").mkdir()
        with pytest.raises(StoreError):
            await open_store(db_url(tmp_path / "dir.db"))

    async def test_ping_and_close(self, backend_url: str) -> None:
        """ping answers True while open; after close it is False and other calls are StoreErrors."""
        store = await open_store(backend_url)
        assert await store.ping() is True
        await store.close()
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.list_keys()
        assert await store.ping() is False

    async def test_ping_false_when_broken(self, tmp_path: Path) -> None:
        """ping reports False (not an exception) when the database misbehaves."""
        store = await SQLiteStore.open(str(tmp_path / "g.db"))
        try:
            await store._writer.run(lambda conn: conn.close())
            assert await store.ping() is False
        finally:
            await store.close()

    async def test_driver_errors_wrapped(self, store: Store) -> None:
        """Driver errors surface as StoreError, never sqlite3 or asyncpg exceptions."""
        await store.record_intent("i1", "team-a", "r1", "m", "text", T0)
        with pytest.raises(StoreError):
            await store.record_intent("i1", "team-a", "r1", "m", "text", T0)


class TestKeys:
    async def test_create_get_list(self, store: Store) -> None:
        """A key round-trips with every field; list is ordered by name."""
        _, b = issue_key("team-b", now=2.0, rpm=30)
        _, a = issue_key(
            "team-a",
            now=1.5,
            models=("kling-v3-std-*", "kling-v3-pro-audio"),
            rpm=60,
            monthly_budget_usd=Decimal("250.0050"),
            webhook_url="https://hooks.example.com/x",
        )
        await store.create_key(b)
        await store.create_key(a)
        assert await store.get_key("team-a") == a
        assert await store.get_key("nobody") is None
        assert await store.list_keys() == [a, b]
        got = await store.get_key("team-a")
        assert got is not None
        assert str(got.monthly_budget_usd) == "250.0050"

    async def test_duplicate_name(self, store: Store) -> None:
        """A second key with the same name is KeyExists and leaves the first untouched."""
        _, first = issue_key("team-a", now=1.0)
        await store.create_key(first)
        version = await store.keys_version()
        with pytest.raises(KeyExists):
            await store.create_key(issue_key("team-a", now=2.0)[1])
        assert await store.get_key("team-a") == first
        assert await store.keys_version() == version

    async def test_find_by_hash(self, store: Store) -> None:
        """Lookup by hash finds the key; an unknown hash finds nothing."""
        secret, record = issue_key("team-a", now=1.0)
        await store.create_key(record)
        assert await store.find_key_by_hash(hash_secret(secret)) == record
        assert await store.find_key_by_hash("0" * 64) is None

    async def test_revoke(self, store: Store) -> None:
        """Revoking works once; unknown names and repeats return False."""
        _, record = issue_key("team-a", now=1.0)
        await store.create_key(record)
        assert await store.revoke_key("team-a", 10.0) is True
        assert await store.revoke_key("team-a", 11.0) is False
        assert await store.revoke_key("nobody", 11.0) is False
        got = await store.get_key("team-a")
        assert got is not None
        assert got.revoked_at == 10.0
        assert not got.accepts(record.key_hash, 12.0)

    async def test_rotate(self, store: Store) -> None:
        """Rotation swaps in the new hash and keeps the old one until the grace deadline."""
        _, record = issue_key("team-a", now=1.0)
        await store.create_key(record)
        fresh = new_secret()
        rotated = await store.rotate_key("team-a", fresh.key_hash, fresh.prefix, grace_until=100.0)
        assert rotated == replace(
            record,
            key_hash=fresh.key_hash,
            prefix=fresh.prefix,
            previous_hash=record.key_hash,
            previous_valid_until=100.0,
        )
        assert await store.find_key_by_hash(record.key_hash) == rotated
        assert await store.find_key_by_hash(fresh.key_hash) == rotated
        assert rotated.accepts(record.key_hash, 99.0)
        assert not rotated.accepts(record.key_hash, 100.0)
        again = new_secret()
        twice = await store.rotate_key("team-a", again.key_hash, again.prefix, grace_until=200.0)
        assert twice.previous_hash == fresh.key_hash
        assert await store.find_key_by_hash(record.key_hash) is None

    async def test_rotate_missing_or_revoked(self, store: Store) -> None:
        """Only an active key can be rotated."""
        fresh = new_secret()
        with pytest.raises(KeyNotFound):
            await store.rotate_key("nobody", fresh.key_hash, fresh.prefix, 1.0)
        await store.create_key(issue_key("team-a", now=1.0)[1])
        await store.revoke_key("team-a", 2.0)
        with pytest.raises(KeyRevoked):
            await store.rotate_key("team-a", fresh.key_hash, fresh.prefix, 1.0)

    async def test_keys_version(self, backend_url: str) -> None:
        """Every key change bumps the version, visible to another process at once; failures do not."""
        a, b = await open_store(backend_url), await open_store(backend_url)
        try:
            assert await b.keys_version() == 0
            await a.create_key(issue_key("team-a", now=1.0)[1])
            assert await b.keys_version() == 1
            fresh = new_secret()
            await a.rotate_key("team-a", fresh.key_hash, fresh.prefix, 5.0)
            assert await b.keys_version() == 2
            assert await a.revoke_key("team-a", 3.0)
            assert await b.keys_version() == 3
            assert not await a.revoke_key("team-a", 4.0)
            with pytest.raises(KeyExists):
                await a.create_key(issue_key("team-a", now=1.0)[1])
            assert await b.keys_version() == 3
            got = await b.get_key("team-a")
            assert got is not None
            assert got.revoked
        finally:
            await a.close()
            await b.close()


class TestIntents:
    async def test_lifecycle(self, store: Store) -> None:
        """Intent recorded, then resolved into a task in one step; a dropped one just disappears."""
        await store.record_intent("i1", "team-a", "req-1", "kling-v3-std-silent", "text", T0)
        await store.record_intent("i2", "team-a", "req-2", "kling-v3-std-silent", "image", T0 + 1)
        assert [i.intent_id for i in await store.list_intents()] == ["i1", "i2"]
        task = make_task("task-1")
        assert await store.resolve_intent("i1", task) is True
        assert await store.get_task("task-1") == task
        assert [i.intent_id for i in await store.list_intents()] == ["i2"]
        assert await store.drop_intent("i2") is True
        assert await store.drop_intent("i2") is False
        assert await store.list_intents() == []

    async def test_resolve_retry(self, store: Store) -> None:
        """Retrying a write that had committed is harmless and reports the row existed."""
        task = make_task("task-1")
        await store.record_intent("i1", "team-a", "req-1", task.model, task.mode, T0)
        assert await store.resolve_intent("i1", task) is True
        assert await store.resolve_intent("i1", task) is False
        assert await store.get_task("task-1") == task

    async def test_resolve_keeps_a_terminal_body_and_a_retry_counts_once(self, store: Store) -> None:
        """A task that arrives with its final answer keeps it; retrying the write adds nothing to usage."""
        task = replace(make_task("task-2"), status="completed", terminal_body=b'{"status": "completed"}')
        await store.record_intent("i2", "team-a", "req-2", task.model, task.mode, T0)
        assert await store.resolve_intent("i2", task) is True
        assert await store.resolve_intent("i2", task) is False
        assert await store.get_task("task-2") == task
        assert await store.list_intents() == []
        (row,) = await store.usage()
        assert row.tasks == 1

    async def test_task_id_already_held_keeps_owner_and_intent(self, store: Store) -> None:
        """A task id already in the ledger is not overwritten by another key's submission, whose intent stays."""
        first = make_task("task-dup", key="alice")
        await add_task(store, first)
        await store.record_intent("i-mallory", "mallory", "req-m", first.model, first.mode, T0 + 1)
        assert await store.resolve_intent("i-mallory", replace(first, key_name="mallory")) is False
        stored = await store.get_task("task-dup")
        assert stored is not None and stored.key_name == "alice"
        assert [i.intent_id for i in await store.list_intents()] == ["i-mallory"]

    async def test_intent_fields(self, store: Store) -> None:
        """An intent keeps who submitted what and when."""
        await store.record_intent("i1", "team-a", "req-1", "kling-v3-pro-audio", "first_last", T0 + 0.25)
        (intent,) = await store.list_intents()
        assert (intent.key_name, intent.request_id, intent.model, intent.mode, intent.submitted_at) == (
            "team-a",
            "req-1",
            "kling-v3-pro-audio",
            "first_last",
            T0 + 0.25,
        )

    async def test_survives_crash(self, backend_url: str) -> None:
        """An unresolved intent is still there after the process dies without closing."""
        store = await open_store(backend_url)
        await store.record_intent("i1", "team-a", "req-1", "m", "text", T0)
        await add_task(store, make_task("task-1"))
        # no close(): a fresh connection must see both, as after kill -9
        other = await open_store(backend_url)
        try:
            assert [i.intent_id for i in await other.list_intents()] == ["i1"]
            assert await other.get_task("task-1") is not None
        finally:
            await other.close()
            await store.close()


MONTH = (T0 - 86400.0, T0 + 30 * 86400.0)


async def hold_intent(
    store: Store,
    n: int | str,
    amount: str,
    budget: str = "1",
    *,
    at: float = T0,
    ttl_s: float = 600.0,
    account: str = "default",
    limit: int = 0,
    key: str = "team-a",
) -> IntentOutcome:
    """Intent ``i{n}`` with hold ``h{n}`` of ``amount`` on ``key``'s ``budget`` (``limit``: the account's room)."""
    hold = HoldRequest(f"h{n}", Decimal(amount), Decimal(budget), MONTH, at, ttl_s)
    return await store.record_intent(
        f"i{n}", key, f"req-{n}", "kling-v3-std-silent", "text", at, account, limit, at - 600, hold
    )


async def spent(store: Store, at: float = T0, key: str = "team-a") -> Decimal:
    return await store.budget_spent(key, MONTH, at)


class TestBudgetHolds:
    async def test_hold_taken_with_the_intent_until_the_budget_then_refused(self, store: Store) -> None:
        """Holds add up with outstanding tasks; the one that would pass the budget writes nothing and says the
        spend; holds are per key; a released hold makes room again, up to the budget exactly."""
        await add_task(store, make_task("task-1", key="team-a"))  # 0.42 outstanding
        assert await hold_intent(store, 1, "0.42") == IntentOutcome(Admission.ADMITTED, Decimal("0.42"))
        assert [i.intent_id for i in await store.list_intents()] == ["i1"]
        assert await spent(store) == Decimal("0.84")
        assert await hold_intent(store, 2, "0.42") == IntentOutcome(Admission.OVER_BUDGET, Decimal("0.84"))
        assert [i.intent_id for i in await store.list_intents()] == ["i1"]  # neither intent nor hold written
        assert await spent(store) == Decimal("0.84")
        assert (await hold_intent(store, 3, "0.42", key="team-b")).admitted  # per key
        await store.release_hold("h1")
        assert await spent(store) == Decimal("0.42")
        assert (await hold_intent(store, 4, "0.58")).admitted  # exactly the budget
        assert await spent(store) == Decimal(1)

    async def test_no_room_writes_neither_intent_nor_hold(self, store: Store) -> None:
        """The budget fits but the account is full: nothing written, the spend said all the same."""
        assert (await hold_intent(store, 1, "0.42", account="a", limit=1)).admitted
        assert await hold_intent(store, 2, "0.42", account="a", limit=1) == IntentOutcome(
            Admission.NO_ROOM, Decimal("0.42")
        )
        assert [i.intent_id for i in await store.list_intents()] == ["i1"]
        assert await spent(store) == Decimal("0.42")
        assert (await hold_intent(store, 3, "0.42", account="b", limit=1)).admitted  # another account has room

    async def test_over_budget_is_answered_before_the_account_is_counted(self, store: Store) -> None:
        """Full account and over budget: the budget is the answer (no wait for room that could not be used)."""
        assert (await hold_intent(store, 1, "0.9", account="a", limit=1)).admitted
        outcome = await hold_intent(store, 2, "0.42", account="a", limit=1)
        assert outcome == IntentOutcome(Admission.OVER_BUDGET, Decimal("0.9"))

    async def test_plain_intents_say_nothing_of_the_budget(self, store: Store) -> None:
        assert await store.record_intent("i1", "team-a", "r", "m", "text", T0) == ADMITTED
        assert await store.record_intent("i2", "team-a", "r", "m", "text", T0, "a", 1, T0 - 600) == ADMITTED
        assert await store.record_intent("i3", "team-a", "r", "m", "text", T0, "a", 1, T0 - 600) == IntentOutcome(
            Admission.NO_ROOM
        )
        assert await spent(store) == 0

    async def test_dropping_the_intent_keeps_the_hold(self, store: Store) -> None:
        """A refused intent is dropped; the hold is the submission's, so it stays (and counts) until released."""
        assert (await hold_intent(store, 1, "0.42")).admitted
        assert await store.drop_intent("i1")
        assert await spent(store) == Decimal("0.42")
        await store.release_hold("h1")
        await store.release_hold("h1")  # none left: fine
        assert await spent(store) == 0

    async def test_a_task_row_and_its_hold_both_count_until_the_hold_is_released(self, store: Store) -> None:
        """While a submission's task row is written and its hold not yet released, both count (never neither)."""
        assert (await hold_intent(store, 1, "0.42")).admitted
        await add_task(store, make_task("task-h", key="team-a"))  # 0.42
        assert await hold_intent(store, 2, "0.2") == IntentOutcome(Admission.OVER_BUDGET, Decimal("0.84"))
        await store.release_hold("h1")
        assert await hold_intent(store, 3, "0.58") == IntentOutcome(Admission.ADMITTED, Decimal("0.42"))

    async def test_the_task_write_releases_the_hold_in_its_transaction(self, store: Store) -> None:
        """``resolve_intent(..., release_hold)``: the task row replaces the hold at once (counted once, not both)."""
        assert (await hold_intent(store, 1, "0.42")).admitted
        assert await store.resolve_intent("i1", make_task("task-h"), release_hold="h1")
        assert await store.list_intents() == []
        assert await spent(store) == Decimal("0.42")
        assert await hold_intent(store, 2, "0.58") == IntentOutcome(Admission.ADMITTED, Decimal("0.42"))

    async def test_a_task_id_already_recorded_still_releases_the_hold(self, store: Store) -> None:
        """The upstream answered with an id the ledger holds: no row is written, the hold goes all the same."""
        await add_task(store, make_task("task-h"))  # 0.42
        assert (await hold_intent(store, 2, "0.42")).admitted
        assert not await store.resolve_intent("i2", make_task("task-h"), release_hold="h2")
        assert [i.intent_id for i in await store.list_intents()] == ["i2"]  # outcome unknown, as before
        assert await spent(store) == Decimal("0.42")

    async def test_a_failed_task_write_keeps_the_hold(self, store: Store) -> None:
        """The task write fails (a NULL key name): it rolls back whole, so the hold still counts."""
        assert (await hold_intent(store, 1, "0.42")).admitted
        broken = replace(make_task("task-x"), key_name=None)  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            await store.resolve_intent("i1", broken, release_hold="h1")
        assert await store.get_task("task-x") is None
        assert await spent(store) == Decimal("0.42")

    async def test_holds_turning_into_tasks_never_overshoot(self, backend_url: str) -> None:
        """Two stores, 12 concurrent submissions of $0.42 on a $2 budget, each hold released by its task write as
        others check: exactly 4 fit, and afterwards only the 4 tasks count (no hold left, none counted twice)."""
        first, second = await open_store(backend_url), await open_store(backend_url)

        async def submit(n: int) -> bool:
            store = (first, second)[n % 2]
            outcome = await hold_intent(store, n, "0.42", "2")
            if outcome.admitted:
                assert await store.resolve_intent(f"i{n}", make_task(f"task-{n}"), release_hold=f"h{n}")
            return outcome.admitted

        try:
            assert sum(await asyncio.gather(*(submit(n) for n in range(12)))) == 4
            assert await spent(first) == Decimal("1.68")
            [total] = await second.usage()
            assert (total.tasks, total.estimated_usd) == (4, Decimal("1.68"))
        finally:
            await first.close()
            await second.close()

    async def test_spent_over_whole_days_and_over_partial_windows(self, store: Store) -> None:
        """A window of whole UTC days (a budget's month) is read from the daily rollup in one statement; any other
        window from the rollup and the task rows: both count the same tasks."""
        await add_task(store, make_task("day-1", at=T0 + 600))
        await add_task(store, make_task("day-2", at=T0 + 86400 + 600))
        two_days = (T0, T0 + 2 * 86400)
        assert await store.budget_spent("team-a", two_days, T0) == Decimal("0.84")
        assert await store.budget_spent("team-a", (T0 + 1200, T0 + 2 * 86400), T0) == Decimal("0.42")
        assert await store.budget_spent("team-a", (T0, T0 + 86400 + 1200), T0) == Decimal("0.84")
        assert await store.budget_spent("team-b", two_days, T0) == Decimal(0)

    async def test_expired_holds_stop_counting(self, store: Store) -> None:
        """A hold left by a dead process no longer counts after its time to live."""
        assert (await hold_intent(store, 1, "0.9", at=T0, ttl_s=60)).admitted
        assert (await hold_intent(store, 2, "0.9", at=T0 + 30, ttl_s=60)).admission is Admission.OVER_BUDGET
        assert (await hold_intent(store, 3, "0.9", at=T0 + 61, ttl_s=60)).admitted
        assert await store.budget_spent("team-a", MONTH, T0 + 61, ttl_s=60) == Decimal("0.9")

    async def test_concurrent_holds_never_overshoot(self, backend_url: str) -> None:
        """Two stores on one database, 20 submissions at once on two accounts with room for 4 each: exactly as many
        as the budget allows are admitted, each with its hold (budget lock before account lock: no deadlock)."""
        first, second = await open_store(backend_url), await open_store(backend_url)
        try:
            results = await asyncio.gather(
                *(
                    hold_intent(first if n % 2 else second, n, "0.3", account="ab"[n % 4 // 2], limit=4)
                    for n in range(20)
                )
            )
            assert sum(result.admitted for result in results) == 3
            assert {r.admission for r in results} == {Admission.ADMITTED, Admission.OVER_BUDGET}
            assert len(await first.list_intents()) == 3
            assert await spent(second) == Decimal("0.9")
        finally:
            await first.close()
            await second.close()


_KILL_SCRIPT = """
import asyncio, sys
from decimal import Decimal
from gateway.store.base import TaskRecord
from gateway.store import open_store

async def main() -> None:
    store = await open_store(sys.argv[1])
    n = 0
    while True:
        task = TaskRecord(
            task_id=f"k{n}", key_name="team-a", model="kling-v3-std-silent", mode="text", tier="std", audio=False,
            duration=5, duration_defaulted=False, estimate_seconds=5, estimate_usd=Decimal("0.42"),
            price_per_second_usd=Decimal("0.084"), mode_multiplier=Decimal(1), request_id=f"r{n}",
            submitted_at=1.0 + n,
        )
        await store.record_intent(f"i{n}", "team-a", f"r{n}", task.model, task.mode, task.submitted_at)
        await store.resolve_intent(f"i{n}", task)
        print(n, flush=True)
        n += 1

asyncio.run(main())
"""


class TestKill9:
    def test_committed_rows_survive_sigkill(self, tmp_path: Path) -> None:
        """Every task whose write returned before a kill -9 is there afterwards, rollup included."""
        url = db_url(tmp_path / "g.db")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, url], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        acknowledged = [int(proc.stdout.readline()) for _ in range(200)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        async def check() -> None:
            store = await open_store(url)
            try:
                for n in acknowledged:
                    assert await store.get_task(f"k{n}") is not None
                (total,) = await store.usage()
                intents = await store.list_intents()
                assert total.tasks >= len(acknowledged)
                assert total.tasks + len(intents) >= acknowledged[-1] + 1
                assert total.estimated_usd == Decimal("0.42") * total.tasks
            finally:
                await store.close()

        asyncio.run(check())


class TestTasks:
    async def test_round_trip(self, store: Store) -> None:
        """Every field survives the store exactly, Decimals included."""
        task = replace(
            make_task("t1", model="kling-v3-pro-audio", seconds=None, mode="image"),
            mode_multiplier=Decimal("1.25"),
            estimate_usd=Decimal("0.168") * 5 * Decimal("1.25"),
            submitted_at=T0 + 0.123456,
        )
        await add_task(store, task)
        got = await store.get_task("t1")
        assert got == task
        assert got is not None
        assert got.duration is None and got.duration_defaulted is True and got.audio is True
        assert got.estimate_usd == Decimal("1.05")
        assert str(got.price_per_second_usd) == "0.168"
        assert await store.get_task("missing") is None

    async def test_update_status(self, store: Store) -> None:
        """Polls and settler checks record status, progress and their own timestamps."""
        await add_task(store, make_task("t1"))
        assert await store.update_status("t1", "in_progress", 40, T0 + 5, polled=True)
        assert await store.update_status("t1", "in_progress", None, T0 + 9, polled=False)
        got = await store.get_task("t1")
        assert got is not None
        assert (got.status, got.progress, got.last_polled_at, got.last_checked_at) == (
            "in_progress",
            40,
            T0 + 5,
            T0 + 9,
        )
        assert not await store.update_status("missing", "queued", None, T0, polled=True)
        with pytest.raises(ValueError, match="status"):
            await store.update_status("t1", "done", None, T0, polled=True)

    async def test_settle_completed(self, store: Store) -> None:
        """Settlement records outcome, seconds, amount and the terminal body, once."""
        await add_task(store, make_task("t1"))
        body = b'{"id":"t1","status":"completed","seconds":5.04}'
        assert (await store.settle("t1", "completed", Decimal("5.04"), Decimal("0.42336"), body, T0 + 60)).first
        assert not (await store.settle("t1", "failed", Decimal(0), Decimal(0), b"{}", T0 + 61)).first
        assert not await store.mark_unknown("t1", T0 + 62)
        assert not await store.update_status("t1", "in_progress", 10, T0 + 63, polled=True)
        got = await store.get_task("t1")
        assert got is not None
        assert (got.status, got.outcome, got.settled_seconds, got.settled_usd, got.settled_at) == (
            "completed",
            "completed",
            Decimal("5.04"),
            Decimal("0.42336"),
            T0 + 60,
        )
        assert got.terminal_body == body
        assert got.settled and got.cost_usd == Decimal("0.42336")

    async def test_settle_failed(self, store: Store) -> None:
        """A failed task settles at zero."""
        await add_task(store, make_task("t1"))
        assert (await store.settle("t1", "failed", Decimal(0), Decimal(0), None, T0 + 60)).first
        got = await store.get_task("t1")
        assert got is not None
        assert (got.outcome, got.settled_usd, got.cost_usd, got.terminal_body) == (
            "failed",
            Decimal(0),
            Decimal(0),
            None,
        )

    async def test_mark_unknown(self, store: Store) -> None:
        """Giving up settles at the estimate as unknown, once."""
        await add_task(store, make_task("t1", seconds=10, model="kling-v3-pro-silent"))
        assert await store.mark_unknown("t1", T0 + 86400)
        assert not await store.mark_unknown("t1", T0 + 86401)
        assert not (await store.settle("t1", "completed", Decimal(10), Decimal("1.12"), None, T0 + 86402)).first
        got = await store.get_task("t1")
        assert got is not None
        assert (got.status, got.outcome, got.settled_seconds, got.settled_usd) == (
            "unknown",
            "unknown",
            Decimal(10),
            Decimal("1.12"),
        )

    async def test_settle_unknown_task(self, store: Store) -> None:
        """Settling a task the ledger does not have is a no-op."""
        assert not (await store.settle("nope", "completed", Decimal(5), Decimal(1), None, T0)).first
        assert not await store.mark_unknown("nope", T0)

    @pytest.mark.parametrize("outcome", ["unknown", "queued", "COMPLETED", ""])
    async def test_settle_bad_outcome(self, store: Store, outcome: str) -> None:
        """settle only takes completed or failed."""
        with pytest.raises(ValueError, match="outcome"):
            await store.settle("t1", outcome, Decimal(0), Decimal(0), None, T0)

    async def test_settle_once_across_processes(self, backend_url: str) -> None:
        """20 concurrent settlements from two store instances on one database: exactly one wins."""
        a, b = await open_store(backend_url), await open_store(backend_url)
        try:
            for n in range(5):
                await add_task(a, make_task(f"t{n}"))
            for n in range(5):
                calls = []
                for i in range(20):
                    s = a if i % 2 else b
                    if i % 5 == 4:
                        calls.append(s.mark_unknown(f"t{n}", T0 + i))
                    else:
                        usd = Decimal("0.42") + Decimal(i) / 1000
                        calls.append(first(s.settle(f"t{n}", "completed", Decimal(5), usd, b"{}", T0 + i)))
                results = await asyncio.gather(*calls)
                assert results.count(True) == 1, results
        finally:
            await a.close()
            await b.close()

    async def test_tasks_for_key_paging(self, store: Store) -> None:
        """Newest first, paged by an opaque cursor, ties broken by task id, other keys excluded."""
        expected = []
        for n in range(23):
            key = "team-a" if n % 3 else "team-b"
            at = T0 + (n // 2)  # pairs share a timestamp
            task = make_task(f"t{n:02d}", key=key, at=at)
            await add_task(store, task)
            if key == "team-a":
                expected.append(task)
        expected.sort(key=lambda t: (t.submitted_at, t.task_id), reverse=True)
        pages, cursor = [], None
        while True:
            page, cursor = await store.tasks_for_key("team-a", limit=4, before=cursor)
            pages.append(page)
            if cursor is None:
                break
        assert [t for page in pages for t in page] == expected
        assert all(len(p) == 4 for p in pages[:-1])
        everything, last = await store.tasks_for_key(None, limit=1000)
        assert len(everything) == 23 and last is None
        assert await store.tasks_for_key("nobody") == ([], None)

    async def test_tasks_for_key_exact_page(self, store: Store) -> None:
        """A page that ends exactly at the last task gives no next cursor."""
        for n in range(4):
            await add_task(store, make_task(f"t{n}", at=T0 + n))
        page, cursor = await store.tasks_for_key("team-a", limit=4)
        assert len(page) == 4 and cursor is None

    @pytest.mark.parametrize("cursor", ["!!!", "bm90LWEtY3Vyc29y", ""])
    async def test_bad_cursor(self, store: Store, cursor: str) -> None:
        """A forged or garbled cursor is a ValueError."""
        with pytest.raises(ValueError, match="cursor"):
            await store.tasks_for_key("team-a", before=cursor)

    @pytest.mark.parametrize("limit", [0, -1, 1001])
    async def test_bad_limit(self, store: Store, limit: int) -> None:
        """Page sizes are bounded."""
        with pytest.raises(ValueError, match="limit"):
            await store.tasks_for_key("team-a", limit=limit)

    def test_cursor_round_trip(self) -> None:
        """Cursors encode the exact float and any task id."""
        for at, task_id in [(T0 + 0.1, "abc"), (1.0 / 3, "with\nnewline|and:colons"), (0.0, "")]:
            assert decode_cursor(encode_cursor(at, task_id)) == (at, task_id)

    async def test_needing_settlement(self, store: Store) -> None:
        """Unsettled tasks idle since the cutoff, least recently checked first."""
        for n in range(5):
            await add_task(store, make_task(f"t{n}", at=T0 + n))
        await store.update_status("t1", "in_progress", 50, T0 + 100, polled=True)  # recently polled
        await store.update_status("t2", "in_progress", 50, T0 + 100, polled=False)  # recently checked
        await store.update_status("t3", "in_progress", 50, T0 + 10, polled=False)  # checked long ago
        await store.settle("t4", "completed", Decimal(5), Decimal("0.42"), None, T0 + 20)
        due = await store.tasks_needing_settlement(idle_since=T0 + 50)
        assert [t.task_id for t in due] == ["t0", "t3"]
        assert [t.task_id for t in await store.tasks_needing_settlement(T0 + 50, limit=1)] == ["t0"]
        due_later = await store.tasks_needing_settlement(idle_since=T0 + 1000)
        assert [t.task_id for t in due_later] == ["t0", "t1", "t3", "t2"]

    async def test_budget_sum(self, store: Store) -> None:
        """Settled amounts plus outstanding estimates, for one key, within the month only."""
        month_start, month_end = T0, T0 + 31 * DAY
        await add_task(store, make_task("open", seconds=5, at=T0 + 1))  # 0.42 outstanding
        await add_task(store, make_task("done", seconds=10, at=T0 + 2))  # settles at 0.50
        await add_task(store, make_task("fail", seconds=10, at=T0 + 3))  # settles at 0
        await add_task(store, make_task("lost", seconds=3, at=T0 + 4))  # unknown at 0.252
        await add_task(store, make_task("prev", seconds=15, at=T0 - 1))  # last month
        await add_task(store, make_task("next", seconds=15, at=month_end))  # next month
        await add_task(store, make_task("other", seconds=15, key="team-b", at=T0 + 5))
        await store.settle("done", "completed", Decimal("5.952"), Decimal("0.50"), None, T0 + 9)
        await store.settle("fail", "failed", Decimal(0), Decimal(0), None, T0 + 9)
        await store.mark_unknown("lost", T0 + 9)
        total = await store.outstanding_and_settled_usd("team-a", month_start, month_end)
        assert total == Decimal("1.172")
        assert await store.outstanding_and_settled_usd("nobody", month_start, month_end) == 0


def webhook(task_id: str, key: str = "team-a", host: str = "hooks.example.com", cap: int = 10) -> OutboxEntry:
    """The outbox entry a settlement of ``task_id`` carries (``cap`` pending per key and per host)."""
    record = OutboxRecord(f"msg_{task_id}", key, host, f"https://{host}/k", b'{"status":"completed"}', T0 + 60)
    return OutboxEntry(record, cap, cap)


class TestSettledWithWebhook:
    """The completion webhook is written by the transaction that settles the task: both or neither."""

    async def test_first_settlement_writes_its_webhook_once(self, store: Store) -> None:
        """One outbox row with the first settlement; later settlements (or giving up) write none."""
        await add_task(store, make_task("t1"))
        entry = webhook("t1")
        body = b'{"status":"completed"}'
        assert await store.settle("t1", "completed", Decimal(5), Decimal("0.42"), body, T0 + 60, entry) == Settlement(
            first=True, webhook_queued=True
        )
        assert await store.outbox_list("pending") == [entry.record]
        again = replace(entry, record=replace(entry.record, url="https://hooks.example.com/again"))
        assert await store.settle("t1", "failed", Decimal(0), Decimal(0), body, T0 + 61, again) == Settlement(False)
        assert not await store.mark_unknown("t1", T0 + 62)
        assert await store.outbox_list("pending") == [entry.record]

    async def test_without_a_webhook_nothing_is_queued(self, store: Store) -> None:
        await add_task(store, make_task("t1"))
        assert await store.settle("t1", "completed", Decimal(5), Decimal("0.42"), None, T0 + 60) == Settlement(True)
        assert await store.outbox_list("pending") == []

    async def test_at_the_pending_cap_the_webhook_is_dropped_not_the_settlement(self, store: Store) -> None:
        """The key's pending cap is full: the task settles all the same, and the answer says the row was not written."""
        await add_task(store, make_task("t1"))
        await add_task(store, make_task("t2"))
        full = webhook("t1", cap=1)
        assert (await store.settle("t1", "completed", Decimal(5), Decimal("0.42"), None, T0, full)).first
        other_host = webhook("t2", host="other.example.com", cap=1)
        settled = await store.settle("t2", "completed", Decimal(5), Decimal("0.42"), None, T0, other_host)
        assert settled == Settlement(first=True, webhook_queued=False)
        assert [r.delivery_id for r in await store.outbox_list("pending")] == ["msg_t1"]
        got = await store.get_task("t2")
        assert got is not None and got.outcome == "completed"

    async def test_a_failed_webhook_write_rolls_the_settlement_back(self, store: Store) -> None:
        """The outbox insert fails (a NULL body): the task stays unsettled, the rollup unmoved, no row; settling
        again later writes both."""
        await add_task(store, make_task("t1"))
        broken = webhook("t1")
        broken = replace(broken, record=replace(broken.record, body=None))  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            await store.settle("t1", "completed", Decimal(5), Decimal("0.42"), b"{}", T0 + 60, broken)
        got = await store.get_task("t1")
        assert got is not None and not got.settled and got.terminal_body is None
        [total] = await store.usage()
        assert (total.pending, total.completed, total.settled_usd) == (1, 0, 0)
        assert await store.outbox_list("pending") == []
        entry = webhook("t1")
        assert await store.settle("t1", "completed", Decimal(5), Decimal("0.42"), b"{}", T0 + 61, entry) == Settlement(
            first=True, webhook_queued=True
        )
        assert await store.outbox_list("pending") == [entry.record]

    async def test_one_webhook_when_processes_race_to_settle(self, backend_url: str) -> None:
        """Concurrent settlements of one task from two stores: one first, and exactly one outbox row, its own."""
        a, b = await open_store(backend_url), await open_store(backend_url)
        try:
            await add_task(a, make_task("t1"))
            calls = [
                (a, b)[i % 2].settle("t1", "completed", Decimal(5), Decimal("0.42"), b"{}", T0 + i, webhook("t1"))
                for i in range(10)
            ]
            results = await asyncio.gather(*calls)
            assert sorted(results, key=lambda r: r.first) == [Settlement(False)] * 9 + [Settlement(True, True)]
            assert len(await b.outbox_list("pending")) == 1
        finally:
            await a.close()
            await b.close()


class TestMoney:
    @pytest.mark.parametrize(
        ("amount", "units"),
        [
            (Decimal("0.084") * 5, 420_000_000),
            (Decimal("0.42"), 420_000_000),
            (Decimal("0"), 0),
            (Decimal("1E+3"), 1_000_000_000_000),
            (Decimal("0.000000001"), 1),
            (Decimal("0.0000000015"), 2),  # half-even past 9 places
            (Decimal("0.0000000025"), 2),
            (Decimal("-0.5"), -500_000_000),
        ],
    )
    def test_to_fixed(self, amount: Decimal, units: int) -> None:
        """Decimals become exact 1e-9 integer units."""
        assert to_fixed(amount) == units

    @pytest.mark.parametrize(
        ("units", "text"),
        [
            (420_000_000, "0.42"),
            (0, "0"),
            (5_000_000_000, "5"),
            (1, "1E-9"),
            (123_456_789_012, "123.456789012"),
        ],
    )
    def test_from_fixed(self, units: int, text: str) -> None:
        """Units come back as Decimals without trailing zeros (and never in float)."""
        assert str(from_fixed(units)) == text

    @pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity")])
    def test_non_finite(self, bad: Decimal) -> None:
        """Non-finite amounts are refused."""
        with pytest.raises(ValueError, match="finite"):
            to_fixed(bad)

    async def test_sums_exact(self, store: Store) -> None:
        """Sums the float way would get wrong come out exact (0.084 x 5 and 0.1 x 3)."""
        for n in range(3):
            await add_task(store, make_task(f"s{n}", seconds=5))  # 0.42 each
            await add_task(store, replace(make_task(f"d{n}"), estimate_usd=Decimal("0.1")))
        (row,) = await store.usage(group_by=())
        assert row.estimated_usd == Decimal("1.56")
        assert 0.1 + 0.1 + 0.1 != 0.3  # the float trap this avoids
        assert sum((Decimal("0.1"),) * 3, Decimal(0)) + Decimal("1.26") == row.estimated_usd


def usage_by_hand(tasks: list[TaskRecord], group_by: tuple[str, ...]) -> list[UsageRow]:
    """The usage report computed in Python from the rows themselves."""

    def dims(t: TaskRecord) -> tuple[str | None, ...]:
        day = datetime.fromtimestamp(t.submitted_at, UTC).date().isoformat()
        values = {"key": t.key_name, "model": t.model, "mode": t.mode, "day": day}
        return tuple(values[g] for g in group_by)

    groups: dict[tuple[str | None, ...], list[TaskRecord]] = {}
    for t in tasks:
        groups.setdefault(dims(t), []).append(t)
    rows = []
    for values, members in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        named = dict(zip(group_by, values, strict=True))
        zero = Decimal(0)
        rows.append(
            UsageRow(
                key=named.get("key"),
                model=named.get("model"),
                mode=named.get("mode"),
                day=named.get("day"),
                tasks=len(members),
                requested_seconds=sum(t.estimate_seconds for t in members),
                settled_seconds=sum((t.settled_seconds or zero for t in members), zero),
                estimated_usd=sum((t.estimate_usd for t in members), zero),
                settled_usd=sum((t.settled_usd or zero for t in members), zero),
                cost_usd=sum((t.cost_usd for t in members), zero),
                completed=sum(t.outcome == "completed" for t in members),
                failed=sum(t.outcome == "failed" for t in members),
                unknown=sum(t.outcome == "unknown" for t in members),
                pending=sum(t.outcome is None for t in members),
                defaulted=sum(t.duration_defaulted for t in members),
            )
        )
    return rows


class TestUsage:
    @pytest.fixture
    async def ledger(self, store: Store) -> list[TaskRecord]:
        """Three keys, four models, three modes over three days, in every settlement state.

        The plan is drawn first (one seeded sequence), then written with the tasks concurrently, as traffic is.
        """
        rng = random.Random(7)
        plan: list[tuple[TaskRecord, str, Decimal]] = []
        edges = [T0, T0 + DAY, T0 + DAY - 0.001, T0 + 2 * DAY, T0 + 3600.5, T0 + 2 * DAY + 7]  # on boundaries
        for n in range(240):
            task = make_task(
                f"u{n:03d}",
                key=rng.choice(["team-a", "team-b", "team-c"]),
                model=rng.choice(sorted(PRICES)),
                mode=rng.choice(["text", "image", "first_last"]),
                seconds=rng.choice([None, 3, 5, 10, 15]),
                at=edges[n] if n < len(edges) else T0 + rng.uniform(0, 3 * DAY),
            )
            fate = rng.choice(["open", "completed", "completed", "failed", "unknown"])
            extra = Decimal(rng.randint(0, 99)) / 1000 if fate == "completed" else Decimal(0)
            plan.append((task, fate, extra))

        async def write(task: TaskRecord, fate: str, extra: Decimal) -> TaskRecord:
            await add_task(store, task)
            if fate == "completed":
                seconds = Decimal(task.estimate_seconds) + extra
                usd = seconds * task.price_per_second_usd
                assert (await store.settle(task.task_id, "completed", seconds, usd, None, task.submitted_at + 60)).first
            elif fate == "failed":
                assert (await store.settle(task.task_id, "failed", Decimal(0), Decimal(0), None, T0)).first
            elif fate == "unknown":
                assert await store.mark_unknown(task.task_id, T0)
            settled = await store.get_task(task.task_id)
            assert settled is not None
            return settled

        return list(await asyncio.gather(*(write(*step) for step in plan)))

    @pytest.mark.parametrize(
        "group_by",
        [
            combo
            for size in range(5)
            for combo in itertools.permutations(("key", "model", "mode", "day"), size)
            if size <= 2 or combo in {("key", "model", "mode"), ("key", "model", "mode", "day")}
        ],
    )
    async def test_matches_rows(self, store: Store, ledger: list[TaskRecord], group_by: tuple[str, ...]) -> None:
        """Every grouping equals the same report computed by hand from the ledger rows."""
        got = await store.usage(group_by=group_by)
        assert got == usage_by_hand(ledger, group_by)

    async def test_totals_equal_sum_of_groups(self, store: Store, ledger: list[TaskRecord]) -> None:
        """The groups of any report add up to the ungrouped total."""
        (total,) = await store.usage()
        rows = await store.usage(group_by=("key", "model"))
        assert sum(r.tasks for r in rows) == total.tasks == len(ledger)
        assert sum((r.settled_usd for r in rows), Decimal(0)) == total.settled_usd
        assert sum((r.cost_usd for r in rows), Decimal(0)) == total.cost_usd
        assert total.completed + total.failed + total.unknown + total.pending == total.tasks

    async def test_window(self, store: Store, ledger: list[TaskRecord]) -> None:
        """since is inclusive, until exclusive."""
        since, until = T0 + DAY, T0 + 2 * DAY
        got = await store.usage(since=since, until=until, group_by=("day",))
        inside = [t for t in ledger if since <= t.submitted_at < until]
        assert got == usage_by_hand(inside, ("day",))
        assert [r.day for r in got] == ["2026-01-02"]

    @pytest.mark.parametrize(
        ("since", "until"),
        [
            pytest.param(T0 + 3600.5, T0 + 2 * DAY + 7, id="partial-days-both-ends"),
            pytest.param(T0 + 100, T0 + 20000, id="within-one-day"),
            pytest.param(None, T0 + DAY + 1, id="open-start"),
            pytest.param(T0 + DAY - 1, None, id="open-end"),
            pytest.param(None, None, id="everything"),
            pytest.param(T0 + DAY, T0 + DAY, id="empty-window"),
            pytest.param(T0 + 2 * DAY, T0 + DAY, id="reversed-window"),
            pytest.param(T0 - 5 * DAY, T0 + 10 * DAY, id="wider-than-data"),
        ],
    )
    async def test_any_window(
        self, store: Store, ledger: list[TaskRecord], since: float | None, until: float | None
    ) -> None:
        """Windows that cut days in the middle count exactly the tasks inside them."""
        inside = [
            t
            for t in ledger
            if (since is None or t.submitted_at >= since) and (until is None or t.submitted_at < until)
        ]
        for group_by in ((), ("key", "day"), ("model", "mode")):
            assert await store.usage(since, until, group_by) == usage_by_hand(inside, group_by)
        if since is not None and until is not None:
            budget = await store.outstanding_and_settled_usd("team-b", since, until)
            assert budget == sum((t.cost_usd for t in inside if t.key_name == "team-b"), Decimal(0))

    async def test_rebuild_rollup(self, store: Store, ledger: list[TaskRecord]) -> None:
        """The maintained rollup equals one rebuilt from the ledger rows."""
        everything = ("key", "model", "mode", "day")
        before = await store.usage(group_by=everything)
        await store.rebuild_usage_rollup()  # type: ignore[attr-defined]  # both backends have it, the Protocol not
        assert await store.usage(group_by=everything) == before == usage_by_hand(ledger, everything)

    async def test_empty(self, store: Store) -> None:
        """No tasks, no rows."""
        assert await store.usage() == []
        assert await store.usage(group_by=("key",)) == []

    @pytest.mark.parametrize("group_by", [("tenant",), ("key", "key"), ("day", "KEY")])
    async def test_bad_group(self, store: Store, group_by: tuple[str, ...]) -> None:
        """Only distinct key, model, mode and day can be grouped by."""
        with pytest.raises(ValueError, match="group_by"):
            await store.usage(group_by=group_by)


class TestIdempotency:
    async def test_state_machine(self, store: Store) -> None:
        """NEW, then IN_FLIGHT for the same body, CONFLICT for another, REPLAY once finished."""
        begin = store.idempotency_begin
        assert (await begin("team-a", "k1", "h1", T0)).kind is IdemKind.NEW
        assert (await begin("team-a", "k1", "h1", T0 + 1)).kind is IdemKind.IN_FLIGHT
        assert (await begin("team-a", "k1", "h2", T0 + 1)).kind is IdemKind.CONFLICT
        headers = [("content-type", "application/json"), ("x-request-id", "r1")]
        await store.idempotency_finish("team-a", "k1", 200, headers, b'{"id":"task-1"}')
        replay = await begin("team-a", "k1", "h1", T0 + 2)
        assert replay.kind is IdemKind.REPLAY
        assert (replay.status, replay.headers, replay.body) == (200, tuple(headers), b'{"id":"task-1"}')
        assert (await begin("team-a", "k1", "h2", T0 + 2)).kind is IdemKind.CONFLICT

    async def test_scoped_per_client_key(self, store: Store) -> None:
        """The same Idempotency-Key from two client keys is two records."""
        assert (await store.idempotency_begin("team-a", "k1", "h1", T0)).kind is IdemKind.NEW
        assert (await store.idempotency_begin("team-b", "k1", "h2", T0)).kind is IdemKind.NEW

    async def test_abandon(self, store: Store) -> None:
        """Abandoning an in-flight record lets a retry start afresh; a finished one is kept."""
        await store.idempotency_begin("team-a", "k1", "h1", T0)
        await store.idempotency_abandon("team-a", "k1")
        assert (await store.idempotency_begin("team-a", "k1", "h2", T0 + 1)).kind is IdemKind.NEW
        await store.idempotency_finish("team-a", "k1", 200, [], b"ok")
        await store.idempotency_abandon("team-a", "k1")
        assert (await store.idempotency_begin("team-a", "k1", "h2", T0 + 2)).kind is IdemKind.REPLAY

    async def test_expiry(self, store: Store) -> None:
        """After the TTL a record counts as absent, whatever its body."""
        await store.idempotency_begin("team-a", "k1", "h1", T0, ttl_s=100)
        await store.idempotency_finish("team-a", "k1", 200, [], b"first")
        assert (await store.idempotency_begin("team-a", "k1", "h1", T0 + 99, ttl_s=100)).kind is IdemKind.REPLAY
        assert (await store.idempotency_begin("team-a", "k1", "h2", T0 + 100, ttl_s=100)).kind is IdemKind.NEW

    async def test_purge(self, sqlite_store: SQLiteStore) -> None:
        """Expired records of other keys are purged opportunistically (PostgreSQL: test_store_postgres.py)."""
        store = sqlite_store
        for n in range(5):
            await store.idempotency_begin("team-a", f"old{n}", "h", T0, ttl_s=100)
        await store.idempotency_begin("team-b", "new", "h", T0 + 1000, ttl_s=100)
        count = await store._read(lambda conn: conn.execute("SELECT COUNT(*) FROM idempotency").fetchone())
        assert count[0] == 1

    async def test_stale_in_flight_taken_over(self, store: Store) -> None:
        """An in-flight record left by a dead process is taken over after in_flight_ttl_s."""
        begin = store.idempotency_begin
        assert (await begin("team-a", "k1", "h1", T0, in_flight_ttl_s=30)).kind is IdemKind.NEW
        assert (await begin("team-a", "k1", "h1", T0 + 29, in_flight_ttl_s=30)).kind is IdemKind.IN_FLIGHT
        assert (await begin("team-a", "k1", "h1", T0 + 30, in_flight_ttl_s=30)).kind is IdemKind.NEW
        assert (await begin("team-a", "k1", "h1", T0 + 31, in_flight_ttl_s=30)).kind is IdemKind.IN_FLIGHT

    async def test_concurrent_claims(self, backend_url: str) -> None:
        """Ten simultaneous claims from two processes: exactly one NEW, the rest IN_FLIGHT."""
        a, b = await open_store(backend_url), await open_store(backend_url)
        try:
            results = await asyncio.gather(
                *((a if i % 2 else b).idempotency_begin("team-a", "k1", "h1", T0) for i in range(10))
            )
            kinds = [r.kind for r in results]
            assert kinds.count(IdemKind.NEW) == 1
            assert kinds.count(IdemKind.IN_FLIGHT) == 9
        finally:
            await a.close()
            await b.close()


async def test_keyrecord_field_types_round_trip(store: Store) -> None:
    """A key with no limits round-trips its None fields."""
    record = KeyRecord(name="bare", key_hash="a" * 64, prefix="gk_aaaaaaa", created_at=1.0)
    await store.create_key(record)
    assert await store.get_key("bare") == record


class WriterGate:
    """Holds the store's writer thread on a job of its own, so the writes queued meanwhile form one batch."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._event = threading.Event()
        self._job = store._writer.executor.submit(self._event.wait)

    async def queued(self, count: int) -> None:
        """Wait until ``count`` operations are queued behind the gate."""
        for _ in range(1000):
            if self._store._writer.queued >= count:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"only {self._store._writer.queued} of {count} writes were queued")

    def open(self) -> None:
        self._event.set()


def committed_intents(path: Path) -> set[str]:
    """Intent ids another connection (another process, as far as SQLite is concerned) sees committed."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT intent_id FROM intents")}
    finally:
        conn.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SQLiteStore]:
    """A file store whose batches are bounded by max_batch only, so what forms one batch is deterministic."""
    import gateway.store.sqlite_writer as sqlite_writer

    monkeypatch.setattr(sqlite_writer, "_BATCH_BUDGET_S", 3600.0)
    s = await SQLiteStore.open(str(tmp_path / "g.db"))
    yield s
    await s.close()


class TestGroupCommit:
    async def test_concurrent_writes_share_commits(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """200 concurrent writes all succeed and are all readable, in far fewer COMMITs than writes."""
        store = sqlite_store
        assert store.commits == 0  # the migrations at open are not counted
        await asyncio.gather(
            *(store.record_intent(f"i{n}", "team-a", f"r{n}", "m", "text", T0 + n) for n in range(200))
        )
        assert len(await store.list_intents()) == 200
        assert committed_intents(tmp_path / "g.db") == {f"i{n}" for n in range(200)}
        assert 1 <= store.commits < 200

    async def test_queued_writes_form_bounded_batches(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """Writes queued behind a busy writer are committed together, at most max_batch per COMMIT."""
        store = sqlite_store
        gate = WriterGate(store)
        writes = asyncio.gather(*(store.record_intent(f"i{n}", "team-a", f"r{n}", "m", "text", T0) for n in range(150)))
        await gate.queued(150)
        gate.open()
        await writes
        assert committed_intents(tmp_path / "g.db") == {f"i{n}" for n in range(150)}
        assert store.commits == 3  # 64 + 64 + 22

    async def test_max_batch_one_commits_each_write(self, tmp_path: Path) -> None:
        """max_batch=1 is one transaction per write (the benchmark's baseline)."""
        store = await SQLiteStore.open(str(tmp_path / "g.db"), max_batch=1)
        try:
            await asyncio.gather(*(store.record_intent(f"i{n}", "team-a", "r", "m", "text", T0) for n in range(30)))
            assert store.commits == 30
        finally:
            await store.close()
        with pytest.raises(ValueError, match="max_batch"):
            SQLiteStore(str(tmp_path / "g.db"), max_batch=0)

    async def test_lone_write_is_one_plain_transaction(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """A write with nothing else queued is BEGIN IMMEDIATE / its statement / COMMIT: no savepoint, no wait."""
        store = sqlite_store
        statements: list[str] = []
        await store._writer.run(lambda conn: conn.set_trace_callback(statements.append))
        await store.record_intent("i1", "team-a", "r1", "m", "text", T0)
        await store._writer.run(lambda conn: conn.set_trace_callback(None))
        assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "COMMIT"]
        assert store.commits == 1
        assert committed_intents(tmp_path / "g.db") == {"i1"}

    async def test_awaited_means_committed(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """Whenever a write's await returns, in or out of a batch, another connection already sees its row."""
        store, path = sqlite_store, tmp_path / "g.db"

        def slow_commit(statement: str) -> None:  # widens the window in which an early answer would show
            if statement == "COMMIT":
                time.sleep(0.02)

        await store._writer.run(lambda conn: conn.set_trace_callback(slow_commit))
        await store.record_intent("alone", "team-a", "r", "m", "text", T0)
        assert "alone" in committed_intents(path)
        unseen: list[str] = []

        async def write_then_look(n: int) -> None:
            await store.record_intent(f"i{n}", "team-a", f"r{n}", "m", "text", T0)
            if f"i{n}" not in committed_intents(path):
                unseen.append(f"i{n}")

        await asyncio.gather(*(write_then_look(n) for n in range(60)))
        assert unseen == []
        assert store.commits < 61

    async def test_failures_fail_only_themselves(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """In one batch: a duplicate key name, a duplicate intent and an op raising after writing fail alone."""
        store = sqlite_store
        _, taken = issue_key("taken", now=1.0)
        await store.create_key(taken)
        version = await store.keys_version()
        commits = store.commits

        def half_done(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at) "
                "VALUES ('half', 'team-a', 'r', 'm', 'text', 0)"
            )
            raise RuntimeError("op failed after writing")

        gate = WriterGate(store)
        calls: list[Any] = [store.record_intent("i0", "team-a", "r", "m", "text", T0)]
        calls.append(store.create_key(issue_key("taken", now=2.0)[1]))  # first failure: whole-batch rollback
        calls.append(store.record_intent("i1", "team-a", "r", "m", "text", T0))
        calls.append(store.record_intent("i0", "team-a", "r", "m", "text", T0))  # duplicate: savepoint from now on
        calls.append(store._tx(half_done))
        calls.append(store.create_key(issue_key("fresh", now=3.0)[1]))
        calls.append(store.record_intent("i2", "team-a", "r", "m", "text", T0))
        results = asyncio.gather(*calls, return_exceptions=True)
        await gate.queued(len(calls))
        gate.open()
        i0, dup_key, i1, dup_intent, half, fresh, i2 = await results
        assert (i0, i1, fresh, i2) == (ADMITTED, ADMITTED, None, ADMITTED)
        assert isinstance(dup_key, KeyExists)
        assert isinstance(dup_intent, StoreError) and str(dup_intent).startswith("sqlite: UNIQUE constraint failed")
        assert isinstance(dup_intent.__cause__, sqlite3.IntegrityError)
        assert isinstance(half, RuntimeError)
        assert committed_intents(tmp_path / "g.db") == {"i0", "i1", "i2"}
        assert await store.get_key("taken") == taken
        assert await store.get_key("fresh") is not None
        assert await store.keys_version() == version + 1
        assert store.commits == commits + 1  # all in one batch

    async def test_batch_reruns_an_op_at_most_once(self, sqlite_store: SQLiteStore) -> None:
        """Ops undone by a whole-transaction rollback run again once; after that failures use savepoints."""
        store = sqlite_store
        runs: dict[str, int] = {}

        def op(name: str, fail: bool) -> Callable[[sqlite3.Connection], str]:
            def fn(conn: sqlite3.Connection) -> str:
                runs[name] = runs.get(name, 0) + 1
                conn.execute(
                    "INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at) "
                    "VALUES (?, 'team-a', 'r', 'm', 'text', 0)",
                    (name,),
                )
                if fail:
                    raise ValueError(name)
                return name

            return fn

        plan = [("a", False), ("b", False), ("x", True), ("c", False), ("y", True), ("d", False), ("z", True)]
        gate = WriterGate(store)
        results = asyncio.gather(*(store._tx(op(name, fail)) for name, fail in plan), return_exceptions=True)
        await gate.queued(len(plan))
        gate.open()
        got = await results
        assert got[:2] == ["a", "b"] and got[3] == "c" and got[5] == "d"
        assert [str(got[i]) for i in (2, 4, 6)] == ["x", "y", "z"]
        assert runs == {"a": 2, "b": 2, "x": 1, "c": 1, "y": 1, "d": 1, "z": 1}
        assert {i.intent_id for i in await store.list_intents()} == {"a", "b", "c", "d"}

    async def test_abandoned_transaction_reruns_the_others(self, sqlite_store: SQLiteStore) -> None:
        """If SQLite drops the whole transaction under a failing op, the ops it had undone are run again."""
        store = sqlite_store

        def failing(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("no such table: nowhere")

        def abandons(conn: sqlite3.Connection) -> None:  # as SQLite does on some I/O or full-disk errors
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

        gate = WriterGate(store)
        calls: list[Any] = [
            store.record_intent("i0", "team-a", "r", "m", "text", T0),
            store._tx(failing),  # turns savepoints on
            store.record_intent("i1", "team-a", "r", "m", "text", T0),
            store._tx(abandons),
            store.record_intent("i2", "team-a", "r", "m", "text", T0),
        ]
        results = asyncio.gather(*calls, return_exceptions=True)
        await gate.queued(len(calls))
        gate.open()
        i0, fail, i1, lost, i2 = await results
        assert (i0, i1, i2) == (ADMITTED, ADMITTED, ADMITTED)
        assert isinstance(fail, StoreError) and str(fail) == "sqlite: no such table: nowhere"
        assert isinstance(lost, StoreError) and str(lost) == "sqlite: disk I/O error"
        assert {i.intent_id for i in await store.list_intents()} == {"i0", "i1", "i2"}

    async def test_commit_error_fails_the_whole_batch(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """An error in COMMIT itself fails every op of the batch, commits none of them, and the store goes on."""
        store = sqlite_store

        def breaks_commit(conn: sqlite3.Connection) -> None:  # a deferred foreign key: checked at COMMIT only
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute("INSERT INTO task_bodies (task_id, body) VALUES ('no-such-task', x'00')")

        gate = WriterGate(store)
        calls: list[Any] = [
            store.record_intent("i0", "team-a", "r", "m", "text", T0),
            store._tx(breaks_commit),
            store.record_intent("i1", "team-a", "r", "m", "text", T0),
        ]
        results = asyncio.gather(*calls, return_exceptions=True)
        await gate.queued(len(calls))
        gate.open()
        for result in await results:
            assert isinstance(result, StoreError)
            assert str(result) == "sqlite: FOREIGN KEY constraint failed"
        assert committed_intents(tmp_path / "g.db") == set()
        await store.record_intent("i2", "team-a", "r", "m", "text", T0)
        assert committed_intents(tmp_path / "g.db") == {"i2"}

    async def test_close_with_queued_writes(self, tmp_path: Path) -> None:
        """close() while writes are queued: each one is committed or a StoreError, none hangs; later ones fail."""
        path = tmp_path / "g.db"
        store = await SQLiteStore.open(str(path))
        gate = WriterGate(store)
        writes = asyncio.gather(
            *(store.record_intent(f"i{n}", "team-a", "r", "m", "text", T0) for n in range(100)),
            return_exceptions=True,
        )
        await gate.queued(100)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.05)
        with pytest.raises(StoreError, match="store is closed"):
            await store.record_intent("late", "team-a", "r", "m", "text", T0)
        gate.open()
        results = await asyncio.wait_for(writes, timeout=30)
        await asyncio.wait_for(closing, timeout=30)
        committed = committed_intents(path)
        for n, result in enumerate(results):
            assert result == ADMITTED or isinstance(result, StoreError), result
            if result == ADMITTED:
                assert f"i{n}" in committed
        assert "late" not in committed
        assert results.count(ADMITTED) == 100  # in fact every queued write is committed before close returns

    async def test_cancelled_before_running_is_skipped(self, sqlite_store: SQLiteStore, tmp_path: Path) -> None:
        """A write whose caller gave up before the writer reached it is not run (as a queued executor job)."""
        store = sqlite_store
        gate = WriterGate(store)
        doomed = asyncio.ensure_future(store.record_intent("doomed", "team-a", "r", "m", "text", T0))
        kept = asyncio.ensure_future(store.record_intent("kept", "team-a", "r", "m", "text", T0))
        await gate.queued(2)
        doomed.cancel()
        gate.open()
        await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert committed_intents(tmp_path / "g.db") == {"kept"}

    async def test_memory_store_batches_between_reads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """:memory: (reads on the writer thread too) group-commits; a read runs between batches, never inside one."""
        import gateway.store.sqlite_writer as sqlite_writer

        monkeypatch.setattr(sqlite_writer, "_BATCH_BUDGET_S", 3600.0)
        store = await SQLiteStore.open(":memory:")
        try:
            gate = WriterGate(store)
            calls: list[Any] = []
            for n in range(100):
                calls.append(store.record_intent(f"i{n}", "team-a", "r", "m", "text", T0 + n))
                if n % 10 == 0:
                    calls.append(store.list_intents())
            results = asyncio.gather(*calls)
            await gate.queued(100)
            gate.open()
            reads = [result for result in await results if isinstance(result, list)]
            # The reads were queued after the first batch's job and before it requeued itself for the rest.
            assert [len(read) for read in reads] == [64] * 10
            assert len(await store.list_intents()) == 100
            assert store.commits == 2
        finally:
            await store.close()

    async def test_rebuild_usage_rollup_commits_alone(self, sqlite_store: SQLiteStore) -> None:
        """The maintenance rebuild keeps a transaction of its own (and is counted as a commit)."""
        store = sqlite_store
        await add_task(store, make_task("t1"))
        commits = store.commits
        await store.rebuild_usage_rollup()
        assert store.commits == commits + 1
        (total,) = await store.usage()
        assert total.tasks == 1


def test_a_settlement_is_not_a_truth_value() -> None:
    """``assert await store.settle(...)`` would pass whatever happened: it raises instead."""
    with pytest.raises(TypeError, match="first"):
        bool(Settlement(True))
