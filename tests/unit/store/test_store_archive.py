"""The archive rows on both backends: candidates, the once-across-processes claim, retries, expiry, copy-store.

Parametrized over SQLite and PostgreSQL (skipped when no PostgreSQL server is reachable).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

from support.records import std_task

from gateway.store import open_store
from gateway.store.base import ArchiveRecord, Store, TaskRecord
from gateway.store.copy import copy_store

T0 = 1_767_225_600.0


def task(task_id: str) -> TaskRecord:
    return std_task(task_id, "team-a", T0)


async def completed(store: Store, task_id: str, at: float, outcome: str = "completed") -> None:
    await store.resolve_intent(f"i-{task_id}", task(task_id))
    body = b'{"status": "%s", "video_url": "https://cdn.example/v.mp4"}' % outcome.encode()
    assert (await store.settle(task_id, outcome, Decimal(5), Decimal("0.42"), body, at)).first


async def test_candidates_are_completed_tasks_since(store: Store) -> None:
    """Only completed tasks settled since the bound, oldest first; failed and unsettled ones never."""
    await completed(store, "old", T0)
    await completed(store, "new", T0 + 100)
    await completed(store, "newer", T0 + 200)
    await completed(store, "broken", T0 + 150, outcome="failed")
    await store.resolve_intent("i-running", task("running"))
    assert [i for i, _ in await store.archive_candidates(T0 + 50, T0 + 300)] == ["new", "newer"]
    assert [i for i, _ in await store.archive_candidates(0, T0 + 300, limit=1)] == ["old"]


async def test_claim_is_won_once(backend_url: str, store: Store) -> None:
    """Of many processes claiming at once, one wins; after the claim runs out another may take it."""
    await completed(store, "t1", T0)
    others = [await open_store(backend_url) for _ in range(3)]
    try:
        wins = await asyncio.gather(*(s.archive_claim("t1", T0, T0 + 60) for s in [store, *others] * 3))
    finally:
        for other in others:
            await other.close()
    assert sum(wins) == 1
    assert [i for i, _ in await store.archive_candidates(0, T0 + 30)] == []  # claimed: not a candidate
    assert await store.archive_claim("t1", T0 + 30, T0 + 90) is False
    assert [i for i, _ in await store.archive_candidates(0, T0 + 61)] == ["t1"]  # the claimant died: taken again
    assert await store.archive_claim("t1", T0 + 61, T0 + 120) is True


async def test_stored_record_and_summary(store: Store) -> None:
    await completed(store, "t1", T0)
    await completed(store, "t2", T0)
    assert await store.archive_claim("t1", T0, T0 + 60)
    await store.archive_stored("t1", "t1.mp4", 1234, "ab" * 32, T0 + 5)
    record = await store.get_archive("t1")
    assert record == ArchiveRecord("t1", "stored", 0, None, "t1.mp4", 1234, "ab" * 32, T0 + 5, None)
    assert await store.archive_claim("t1", T0 + 999, T0 + 2000) is False  # stored: never again
    assert [i for i, _ in await store.archive_candidates(0, T0 + 999)] == ["t2"]
    summary = await store.archive_summary()
    assert summary["stored"] == (1, 1234)
    assert summary["unarchived"] == (1, 0)
    assert summary["failed"] == (0, 0)


async def test_retry_backs_off_then_gives_up(store: Store) -> None:
    await completed(store, "t1", T0)
    assert await store.archive_claim("t1", T0, T0 + 60)
    await store.archive_retry("t1", T0 + 10, "boom")
    record = await store.get_archive("t1")
    assert record is not None
    assert (record.state, record.attempts, record.error) == ("claimed", 1, "boom")
    assert [i for i, _ in await store.archive_candidates(0, T0 + 5)] == []  # backing off
    assert [i for i, _ in await store.archive_candidates(0, T0 + 11)] == ["t1"]
    assert await store.archive_claim("t1", T0 + 11, T0 + 70)
    await store.archive_retry("t1", None, "still broken")
    record = await store.get_archive("t1")
    assert record is not None
    assert (record.state, record.attempts) == ("failed", 2)
    assert [i for i, _ in await store.archive_candidates(0, T0 + 10_000)] == []
    assert (await store.archive_summary())["failed"] == (1, 0)


async def test_expiry_listing_and_removal(store: Store) -> None:
    for n, at in enumerate((T0, T0 + 100, T0 + 200)):
        await completed(store, f"t{n}", T0)
        assert await store.archive_claim(f"t{n}", T0, T0 + 60)
        await store.archive_stored(f"t{n}", f"t{n}.mp4", 10, "00" * 32, at)
    old = await store.archives_stored_before(T0 + 150)
    assert [r.task_id for r in old] == ["t0", "t1"]
    await store.archive_removed("t0")
    assert [r.task_id for r in await store.archives_stored_before(T0 + 150)] == ["t1"]
    assert (await store.get_archive("t0")).state == "removed"  # type: ignore[union-attr]


async def test_copy_store_keeps_archive_rows(store: Store, tmp_path: Path) -> None:
    await completed(store, "t1", T0)
    assert await store.archive_claim("t1", T0, T0 + 60)
    await store.archive_stored("t1", "t1.mp4", 77, "cd" * 32, T0 + 1)
    destination = await open_store(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        report = await copy_store(store, destination)
        assert report.verified
        assert await destination.get_archive("t1") == await store.get_archive("t1")
    finally:
        await destination.close()


async def test_retry_failed_makes_given_up_copies_claimable(store: Store) -> None:
    await completed(store, "t1", T0)
    await completed(store, "t2", T0)
    for task_id in ("t1", "t2"):
        assert await store.archive_claim(task_id, T0, T0 + 60)
    await store.archive_retry("t1", None, "gave up")
    await store.archive_stored("t2", "t2.mp4", 1, "00" * 32, T0)
    assert await store.archive_retry_failed() == 1
    record = await store.get_archive("t1")
    assert record is not None
    assert (record.state, record.attempts) == ("claimed", 0)
    assert [i for i, _ in await store.archive_candidates(0, T0)] == ["t1"]
    assert await store.archive_claim("t1", T0, T0 + 60)
