"""The link from the status cache to the ledger: every fresh upstream status is recorded on its task.

The poller calls it once per cached upstream answer (``on_fresh``), inside the shared call, so coalesced polls
record a status once; a status the ledger has no task for (another gateway's, or a passthrough) is ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.ledger.service import Ledger
from gateway.status.poller import FetchResult

OnFresh = Callable[[str, FetchResult], Awaitable[None]]


def record_in_ledger(ledger: Ledger) -> OnFresh:
    """The poller's ``on_fresh``: the ledger observes the status (progress; settlement when terminal)."""

    async def on_fresh(task_id: str, result: FetchResult) -> None:
        if result.parsed is None:
            return
        task = await ledger.find(task_id)
        if task is not None:
            await ledger.observe(task, result.parsed, result.body, polled=True)

    return on_fresh
