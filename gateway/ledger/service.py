"""The ledger service: records submissions durably, settles tasks once, checks budgets, and moves the metrics.

Every billing metric is moved here and only on the store's word: generation counters when the task row is
committed, settlement counters when ``store.settle`` says this call settled the task (first and only time, in any
process). The ledger and ``/metrics`` are therefore two views of the same events and cannot disagree.

Durability of a submission: an *intent* row is written before forwarding; on the upstream's acceptance the task
row replaces it in one transaction, before the client sees 200. If that write fails, the client still gets its
task and a background retry keeps writing it; if the process dies first, the intent stays as "outcome unknown".
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from gateway.auth.principal import Principal
from gateway.bounded import LRUCache
from gateway.catalog import DEFAULT_ACCOUNT, PENDING, TERMINAL
from gateway.errors import TooManyRequests
from gateway.ledger.pricing import (
    Estimate,
    PriceTable,
    bounded_seconds,
    cost,
    estimate,
    settlement_seconds,
    to_report,
)
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.store.base import Store, StoreError, TaskRecord
from gateway.validation.checks import ValidRequest

#: Fields an upstream may report a completed video's output seconds in, most specific first.
_SECONDS_FIELDS = ("output_seconds", "video_duration", "seconds", "duration")


@dataclass(frozen=True, slots=True)
class Submission:
    """A submission between its intent row and its outcome."""

    intent_id: str
    principal: Principal
    request: ValidRequest
    estimate: Estimate
    request_id: str
    submitted_at: float
    account: str = DEFAULT_ACCOUNT


class DuplicateTaskId(Exception):
    """The upstream answered a submission with a task id the ledger already holds."""

    def __init__(self, task_id: str, owner: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id
        self.owner = owner


def reported_seconds(body: dict[str, Any], requested: int) -> tuple[Decimal | None, str | None]:
    """Output seconds the upstream reports for a completed task, if usable, else why not (``None, None`` when it
    reports none). The first field present decides (``usage`` first): see ``pricing.bounded_seconds``."""
    usage = body.get("usage")
    sources = (usage, body) if isinstance(usage, dict) else (body,)
    for source in sources:
        for name in _SECONDS_FIELDS:
            value = source.get(name)
            if value is not None:
                return bounded_seconds(value, requested)
    return None, None


def month_bounds(now: float) -> tuple[float, float]:
    """[start, end) of the UTC calendar month containing ``now``."""
    moment = datetime.fromtimestamp(now, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    days = calendar.monthrange(moment.year, moment.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400


class Ledger:
    def __init__(
        self,
        store: Store,
        prices: PriceTable,
        metrics: Metrics,
        log: Logger,
        *,
        clock: Callable[[], float] = time.time,
        retry_delays_s: tuple[float, ...] = (0.1, 0.5, 1, 2, 5, 10, 30, 60),
        on_terminal: Callable[[TaskRecord, bytes], None] | None = None,
        recent_tasks: int = 100_000,
        status_write_interval_s: float = 5.0,
        on_release: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.store = store
        self._prices = prices
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._retry_delays = retry_delays_s
        self._pending_writes: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = {}
        self._on_terminal = on_terminal
        # An account's slot is free again: (account, True) when a task ended, (account, False) when a submission
        # was refused or failed before the upstream had it.
        self._on_release = on_release
        # Task rows this process has seen, for ownership checks without a store read per poll. A row's owner and
        # terms never change; a settled row (with its final answer) never changes again either.
        self._recent: LRUCache[str, TaskRecord] = LRUCache(recent_tasks)
        # Last pending status written per task: an unchanged status is written at most once per interval, so a
        # busy poll loop does not turn into a database write per upstream answer.
        self._written: LRUCache[str, tuple[str, int | None, float]] = LRUCache(recent_tasks)
        self._write_interval = status_write_interval_s

    async def find(self, task_id: str) -> TaskRecord | None:
        """The ledger row of ``task_id`` (from memory when this process has seen it), or None."""
        task = self._recent.peek(task_id)
        if task is not None:
            self._recent.touch(task_id)
            return task
        task = await self.store.get_task(task_id)
        if task is not None:
            self._remember(task)
        return task

    def _remember(self, task: TaskRecord) -> None:
        self._recent.put(task.task_id, task)

    async def load_in_flight(self) -> None:
        """Set the in-flight gauge from the ledger: the count across every process, not just this one's."""
        counts = {row.model: row.pending for row in await self.store.usage(None, None, ("model",)) if row.model}
        for model in set(counts) | set(self._in_flight):
            self._in_flight[model] = counts.get(model, 0)
            self._metrics.tasks_in_flight.labels(model).set(self._in_flight[model])

    async def follow_in_flight(self, interval_s: float = 15.0) -> None:
        """Re-read the in-flight counts now and then, so other processes' settlements show here too."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.load_in_flight()
            except StoreError as exc:
                self._log.error("in_flight_refresh_failed", error=str(exc))

    async def load_budgets(self) -> None:
        """Export each budgeted key's budget and month-to-date spend (settled + outstanding), for alerting."""
        start, end = month_bounds(self._clock())
        for record in await self.store.list_keys():
            if record.monthly_budget_usd is None or record.revoked:
                continue
            spent = await self.store.outstanding_and_settled_usd(record.name, start, end)
            self._metrics.key_budget.labels(record.name).set(float(record.monthly_budget_usd))
            self._metrics.key_spend.labels(record.name).set(float(spent))

    async def follow_budgets(self, interval_s: float = 60.0) -> None:
        while True:
            try:
                await self.load_budgets()
            except StoreError as exc:
                self._log.error("budget_refresh_failed", error=str(exc))
            await asyncio.sleep(interval_s)

    def _move_in_flight(self, model: str, delta: int) -> None:
        self._in_flight[model] = max(0, self._in_flight.get(model, 0) + delta)
        self._metrics.tasks_in_flight.labels(model).set(self._in_flight[model])

    # -- submission ------------------------------------------------------------------------------------------

    def estimate(self, request: ValidRequest) -> Estimate:
        return estimate(self._prices, request.model, request.mode, request.duration)

    @contextlib.asynccontextmanager
    async def budget_reserved(self, principal: Principal, est: Estimate) -> AsyncIterator[None]:
        """Check the key's monthly budget for ``est`` and hold it while the submission is on its way upstream.

        429 ``budget_exceeded`` when settled + outstanding + held + this estimate would pass the budget. The check
        and the hold are one store operation (``Store.hold_budget``), serialised per key across workers and
        replicas, so concurrent submissions never overshoot. The hold is released when the block ends: by then the
        submission's task row, if any, is written (a submission may be tried on several upstream accounts, so the
        hold belongs to the submission, not to one intent).
        """
        budget = principal.monthly_budget_usd
        if budget is None:
            yield
            return
        now = self._clock()
        month = month_bounds(now)
        hold_id = uuid.uuid4().hex
        held, spent = await self.store.hold_budget(hold_id, principal.name, est.usd, budget, month, now)
        self._metrics.key_budget.labels(principal.name).set(float(budget))
        self._metrics.key_spend.labels(principal.name).set(float(spent + est.usd if held else spent))
        if not held:
            retry_after = max(1, int(month[1] - now))
            raise TooManyRequests(
                f"Monthly budget of ${to_report(budget)} for key '{principal.name}' would be exceeded: "
                f"${to_report(spent)} settled, outstanding or in flight this month + ${to_report(est.usd)} "
                "for this request.",
                code="budget_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        try:
            yield
        finally:
            try:
                await self.store.release_hold(hold_id)
            except StoreError as exc:  # it expires on its own; meanwhile it only makes the check stricter
                self._log.error("budget_hold_release_failed", key=principal.name, error=str(exc))

    async def begin(
        self,
        principal: Principal,
        request: ValidRequest,
        est: Estimate,
        request_id: str,
        account: str = DEFAULT_ACCOUNT,
        max_in_flight: int = 0,
        hold_since: float = 0.0,
    ) -> Submission | None:
        """Write the intent on ``account`` before anything goes upstream; None when the account has no room."""
        sub = Submission(uuid.uuid4().hex, principal, request, est, request_id, self._clock(), account)
        admitted = await self.store.record_intent(
            sub.intent_id,
            principal.name,
            request_id,
            request.model,
            request.mode,
            sub.submitted_at,
            account,
            max_in_flight,
            hold_since,
        )
        return sub if admitted else None

    async def refused(self, sub: Submission) -> None:
        """The upstream answered without creating a task: forget the intent (its account's slot is free)."""
        try:
            await self.store.drop_intent(sub.intent_id)
        except StoreError as exc:
            self._log.error("intent_drop_failed", intent_id=sub.intent_id, error=str(exc))
        if self._on_release is not None:
            self._on_release(sub.account, False)

    async def accepted(self, sub: Submission, task_id: str) -> TaskRecord:
        """Record the task (retrying in the background if the store fails) and count it.

        ``DuplicateTaskId`` when the ledger already has ``task_id``: the row and its owner stay as they are, and
        this submission's intent stays as outcome unknown (the upstream answered with an id it had given before).
        """
        # This process's own tasks are checked in memory; any other owner is found by the insert itself (below),
        # so a new id costs no store read.
        existing = self._recent.peek(task_id)
        if existing is not None:
            raise DuplicateTaskId(task_id, existing.key_name)
        request, est = sub.request, sub.estimate
        task = TaskRecord(
            task_id=task_id,
            key_name=sub.principal.name,
            model=sys.intern(request.model),  # kept in memory per task: share the few distinct names
            mode=sys.intern(request.mode),
            tier=sys.intern(request.tier or ""),
            audio=bool(request.audio),
            duration=request.duration,
            duration_defaulted=est.duration_defaulted,
            estimate_seconds=est.seconds,
            estimate_usd=est.usd,
            price_per_second_usd=est.price_per_second,
            mode_multiplier=est.mode_multiplier,
            request_id=sub.request_id,
            submitted_at=sub.submitted_at,
            account=sub.account,
        )
        try:
            inserted = await self.store.resolve_intent(sub.intent_id, task)
        except StoreError as exc:
            inserted = True  # unknown yet: the background retry finds out
            self._log.error("task_write_failed", task_id=task_id, error=str(exc), will_retry=True)
            write = asyncio.create_task(self._retry_write(sub.intent_id, task))
            self._pending_writes.add(write)
            write.add_done_callback(self._pending_writes.discard)
        if not inserted:  # another process recorded this id in between
            owner = await self.store.get_task(task_id)
            raise DuplicateTaskId(task_id, owner.key_name if owner is not None else "")
        self._remember(task)
        self._count_generation(task)
        return task

    async def _retry_write(self, intent_id: str, task: TaskRecord) -> None:
        for delay in self._retry_delays:
            await asyncio.sleep(delay)
            try:
                await self.store.resolve_intent(intent_id, task)
            except StoreError as exc:
                self._log.error("task_write_failed", task_id=task.task_id, error=str(exc), will_retry=True)
                continue
            self._log.info("task_write_recovered", task_id=task.task_id)
            return
        self._log.error("task_write_abandoned", task_id=task.task_id, intent_id=intent_id)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for background task writes, e.g. at shutdown."""
        if self._pending_writes:
            await asyncio.wait(set(self._pending_writes), timeout=timeout_s)

    def _count_generation(self, task: TaskRecord) -> None:
        m, key = self._metrics, task.key_name
        m.generations.labels(task.model, task.tier, "true" if task.audio else "false", task.mode, key).inc()
        m.generation_seconds.labels(task.model, task.mode, key).inc(task.estimate_seconds)
        m.estimated_cost.labels(task.model, task.mode, key).inc(float(task.estimate_usd))
        self._move_in_flight(task.model, +1)

    # -- status and settlement ---------------------------------------------------------------------------------

    async def observe(self, task: TaskRecord, status_body: dict[str, Any], raw: bytes, *, polled: bool) -> None:
        """Record a status the upstream reported for ``task``; settle it (once) when terminal."""
        status = status_body.get("status")
        if not isinstance(status, str) or task.settled:
            return
        now = self._clock()
        if status in TERMINAL:
            reported, anomaly = reported_seconds(status_body, task.estimate_seconds)
            if status != "completed":
                anomaly = None
            seconds = settlement_seconds(status, reported, task.estimate_seconds)
            usd = cost(task.price_per_second_usd, task.mode_multiplier, seconds)
            first = await self.store.settle(task.task_id, status, seconds, usd, raw, now)
            if task.task_id in self._recent:
                self._remember(
                    dataclasses.replace(task, status=status, outcome=status, terminal_body=raw, settled_at=now)
                )
            if first:
                self._count_settlement(task, status, usd)
                if anomaly is not None:  # once per task: only the call that settled it gets here
                    self._metrics.settlement_anomalies.labels(anomaly).inc()
                    self._log.warning(
                        "settlement_anomaly", task_id=task.task_id, reason=anomaly, settled_seconds=str(seconds)
                    )
                if self._on_terminal is not None:
                    self._on_terminal(task, raw)
            return
        if status not in PENDING:
            self._log.warning("unknown_task_status", task_id=task.task_id, status=status[:40])
            return
        raw_progress = status_body.get("progress")
        progress = (
            raw_progress
            if isinstance(raw_progress, int) and not isinstance(raw_progress, bool) and 0 <= raw_progress <= 100
            else None
        )
        last = self._written.peek(task.task_id)
        if polled and last is not None and last[:2] == (status, progress) and now - last[2] < self._write_interval:
            return  # (the settler's own checks are always written: they are rate-limited already)
        await self.store.update_status(task.task_id, status, progress, now, polled)
        self._written.put(task.task_id, (status, progress, now))

    async def give_up(self, task: TaskRecord) -> bool:
        """Stop chasing ``task``: it stays ``unknown`` at its estimate."""
        if await self.store.mark_unknown(task.task_id, self._clock()):
            self._count_settlement(task, "unknown", task.estimate_usd)
            self._metrics.settler_gave_up.labels(task.model).inc()
            self._log.warning("task_unknown", task_id=task.task_id, model=task.model, key=task.key_name)
            return True
        return False

    def _count_settlement(self, task: TaskRecord, outcome: str, usd: Decimal) -> None:
        m = self._metrics
        m.tasks_settled.labels(task.model, outcome, task.key_name).inc()
        m.settled_cost.labels(task.model, task.mode, task.key_name).inc(float(usd))
        self._move_in_flight(task.model, -1)
        if self._on_release is not None:
            self._on_release(task.account, True)
