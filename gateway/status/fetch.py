"""The status poller's upstream call: ``GET /v1/videos/{task_id}`` through the upstream client.

A 2xx answer the gateway cannot read (not a JSON object) is the upstream's fault: 502 ``invalid_response``, never
cached. Every other answer goes back to the poller as it came, which decides what is cached and what is stale.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from gateway.catalog import DEFAULT_ACCOUNT
from gateway.ledger.service import Ledger
from gateway.logs import REQUEST_ID
from gateway.status.poller import FetchResult
from gateway.upstream.client import UpstreamClient

#: The upstream's status route (also the gateway's): the route label of every status call.
STATUS_ROUTE = "/v1/videos/{task_id}"

StatusFetch = Callable[[str], Awaitable[FetchResult]]


def upstream_status_fetch(upstream: UpstreamClient, ledger: Ledger | None = None) -> StatusFetch:
    """The ``fetch`` a ``StatusPoller`` calls on a miss: one upstream status call for ``task_id``, with the key of
    the upstream account that created the task (from the ledger; ``default`` for a task it does not know)."""

    async def fetch(task_id: str) -> FetchResult:
        task = await ledger.find(task_id) if ledger is not None else None  # in memory for a task just seen here
        # Sent with the id of the poll it serves (the settler polls outside any request: a fresh id).
        request_id = REQUEST_ID.get()
        answer = await upstream.request(
            "GET",
            f"/v1/videos/{quote(task_id, safe='')}",
            route=STATUS_ROUTE,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            account=task.account if task is not None else DEFAULT_ACCOUNT,
        )
        result = FetchResult.from_upstream(answer)
        if 200 <= answer.status < 300 and result.parsed is None:
            raise upstream.invalid_response()
        return result

    return fetch
