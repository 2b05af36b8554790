"""What the admin UI asks of both stores: task pages filtered by status (and key), and signed-out sessions."""

from __future__ import annotations

from decimal import Decimal

import pytest
from support.records import std_task

from gateway.store import open_store
from gateway.store.base import Store, TaskRecord

T0 = 1_767_225_600.0


def make_task(task_id: str, key: str, at: float) -> TaskRecord:
    return std_task(task_id, key, at)


async def seed(store: Store) -> dict[str, str]:
    """30 tasks over two keys, every third failed, every fifth in progress, the rest queued; id -> status."""
    statuses = {}
    for n in range(30):
        task_id = f"t{n:02d}"
        at = T0 + n // 2  # pairs share a timestamp: the task id breaks the tie
        assert await store.resolve_intent(f"i-{task_id}", make_task(task_id, "team-a" if n % 2 else "team-b", at))
        if n % 3 == 0:
            await store.settle(task_id, "failed", Decimal(0), Decimal(0), None, at + 1)
            statuses[task_id] = "failed"
        elif n % 5 == 0:
            await store.update_status(task_id, "in_progress", 10, at + 1, polled=True)
            statuses[task_id] = "in_progress"
        else:
            statuses[task_id] = "queued"
    return statuses


async def all_pages(store: Store, key: str | None, status: str | None, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.tasks_for_key(key, limit, cursor, status=status)
        pages.append([t.task_id for t in page])
        if cursor is None:
            return pages


@pytest.mark.parametrize("key", [None, "team-a", "team-b"])
@pytest.mark.parametrize("status", ["failed", "in_progress", "queued"])
async def test_pages_of_one_status_newest_first(store: Store, key: str | None, status: str) -> None:
    """Every task of that status (and key) once, newest first by (submitted_at, task_id), in full pages."""
    statuses = await seed(store)
    expected = sorted(
        (t for t, s in statuses.items() if s == status and (key is None or (int(t[1:]) % 2 == 1) == (key == "team-a"))),
        key=lambda t: (T0 + int(t[1:]) // 2, t),
        reverse=True,
    )
    pages = await all_pages(store, key, status, 2)
    assert [t for page in pages for t in page] == expected
    assert all(len(page) == 2 for page in pages[:-1])
    assert expected  # the seed has tasks of every status for every key


async def test_the_page_carries_the_status_it_was_filtered_by(store: Store) -> None:
    await seed(store)
    page, _ = await store.tasks_for_key(None, 100, status="failed")
    assert len(page) == 10 and {t.status for t in page} == {"failed"}
    assert await store.tasks_for_key("nobody", 10, status="failed") == ([], None)
    assert await store.tasks_for_key("team-a", 10, status="completed") == ([], None)


@pytest.mark.parametrize("status", ["done", "", "FAILED"])
async def test_an_unknown_status_is_a_value_error(store: Store, status: str) -> None:
    with pytest.raises(ValueError, match="status"):
        await store.tasks_for_key(None, 10, status=status)


async def test_a_signed_out_session_is_revoked_until_it_expires(store: Store) -> None:
    assert not await store.ui_session_revoked("s1")
    await store.revoke_ui_session("s1", T0 + 1800, T0)
    await store.revoke_ui_session("s1", T0 + 1800, T0 + 5)  # twice (two tabs): no error
    assert await store.ui_session_revoked("s1")
    assert not await store.ui_session_revoked("s2")
    # A later sign-out purges revocations whose cookies have expired (they verify no more anyway).
    await store.revoke_ui_session("s2", T0 + 3700, T0 + 1800)
    assert not await store.ui_session_revoked("s1")
    assert await store.ui_session_revoked("s2")


async def test_a_revocation_is_seen_by_another_store_on_the_same_database(backend_url: str) -> None:
    first, second = await open_store(backend_url), await open_store(backend_url)
    try:
        await first.revoke_ui_session("s1", T0 + 1800, T0)
        assert await second.ui_session_revoked("s1")
    finally:
        await first.close()
        await second.close()
