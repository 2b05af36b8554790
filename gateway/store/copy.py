"""Copy one store into another: how a one-machine gateway (SQLite) moves to PostgreSQL before scaling out.

``kling-gateway copy-store TO_URL`` copies what the configured store holds into the empty store at ``TO_URL``,
through the ``Store`` protocol only, so it works between any two backends (also back to SQLite, as a backup):

* every key as it is: hashes, revocations, rotation grace, limits, budgets, webhooks;
* every task with its status, settlement and stored final answer (the per-day usage rollup is rebuilt by the
  destination as the tasks arrive);
* submissions whose outcome is unknown (intents), for reconciliation;
* the webhook outbox: pending deliveries (with their attempt counts and next attempt times, so the destination's
  workers go on delivering them under the same ``webhook-id``) and failed ones (kept for inspection). Leases are
  not copied: the source's gateways are stopped, so nothing is mid-attempt;
* the archive rows (which task's video is archived where, with its size and SHA-256), so archived videos stay served.
* the audit trail of admin actions, every entry as it is.

Idempotency records (replays of answers, kept 24 h) are not copied. Stop the gateways writing to the source first:
tasks recorded during the copy would be missed. The copy ends by comparing usage by key, model, mode and day, and by
upstream account, on both stores: ``CopyReport.verified`` says they agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from gateway.store.base import Store, StoreError
from gateway.store.rows import MAX_PAGE

_CONCURRENT_WRITES = 32
_ALL_ROWS = 2**31 - 1


class DestinationNotEmpty(StoreError):
    """The destination already holds keys, tasks or intents: a copy would mix two ledgers."""


@dataclass(frozen=True)
class CopyReport:
    keys: int
    tasks: int
    intents: int
    verified: bool
    webhooks: int = 0
    audit: int = 0


async def copy_store(source: Store, destination: Store, *, progress: Callable[[int], None] | None = None) -> CopyReport:
    """Copy keys, tasks, intents, the webhook outbox and the audit trail into the empty ``destination``."""
    await _require_empty(destination)
    keys = await source.list_keys()
    for record in keys:
        await destination.create_key(record)
    tasks = 0
    cursor: str | None = None
    while True:
        page, cursor = await source.tasks_for_key(None, MAX_PAGE, cursor)
        for start in range(0, len(page), _CONCURRENT_WRITES):
            batch = page[start : start + _CONCURRENT_WRITES]
            await asyncio.gather(*(destination.resolve_intent(f"copy-{t.task_id}", t) for t in batch))
        tasks += len(page)
        if progress is not None:
            progress(tasks)
        if cursor is None:
            break
    intents = await source.list_intents()
    for intent in intents:
        await destination.record_intent(
            intent.intent_id,
            intent.key_name,
            intent.request_id,
            intent.model,
            intent.mode,
            intent.submitted_at,
            account=intent.account,
        )
    await _copy_archive_rows(source, destination)
    webhooks = 0
    for state in ("pending", "failed"):
        for row in await source.outbox_list(state, limit=_ALL_ROWS):
            webhooks += await destination.outbox_add(row, _ALL_ROWS, _ALL_ROWS)
    audit = 0
    cursor = None
    while True:
        entries, cursor = await source.audit_list(None, MAX_PAGE, cursor)
        for entry in entries:
            await destination.audit_add(entry)
        audit += len(entries)
        if cursor is None:
            break
    by = ("key", "model", "mode", "day")
    verified = await source.usage(None, None, by) == await destination.usage(None, None, by)
    accounts = ("account",)
    verified = verified and await source.usage(None, None, accounts) == await destination.usage(None, None, accounts)
    return CopyReport(
        keys=len(keys),
        tasks=tasks,
        intents=len(intents),
        verified=verified,
        webhooks=webhooks,
        audit=audit,
    )


async def _copy_archive_rows(source: Store, destination: Store) -> None:
    after = ""
    while page := await source.archive_records(after, MAX_PAGE):
        for record in page:
            await destination.restore_archive(record)
        after = page[-1].task_id


async def _require_empty(destination: Store) -> None:
    page, _ = await destination.tasks_for_key(None, 1)
    if await destination.list_keys() or page or await destination.list_intents():
        raise DestinationNotEmpty("the destination store already holds keys, tasks or intents; copy into an empty one")
