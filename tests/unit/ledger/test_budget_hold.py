"""A budgeted submission's hold, on both backends: released by the task write itself, or on every way out."""

from __future__ import annotations

import asyncio
import io
from decimal import Decimal
from typing import Any

import pytest

from gateway.auth.principal import Principal
from gateway.config import PricingSettings
from gateway.errors import TooManyRequests
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import DuplicateTaskId, Ledger, month_bounds
from gateway.logs import make_logger
from gateway.metrics import create_metrics
from gateway.store.base import Store, StoreError, TaskRecord
from gateway.store.sqlite import SQLiteStore
from gateway.validation.checks import ValidRequest

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
REQUEST = ValidRequest(
    body={"model": "kling-v3-std-silent", "prompt": "x", "duration": 5},
    model="kling-v3-std-silent",
    tier="std",
    audio=False,
    mode="text",
    duration=5,
    media_hosts=(),
)  # $0.42
TEAM = Principal(name="team-a", monthly_budget_usd=Decimal(1))


class FailingTaskWrites:
    """``inner`` whose task writes fail the first ``failures`` times."""

    def __init__(self, inner: Store, failures: int) -> None:
        self._inner = inner
        self.failures = failures

    async def resolve_intent(self, intent_id: str, task: TaskRecord, release_hold: str | None = None) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("disk I/O error (injected)")
        return await self._inner.resolve_intent(intent_id, task, release_hold)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def ledger_on(store: Any) -> Ledger:
    prices = PriceTable.from_settings(PricingSettings())
    log = make_logger(stream=io.StringIO())
    return Ledger(store, prices, create_metrics(), log, clock=lambda: T0, retry_delays_s=(0.05, 0.05))


async def spent(store: Store) -> Decimal:
    """What the key's budget check counts now: settled + outstanding + held."""
    held, amount = await store.hold_budget("probe", "team-a", Decimal(0), Decimal(100), month_bounds(T0), T0)
    assert held
    await store.release_hold("probe")
    return amount


class TestHoldReleasedByTheTaskWrite:
    async def test_accepted_submission_costs_no_release_write(self, store: Store) -> None:
        """Hold, intent, task row: three writes, the hold gone with the third; the task alone counts after."""
        ledger = ledger_on(store)
        commits = store.commits if isinstance(store, SQLiteStore) else 0
        async with ledger.budget_reserved(TEAM, ledger.estimate(REQUEST)) as hold:
            assert hold is not None and await spent(store) == Decimal("0.42")
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
            assert sub is not None
            await ledger.accepted(sub, "task_1")
            assert hold.released
            assert await spent(store) == Decimal("0.42")  # the task, not the task and the hold
        if isinstance(store, SQLiteStore):  # the probes above are writes too: two each
            assert store.commits - commits == 3 + 2 * 2
        assert await spent(store) == Decimal("0.42")

    async def test_key_without_budget_takes_no_hold(self, store: Store) -> None:
        ledger = ledger_on(store)
        async with ledger.budget_reserved(Principal(name="team-a"), ledger.estimate(REQUEST)) as hold:
            assert hold is None
            assert await spent(store) == 0

    async def test_over_budget_is_refused_and_holds_nothing(self, store: Store) -> None:
        ledger = ledger_on(store)
        poor = Principal(name="team-a", monthly_budget_usd=Decimal("0.4"))
        with pytest.raises(TooManyRequests) as refused:
            async with ledger.budget_reserved(poor, ledger.estimate(REQUEST)):
                pytest.fail("entered an over-budget block")
        assert refused.value.code == "budget_exceeded"
        assert await spent(store) == 0


class TestHoldReleasedOnEveryWayOut:
    async def test_refused_by_the_upstream(self, store: Store) -> None:
        ledger = ledger_on(store)
        async with ledger.budget_reserved(TEAM, ledger.estimate(REQUEST)) as hold:
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
            assert sub is not None
            await ledger.refused(sub)
            assert await spent(store) == Decimal("0.42")  # still held: another account may be tried
        assert await spent(store) == 0

    async def test_failed_submission(self, store: Store) -> None:
        ledger = ledger_on(store)
        with pytest.raises(RuntimeError):
            async with ledger.budget_reserved(TEAM, ledger.estimate(REQUEST)) as hold:
                await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
                raise RuntimeError("upstream unreachable")
        assert await spent(store) == 0

    async def test_timed_out_submission(self, store: Store) -> None:
        """Cut off mid-flight (a timeout cancels the block): the hold is released all the same."""
        ledger = ledger_on(store)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), ledger.budget_reserved(TEAM, ledger.estimate(REQUEST)) as hold:
                await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
                await asyncio.sleep(10)
        assert await spent(store) == 0

    async def test_task_id_the_ledger_already_holds(self, store: Store) -> None:
        """The upstream reuses a task id: the submission fails, its hold goes, the existing task alone counts."""
        ledger = ledger_on(store)
        sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-0")
        assert sub is not None
        await ledger.accepted(sub, "task_1")
        fresh = ledger_on(store)  # another process: task_1 is not in its memory
        with pytest.raises(DuplicateTaskId):
            async with fresh.budget_reserved(TEAM, fresh.estimate(REQUEST)) as hold:
                again = await fresh.begin(TEAM, REQUEST, fresh.estimate(REQUEST), "req-1", budget=hold)
                assert again is not None
                await fresh.accepted(again, "task_1")
        assert await spent(store) == Decimal("0.42")

    async def test_failed_task_write_hands_the_hold_to_its_retry(self, store: Store) -> None:
        """The task write fails: the hold stays (the budget keeps counting the submission) until the background
        retry writes the row and releases the hold in one transaction."""
        flaky = FailingTaskWrites(store, failures=1)
        ledger = ledger_on(flaky)
        async with ledger.budget_reserved(TEAM, ledger.estimate(REQUEST)) as hold:
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
            assert sub is not None
            await ledger.accepted(sub, "task_1")
        assert await store.get_task("task_1") is None
        assert await spent(store) == Decimal("0.42")  # the hold, until the row lands
        await ledger.flush()
        assert await store.get_task("task_1") is not None
        assert await spent(store) == Decimal("0.42")  # the row, the hold gone with its write
