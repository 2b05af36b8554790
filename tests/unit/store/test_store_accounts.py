"""Upstream accounts in the store: the account on intents and tasks, capacity admitted atomically, old ledgers."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from test_store import T0, make_task

from gateway.store import open_store
from gateway.store.base import AccountMark, Store
from gateway.store.copy import copy_store
from gateway.store.sqlite import MIGRATIONS, SQLiteStore


async def admit(store: Store, n: int, account: str, limit: int, at: float = T0) -> bool:
    outcome = await store.record_intent(f"i{account}{n}", "team-a", f"r{n}", "m", "text", at, account, limit, T0 - 600)
    return outcome.admitted


class TestMarks:
    async def test_set_aside_and_unauthorized_marks_are_kept_apart(self, store: Store) -> None:
        """The two marks of one account are written independently; the latest of each wins."""
        assert await store.account_marks() == []
        await store.mark_account_aside("a", T0 + 30, T0)
        await store.mark_account_unauthorized("a", "0123abcd", T0 + 1)
        await store.mark_account_unauthorized("b", "feedbeef", T0 + 1)
        await store.mark_account_aside("a", T0 + 7, T0 + 2)  # a newer refusal's Retry-After
        assert await store.account_marks() == [
            AccountMark("a", T0 + 7, "0123abcd"),
            AccountMark("b", 0.0, "feedbeef"),
        ]

    async def test_ending_a_set_aside_leaves_a_newer_one(self, store: Store) -> None:
        """A task ending ends the set-aside its process knew of, never a later one another process wrote."""
        await store.mark_account_aside("a", T0 + 60, T0)
        await store.end_account_aside("a", T0 + 30)
        assert await store.account_marks() == [AccountMark("a", T0 + 60)]
        await store.end_account_aside("a", T0 + 60)
        assert await store.account_marks() == [AccountMark("a", 0.0)]
        await store.end_account_aside("unknown", T0)  # nothing to end: no error
        assert len(await store.account_marks()) == 1


class TestAdmission:
    async def test_limit_counts_intents_and_unsettled_tasks(self, store: Store) -> None:
        """An account takes intents until unsettled tasks + recent intents reach its limit; settling frees a slot."""
        assert [await admit(store, n, "a", 2) for n in range(3)] == [True, True, False]
        assert await admit(store, 9, "b", 2)  # another account has its own room
        await store.resolve_intent("ia0", replace(make_task("t0"), account="a"))
        assert not await admit(store, 3, "a", 2)  # the task counts as the intent did
        assert await store.account_in_flight(T0 - 600) == {"a": 2, "b": 1}
        await store.settle("t0", "completed", Decimal(5), Decimal("0.42"), b"{}", T0 + 1)
        assert await admit(store, 4, "a", 2)
        await store.drop_intent("ia4")
        await store.drop_intent("ia1")
        assert await store.account_in_flight(T0 - 600) == {"b": 1}
        assert await admit(store, 5, "a", 2)

    async def test_given_up_tasks_and_old_intents_free_room(self, store: Store) -> None:
        """A task given up (unknown) and an intent older than the hold window no longer count."""
        await store.record_intent("old", "team-a", "r", "m", "text", T0 - 700, "a", 1, T0 - 600)
        assert await admit(store, 1, "a", 1)
        await store.resolve_intent("ia1", replace(make_task("t1"), account="a"))
        assert not await admit(store, 2, "a", 1)
        await store.mark_unknown("t1", T0 + 1)
        assert await admit(store, 3, "a", 1)

    async def test_no_limit_is_a_plain_insert(self, store: Store) -> None:
        """max_in_flight 0: always written, recorded with its account."""
        assert all([await admit(store, n, "a", 0) for n in range(5)])
        assert {i.account for i in await store.list_intents()} == {"a"}

    async def test_task_keeps_its_account(self, store: Store) -> None:
        """The account is on the task row, read back by every query that returns tasks."""
        await store.resolve_intent("x", replace(make_task("t-acc"), account="spare"))
        task = await store.get_task("t-acc")
        assert task is not None and task.account == "spare"
        page, _ = await store.tasks_for_key("team-a")
        assert [t.account for t in page] == ["spare"]
        due = await store.tasks_needing_settlement(T0 + 10)
        assert [t.account for t in due] == ["spare"]

    async def test_concurrent_admissions_from_several_stores(self, backend_url: str) -> None:
        """Four processes' stores admitting at once on one database never pass the limit."""
        stores = [await open_store(backend_url) for _ in range(4)]
        try:
            results = await asyncio.gather(
                *(
                    s.record_intent(f"c{k}-{n}", "team-a", "r", "m", "text", T0, "a", 5, T0 - 600)
                    for k, s in enumerate(stores)
                    for n in range(10)
                )
            )
            assert sum(result.admitted for result in results) == 5
            assert await stores[0].account_in_flight(T0 - 600) == {"a": 5}
        finally:
            for s in stores:
                await s.close()


class TestExistingLedgers:
    async def test_sqlite_v1_ledger_migrates_to_default(self, tmp_path: Path) -> None:
        """A ledger written before accounts: its tasks and intents belong to 'default' after the upgrade."""
        path = tmp_path / "old.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
        conn.execute("INSERT INTO intents VALUES ('i-old', 'team-a', 'r', 'm', 'text', 1.0)")
        conn.commit()
        conn.close()
        old = await SQLiteStore.open(str(path))
        try:
            assert old.applied_migrations == tuple(v for v, _ in MIGRATIONS[1:])
            await old.resolve_intent("i-new", make_task("t-new"))
            task = await old.get_task("t-new")
            assert task is not None and task.account == "default"
            assert [i.account for i in await old.list_intents()] == ["default"]
        finally:
            await old.close()

    async def test_copy_store_keeps_accounts(self, tmp_path: Path) -> None:
        """copy-store moves every task's and intent's account along."""
        source = await open_store(f"sqlite:///{tmp_path / 'a.db'}")
        destination = await open_store(f"sqlite:///{tmp_path / 'b.db'}")
        try:
            await source.resolve_intent("x", replace(make_task("t1"), account="spare"))
            await source.record_intent("i1", "team-a", "r", "m", "text", T0, "other")
            report = await copy_store(source, destination)
            assert report.verified
            task = await destination.get_task("t1")
            assert task is not None and task.account == "spare"
            assert [i.account for i in await destination.list_intents()] == ["other"]
        finally:
            await source.close()
            await destination.close()
