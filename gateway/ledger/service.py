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
from typing import Any, Protocol

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
from gateway.store.base import Admission, HoldRequest, OutboxEntry, Store, StoreError, TaskRecord
from gateway.validation.checks import ValidRequest

#: Fields an upstream may report a completed video's output seconds in, most specific first.
_SECONDS_FIELDS = ("output_seconds", "video_duration", "seconds", "duration")


@dataclass(slots=True)
class BudgetHold:
    """A submission's hold on its key's monthly budget (``Ledger.budget_hold``), taken by its first intent.

    ``taken`` once an intent was admitted with it (or may have been: a failed write), so a submission moved to
    another account keeps it and asks no second one; ``checked`` once the store checked the budget for it;
    ``released`` once the write of its task row took it along (``Store.resolve_intent``), or once a background
    retry of that write owns it. A hold taken and not released is released on its own when the submission ends.
    """

    hold_id: str
    budget: Decimal
    taken: bool = False
    checked: bool = False
    released: bool = False


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
    budget: BudgetHold | None = None


class CompletionWebhooks(Protocol):
    """Where a task's completion webhook comes from (``gateway.webhooks.outbox.KeyWebhooks``)."""

    def entry(self, task: TaskRecord, body: bytes) -> OutboxEntry | None:
        """The outbox row to write with ``task``'s settlement (terminal status ``body``), or None: no webhook."""

    def recorded(self, entry: OutboxEntry, queued: bool) -> None:
        """After the settlement committed: wake the deliveries, or report ``entry`` dropped (pending cap)."""


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
        webhooks: CompletionWebhooks | None = None,
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
        self._webhooks = webhooks
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
    async def budget_hold(self, principal: Principal) -> AsyncIterator[BudgetHold | None]:
        """The submission's hold on its key's monthly budget (None for a key without one), for :meth:`begin`.

        Nothing is written here: the first intent admitted takes the hold in its own transaction (no extra write),
        after checking settled + outstanding + held + the estimate against the budget (429 ``budget_exceeded``
        otherwise), serialised per key across workers and replicas so concurrent submissions never overshoot. The
        hold belongs to the submission, not to one intent, since a submission may be tried on several upstream
        accounts; the task write of the accepted submission releases it in its own transaction, and a submission
        that ends without one (refused, failed, cancelled) releases it here.
        """
        budget = principal.monthly_budget_usd
        if budget is None:
            yield None
            return
        hold = BudgetHold(uuid.uuid4().hex, budget)
        try:
            yield hold
        finally:
            if hold.taken and not hold.released:
                try:
                    await self.store.release_hold(hold.hold_id)
                except StoreError as exc:  # it expires on its own; meanwhile it only makes the check stricter
                    self._log.error("budget_hold_release_failed", key=principal.name, error=str(exc))

    async def check_budget(self, principal: Principal, est: Estimate, budget: BudgetHold | None) -> None:
        """429 ``budget_exceeded`` if ``est`` would pass the budget now, for a submission no intent has checked yet
        (one about to wait for capacity, or finding no account): a read, so a refusal comes first; the admission of
        an intent checks again, atomically."""
        if budget is None or budget.checked or budget.taken:
            return
        now = self._clock()
        month = month_bounds(now)
        spent = await self.store.budget_spent(principal.name, month, now)
        self._budget_checked(principal, est, budget, spent, fits=spent + est.usd <= budget.budget, now=now)

    def _budget_checked(
        self, principal: Principal, est: Estimate, budget: BudgetHold, spent: Decimal, *, fits: bool, now: float
    ) -> None:
        """Export the key's budget and spend (with ``est`` once held); 429 ``budget_exceeded`` unless it ``fits``."""
        self._metrics.key_budget.labels(principal.name).set(float(budget.budget))
        self._metrics.key_spend.labels(principal.name).set(float(spent + est.usd if budget.taken else spent))
        if not fits:
            retry_after = max(1, int(month_bounds(now)[1] - now))
            raise TooManyRequests(
                f"Monthly budget of ${to_report(budget.budget)} for key '{principal.name}' would be exceeded: "
                f"${to_report(spent)} settled, outstanding or in flight this month + ${to_report(est.usd)} "
                "for this request.",
                code="budget_exceeded",
                headers={"Retry-After": str(retry_after)},
            )

    async def begin(
        self,
        principal: Principal,
        request: ValidRequest,
        est: Estimate,
        request_id: str,
        account: str = DEFAULT_ACCOUNT,
        max_in_flight: int = 0,
        hold_since: float = 0.0,
        budget: BudgetHold | None = None,
    ) -> Submission | None:
        """Write the intent on ``account`` before anything goes upstream; None when the account has no room.

        ``budget`` is the submission's hold from :meth:`budget_hold`: the first intent admitted takes it in its
        own transaction (429 ``budget_exceeded``, nothing written, when it would pass the budget); its task write
        releases it.
        """
        sub = Submission(uuid.uuid4().hex, principal, request, est, request_id, self._clock(), account, budget)
        hold = None
        if budget is not None and not budget.taken:
            now = sub.submitted_at
            hold = HoldRequest(budget.hold_id, est.usd, budget.budget, month_bounds(now), now)
        try:
            outcome = await self.store.record_intent(
                sub.intent_id,
                principal.name,
                request_id,
                request.model,
                request.mode,
                sub.submitted_at,
                account,
                max_in_flight,
                hold_since,
                hold,
            )
        except BaseException:
            if hold is not None and budget is not None:
                budget.taken = True  # it may have been written: released on the way out all the same
            raise
        if hold is not None and budget is not None and outcome.spent is not None:
            budget.checked = True
            budget.taken = outcome.admitted
            if outcome.admission is not Admission.NO_ROOM:
                fits = outcome.admission is not Admission.OVER_BUDGET
                self._budget_checked(principal, est, budget, outcome.spent, fits=fits, now=hold.now)
        return sub if outcome.admitted else None

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
        hold = sub.budget.hold_id if sub.budget is not None else None
        try:
            inserted = await self.store.resolve_intent(sub.intent_id, task, hold)
        except StoreError as exc:
            inserted = True  # unknown yet: the background retry finds out
            self._log.error("task_write_failed", task_id=task_id, error=str(exc), will_retry=True)
            # The retry releases the hold with the row, so the budget counts this task all along (a retry given
            # up leaves the hold to expire).
            write = asyncio.create_task(self._retry_write(sub.intent_id, task, hold))
            self._pending_writes.add(write)
            write.add_done_callback(self._pending_writes.discard)
        if sub.budget is not None:
            sub.budget.released = True
        if not inserted:  # another process recorded this id in between
            owner = await self.store.get_task(task_id)
            raise DuplicateTaskId(task_id, owner.key_name if owner is not None else "")
        self._remember(task)
        self._count_generation(task)
        return task

    async def _retry_write(self, intent_id: str, task: TaskRecord, hold: str | None) -> None:
        for delay in self._retry_delays:
            await asyncio.sleep(delay)
            try:
                await self.store.resolve_intent(intent_id, task, hold)
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
            # The webhook is written by the settling transaction itself: settled and enqueued together, or neither.
            webhook = self._webhooks.entry(task, raw) if self._webhooks is not None else None
            settled = await self.store.settle(task.task_id, status, seconds, usd, raw, now, webhook)
            if task.task_id in self._recent:
                self._remember(
                    dataclasses.replace(task, status=status, outcome=status, terminal_body=raw, settled_at=now)
                )
            if settled.first:
                self._count_settlement(task, status, usd)
                if anomaly is not None:  # once per task: only the call that settled it gets here
                    self._metrics.settlement_anomalies.labels(anomaly).inc()
                    self._log.warning(
                        "settlement_anomaly", task_id=task.task_id, reason=anomaly, settled_seconds=str(seconds)
                    )
                if webhook is not None and self._webhooks is not None:
                    self._webhooks.recorded(webhook, settled.webhook_queued)
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
