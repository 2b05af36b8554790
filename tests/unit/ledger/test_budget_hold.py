"""A budgeted submission's hold, on both backends: taken with its first intent, released by the task write itself,
or on every way out."""

from __future__ import annotations

import asyncio
import io
from decimal import Decimal
from typing import Any

import pytest
from support.flaky_store import FlakyStore

from gateway.auth.principal import Principal
from gateway.config import PricingSettings
from gateway.errors import TooManyRequests
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import DuplicateTaskId, Ledger, month_bounds
from gateway.logs import make_logger
from gateway.metrics import create_metrics
from gateway.store.base import IntentOutcome, Store, StoreError
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


class FailingIntentWrites:
    """``inner`` whose intent writes commit, then report a failure (as a lost answer would)."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    async def record_intent(self, *args: Any) -> IntentOutcome:
        await self._inner.record_intent(*args)
        raise StoreError("connection lost (injected)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def ledger_on(store: Any) -> Ledger:
    prices = PriceTable.from_settings(PricingSettings())
    log = make_logger(stream=io.StringIO())
    return Ledger(store, prices, create_metrics(), log, clock=lambda: T0, retry_delays_s=(0.05, 0.05))


async def spent(store: Store) -> Decimal:
    """What the key's budget check counts now: settled + outstanding + held."""
    return await store.budget_spent("team-a", month_bounds(T0), T0)


def commits(store: Store) -> int:
    return store.commits if isinstance(store, SQLiteStore) else 0


class TestHoldTakenWithTheIntent:
    async def test_accepted_submission_costs_two_writes(self, store: Store) -> None:
        """Intent (with its hold) and task row: two writes, the hold gone with the second; the task alone counts."""
        ledger = ledger_on(store)
        before = commits(store)
        async with ledger.budget_hold(TEAM) as hold:
            assert hold is not None and not hold.taken
            assert await spent(store) == 0  # nothing held before an intent is admitted
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
            assert sub is not None and hold.taken
            assert await spent(store) == Decimal("0.42")
            await ledger.accepted(sub, "task_1")
            assert hold.released
            assert await spent(store) == Decimal("0.42")  # the task, not the task and the hold
        if isinstance(store, SQLiteStore):  # the probes above are reads
            assert store.commits - before == 2
        assert await spent(store) == Decimal("0.42")

    async def test_unbudgeted_submission_costs_two_writes_too(self, store: Store) -> None:
        ledger = ledger_on(store)
        before = commits(store)
        async with ledger.budget_hold(Principal(name="team-a")) as hold:
            assert hold is None
            sub = await ledger.begin(Principal(name="team-a"), REQUEST, ledger.estimate(REQUEST), "req-1")
            assert sub is not None
            await ledger.accepted(sub, "task_1")
        if isinstance(store, SQLiteStore):
            assert store.commits - before == 2

    async def test_key_without_budget_takes_no_hold(self, store: Store) -> None:
        ledger = ledger_on(store)
        async with ledger.budget_hold(Principal(name="team-a")) as hold:
            assert hold is None
            assert await ledger.begin(Principal(name="team-a"), REQUEST, ledger.estimate(REQUEST), "r") is not None
            assert await spent(store) == 0

    async def test_over_budget_is_refused_and_writes_nothing(self, store: Store) -> None:
        ledger = ledger_on(store)
        poor = Principal(name="team-a", monthly_budget_usd=Decimal("0.4"))
        before = commits(store)
        with pytest.raises(TooManyRequests) as refused:
            async with ledger.budget_hold(poor) as hold:
                await ledger.begin(poor, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
                pytest.fail("admitted over budget")
        assert refused.value.code == "budget_exceeded"
        assert refused.value.message == (
            "Monthly budget of $0.4000 for key 'team-a' would be exceeded: $0.0000 settled, outstanding or in "
            "flight this month + $0.4200 for this request."
        )
        assert await spent(store) == 0 and await store.list_intents() == []
        if isinstance(store, SQLiteStore):
            assert store.commits - before <= 1  # the refusing transaction itself, with nothing in it

    async def test_no_room_holds_nothing_and_the_next_account_takes_the_hold(self, store: Store) -> None:
        """Account 'a' full: no intent, no hold; the submission's hold is taken by the intent on 'b'."""
        ledger = ledger_on(store)
        assert await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "r0", "a", 1, T0 - 600) is not None
        async with ledger.budget_hold(TEAM) as hold:
            assert hold is not None
            assert await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "r1", "a", 1, T0 - 600, hold) is None
            assert not hold.taken and hold.checked
            assert await spent(store) == 0
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "r1", "b", 1, T0 - 600, hold)
            assert sub is not None and hold.taken
            assert await spent(store) == Decimal("0.42")
        assert await spent(store) == 0

    async def test_moved_submission_keeps_one_hold(self, store: Store) -> None:
        """Refused on 'a' (its intent dropped), admitted on 'b': the same hold all along, never two."""
        ledger = ledger_on(store)
        async with ledger.budget_hold(TEAM) as hold:
            assert hold is not None
            first = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "r1", "a", 2, T0 - 600, hold)
            assert first is not None
            await ledger.refused(first)
            assert await spent(store) == Decimal("0.42")  # still held by the submission
            moved = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "r1", "b", 2, T0 - 600, hold)
            assert moved is not None
            assert await spent(store) == Decimal("0.42")  # not twice
            await ledger.accepted(moved, "task_1")
        assert await spent(store) == Decimal("0.42")
        assert await store.list_intents() == []

    async def test_check_budget_refuses_without_writing(self, store: Store) -> None:
        """The read-only check (before waiting for capacity, or finding no account) says budget_exceeded too."""
        ledger = ledger_on(store)
        poor = Principal(name="team-a", monthly_budget_usd=Decimal("0.4"))
        async with ledger.budget_hold(poor) as hold:
            with pytest.raises(TooManyRequests) as refused:
                await ledger.check_budget(poor, ledger.estimate(REQUEST), hold)
        assert refused.value.code == "budget_exceeded"
        async with ledger.budget_hold(TEAM) as hold:
            await ledger.check_budget(TEAM, ledger.estimate(REQUEST), hold)  # fits: no error
            assert hold is not None and not hold.taken
        assert await spent(store) == 0


class TestHoldReleasedOnEveryWayOut:
    async def test_refused_by_the_upstream(self, store: Store) -> None:
        ledger = ledger_on(store)
        async with ledger.budget_hold(TEAM) as hold:
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
            assert sub is not None
            await ledger.refused(sub)
            assert await spent(store) == Decimal("0.42")  # still held: another account may be tried
        assert await spent(store) == 0

    async def test_failed_submission(self, store: Store) -> None:
        ledger = ledger_on(store)
        with pytest.raises(RuntimeError):
            async with ledger.budget_hold(TEAM) as hold:
                await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
                raise RuntimeError("upstream unreachable")
        assert await spent(store) == 0

    async def test_failed_intent_write(self, store: Store) -> None:
        """The intent write fails: whatever it may have written, the hold is released on the way out."""
        ledger = ledger_on(FailingIntentWrites(store))
        with pytest.raises(StoreError):
            async with ledger.budget_hold(TEAM) as hold:
                await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
        assert hold is not None and hold.taken
        assert await spent(store) == 0

    async def test_timed_out_submission(self, store: Store) -> None:
        """Cut off mid-flight (a timeout cancels the block): the hold is released all the same."""
        ledger = ledger_on(store)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), ledger.budget_hold(TEAM) as hold:
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
            async with fresh.budget_hold(TEAM) as hold:
                again = await fresh.begin(TEAM, REQUEST, fresh.estimate(REQUEST), "req-1", budget=hold)
                assert again is not None
                await fresh.accepted(again, "task_1")
        assert await spent(store) == Decimal("0.42")

    async def test_failed_task_write_hands_the_hold_to_its_retry(self, store: Store) -> None:
        """The task write fails: the hold stays (the budget keeps counting the submission) until the background
        retry writes the row and releases the hold in one transaction."""
        flaky = FlakyStore(store, failures=1)
        ledger = ledger_on(flaky)
        async with ledger.budget_hold(TEAM) as hold:
            sub = await ledger.begin(TEAM, REQUEST, ledger.estimate(REQUEST), "req-1", budget=hold)
            assert sub is not None
            await ledger.accepted(sub, "task_1")
        assert await store.get_task("task_1") is None
        assert await spent(store) == Decimal("0.42")  # the hold, until the row lands
        await ledger.flush()
        assert await store.get_task("task_1") is not None
        assert await spent(store) == Decimal("0.42")  # the row, the hold gone with its write
