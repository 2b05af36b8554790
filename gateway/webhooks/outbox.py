"""Completion webhooks delivered at least once from an outbox in the store, fairly across receivers and keys."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter as PromCounter

from gateway.store.base import OutboxEntry, OutboxRecord, Store, StoreError, TaskRecord
from gateway.validation.media_guard import Resolver
from gateway.webhooks.signing import key_signing_key, signed_headers
from gateway.webhooks.targets import TargetRefused, log_host, pin
from gateway.webhooks.transport import WebhookTransport

USER_AGENT: Final = "kling-gateway-webhooks"
_LEASE_MARGIN_S: Final = 30.0


@dataclass(frozen=True)
class OutboxOptions:
    """Limits of the outbox worker (``[webhooks]`` in the settings)."""

    allow_private_targets: bool = False
    concurrency: int = 8
    per_target_concurrency: int = 2
    max_pending_per_target: int = 1000
    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    timeout_s: float = 10.0
    resolve_timeout_s: float = 2.0
    poll_interval_s: float = 1.0
    lease_margin_s: float = _LEASE_MARGIN_S

    def __post_init__(self) -> None:
        if min(self.concurrency, self.per_target_concurrency, self.max_pending_per_target, self.max_attempts) < 1:
            raise ValueError("concurrency, per_target_concurrency, max_pending_per_target, max_attempts must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("base_delay_s must not be negative nor above max_delay_s")
        if min(self.timeout_s, self.resolve_timeout_s, self.poll_interval_s, self.lease_margin_s) <= 0:
            raise ValueError("timeout_s, resolve_timeout_s, poll_interval_s and lease_margin_s must be positive")

    @property
    def lease_s(self) -> float:
        """How long a claim holds a row: longer than any attempt can take."""
        return self.resolve_timeout_s + self.timeout_s + self.lease_margin_s


def delivery_id(task_id: str) -> str:
    """The ``webhook-id`` of a task's completion webhook: stable, and safe in a header whatever the task id."""
    return "msg_" + hashlib.sha256(task_id.encode()).hexdigest()[:32]


class WebhookOutbox:
    """Enqueues completion webhooks into the store and runs the worker that delivers them.

    ``outbox.for_keys(url_of)`` is what the ledger settles with (each row written by the settling transaction;
    ``await outbox.enqueue(...)`` writes one on its own); ``await outbox.run()`` is the worker loop (a background
    loop of the app); ``await outbox.aclose(timeout_s)`` stops it and closes the transport.

    A task's first terminal status is *enqueued*: one ``webhook_outbox`` row holding the key, the callback URL and the
    upstream's status body, with a delivery id derived from the task id, written by the very transaction that settles
    the task (``Store.settle`` with the ledger's :class:`KeyWebhooks` entry), so a crash cannot settle a task and lose
    its webhook. The row, not memory, is the delivery: a worker in each gateway process claims due
    rows with a lease (``Store.outbox_claim``; two workers or replicas never hold one row at once), makes one attempt
    per claim, and then deletes the row (2xx), schedules the next attempt with capped, jittered exponential backoff,
    or after ``max_attempts`` keeps it as ``failed`` for inspection. A process that stops or dies mid-attempt leaves
    the row pending: its lease runs out and any worker makes the attempt again (at least once; receivers de-duplicate
    on ``webhook-id``, the same on every attempt). At shutdown the worker waits briefly for attempts in progress and
    abandons the rest to their leases; nothing is lost.

    Every attempt is signed with the key's own secret (``gateway.webhooks.signing``), and its destination is checked
    and pinned anew (``gateway.webhooks.targets.pin``): a name with any private address is refused for that attempt.

    Fairness: at most ``concurrency`` attempts at once in a process, and at most ``per_target_concurrency`` for one
    receiver host and for one key (the claim skips hosts and keys at their cap), so a slow or failing receiver holds a
    few slots, never all of them. Pending rows are capped per host and per key (``max_pending_per_target``): beyond
    that, new deliveries *for that host or key* are dropped (error log and metric), never those of anyone else.

    Logs name the host, never the full URL (it may hold a token).
    """

    def __init__(
        self,
        store: Store,
        key: bytes,
        transport: WebhookTransport,
        resolver: Resolver,
        *,
        log: Any,
        deliveries: PromCounter,
        attempts: PromCounter,
        options: OutboxOptions | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not key:
            raise ValueError("the webhook key must not be empty")
        self._store = store
        self._key = key
        self._keys: dict[str, bytes] = {}
        self._transport = transport
        self._resolve = resolver
        self._log = log
        self._deliveries = deliveries
        self._attempts = attempts
        self._options = options or OutboxOptions()
        self._clock = clock
        self._jitter = jitter
        self._owner = uuid.uuid4().hex
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._by_host: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        self._closed = False
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker loop in the background (``aclose`` stops it)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self.run())

    def for_keys(self, url_of: Callable[[str], str | None]) -> KeyWebhooks:
        """The ledger's webhooks: to each key's webhook URL (``url_of``), if it has one."""
        return KeyWebhooks(self, url_of)

    @property
    def in_progress(self) -> int:
        """Attempts running in this process."""
        return len(self._running)

    def entry(self, task_id: str, key_name: str, url: str, body: bytes) -> OutboxEntry:
        """The outbox row of a delivery of ``body`` to ``url``, with this outbox's pending caps."""
        now = self._clock()
        record = OutboxRecord(
            delivery_id=delivery_id(task_id),
            key_name=key_name,
            host=log_host(url),
            url=url,
            body=body,
            created_at=now,
            next_attempt_at=now,
        )
        cap = self._options.max_pending_per_target
        return OutboxEntry(record, cap, cap)

    def recorded(self, entry: OutboxEntry, queued: bool) -> bool:
        """After ``entry``'s write committed: wake the worker, or report the drop (a duplicate, or its host or key
        at the pending cap); returns ``queued``."""
        if queued:
            self._wake.set()
        else:
            self._dropped(entry.record, "pending cap or duplicate")
        return queued

    def _dropped(self, record: OutboxRecord, reason: str) -> None:
        self._log.error("webhook_dropped", host=record.host, key=record.key_name, reason=reason)
        self._deliveries.labels("dropped").inc()

    async def enqueue(self, task_id: str, key_name: str, url: str, body: bytes) -> bool:
        """Record a delivery of ``body`` to ``url`` on its own; False (error log, metric) when it was dropped."""
        entry = self.entry(task_id, key_name, url, body)
        try:
            added = await self._store.outbox_add(entry.record, entry.max_pending_per_key, entry.max_pending_per_host)
        except StoreError as exc:
            self._dropped(entry.record, f"store: {exc}")
            return False
        return self.recorded(entry, added)

    async def run(self) -> None:
        """The worker: claim what is due and fits the caps, start it, sleep until woken or the next poll."""
        while not self._closed:
            try:
                await self.fill()
            except StoreError as exc:
                self._log.warning("webhook_claim_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._options.poll_interval_s)
            self._wake.clear()

    async def fill(self) -> int:
        """Claim due deliveries into the free slots and start them; how many were started."""
        options = self._options
        free = options.concurrency - len(self._running)
        if free <= 0 or self._closed:
            return 0
        cap = options.per_target_concurrency
        now = self._clock()
        claimed = await self._store.outbox_claim(
            now,
            self._owner,
            now + options.lease_s,
            free,
            cap,
            cap,
            busy_hosts=[host for host, n in self._by_host.items() if n >= cap],
            busy_keys=[key for key, n in self._by_key.items() if n >= cap],
        )
        started = 0
        for record in claimed:
            if self._closed or self._by_host[record.host] >= cap or self._by_key[record.key_name] >= cap:
                await self._store.outbox_release(record.delivery_id, self._owner)  # slots held by earlier claims
                continue
            self._by_host[record.host] += 1
            self._by_key[record.key_name] += 1
            task = asyncio.create_task(self._deliver(record))
            self._running.add(task)
            task.add_done_callback(functools.partial(self._finished, record))
            started += 1
        return started

    def _finished(self, record: OutboxRecord, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        for counts, name in ((self._by_host, record.host), (self._by_key, record.key_name)):
            counts[name] -= 1
            if counts[name] <= 0:
                del counts[name]
        self._wake.set()

    async def _deliver(self, record: OutboxRecord) -> None:
        """One attempt, then the row's fate: deleted, rescheduled, or failed."""
        attempt = record.attempts + 1
        error = await self._attempt(record)
        fields = {"host": record.host, "delivery": record.delivery_id, "attempt": attempt}
        try:
            if error is None:
                self._attempts.labels("delivered").inc()
                if await self._store.outbox_delivered(record.delivery_id, self._owner):
                    self._deliveries.labels("delivered").inc()
                self._log.info("webhook_delivered", **fields)
                return
            self._attempts.labels("failed").inc()
            if attempt >= self._options.max_attempts:
                if await self._store.outbox_failed(record.delivery_id, self._owner, error):
                    self._deliveries.labels("failed").inc()
                self._log.error("webhook_failed", **fields, error=error)
                return
            next_at = self._clock() + self._delay(attempt)
            await self._store.outbox_retry(record.delivery_id, self._owner, next_at, error)
            self._log.warning("webhook_attempt_failed", **fields, error=error)
        except StoreError as exc:  # the lease runs out and the attempt is made again: at least once
            self._log.warning("webhook_outcome_not_recorded", **fields, error=str(exc))

    async def _attempt(self, record: OutboxRecord) -> str | None:
        """Check and pin the destination, sign, POST; None on a 2xx, else what went wrong."""
        options = self._options
        try:
            target = await pin(
                record.url,
                self._resolve,
                timeout_s=options.resolve_timeout_s,
                allow_private=options.allow_private_targets,
            )
        except TargetRefused as exc:
            self._log.error("webhook_refused", host=record.host, delivery=record.delivery_id, reason=str(exc))
            return f"refused: {exc}"
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", USER_AGENT),
            *signed_headers(self._signing_key(record.key_name), record.delivery_id, int(self._clock()), record.body),
        ]
        try:
            async with asyncio.timeout(options.timeout_s):
                status = await self._transport.post(target, headers, record.body)
        except Exception as exc:  # network errors, timeouts, a client library refusing: a failed attempt
            return type(exc).__name__
        return None if 200 <= status < 300 else f"status {status}"

    def _signing_key(self, key_name: str) -> bytes:
        key = self._keys.get(key_name)
        if key is None:
            if len(self._keys) >= 10_000:  # bounded: derivation is cheap, the cache only saves a hash
                self._keys.clear()
            key = self._keys[key_name] = key_signing_key(self._key, key_name)
        return key

    def _delay(self, attempt: int) -> float:
        """Capped exponential backoff after failed attempt ``attempt`` (1-based), jittered to 50-100 %."""
        ceiling = min(self._options.max_delay_s, self._options.base_delay_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * self._jitter())

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop claiming, give attempts in progress ``timeout_s``, abandon the rest to their leases, close."""
        self._closed = True
        self._wake.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        running = set(self._running)
        if running:
            _, unfinished = await asyncio.wait(running, timeout=timeout_s)
            for task in unfinished:
                task.cancel()
            if unfinished:
                self._log.warning("webhooks_abandoned_to_lease", count=len(unfinished))
                await asyncio.gather(*unfinished, return_exceptions=True)
        await self._transport.aclose()


class KeyWebhooks:
    """The ledger's side of the outbox (``gateway.ledger.service.CompletionWebhooks``): the row its settling
    transaction writes for a key with a webhook URL, and the worker woken once that transaction committed."""

    def __init__(self, outbox: WebhookOutbox, url_of: Callable[[str], str | None]) -> None:
        self._outbox = outbox
        self._url_of = url_of

    def entry(self, task: TaskRecord, body: bytes) -> OutboxEntry | None:
        url = self._url_of(task.key_name)
        return self._outbox.entry(task.task_id, task.key_name, url, body) if url else None

    def recorded(self, entry: OutboxEntry, queued: bool) -> None:
        self._outbox.recorded(entry, queued)
