"""The in-memory month-to-date spend used by budget checks: refresh bound, local additions, holds, corrections."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.auth.principal import Principal
from gateway.config import PricingSettings
from gateway.errors import TooManyRequests
from gateway.ledger.pricing import Estimate, PriceTable
from gateway.ledger.service import Ledger
from gateway.ledger.spend import SpendTracker
from gateway.logs import make_logger
from gateway.metrics import create_metrics
from gateway.store import open_store
from gateway.store.base import StoreError

MONTH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NEXT_MONTH = MONTH + 31 * 86400


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """Answers month-to-date spend from ``figures``; counts reads; can be made slow or failing."""

    def __init__(self) -> None:
        self.figures: dict[tuple[str, float], Decimal] = {}
        self.reads: list[tuple[str, float, float]] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def read(self, key: str, start: float, end: float) -> Decimal:
        self.reads.append((key, start, end))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise StoreError("sqlite: disk I/O error")
        return self.figures.get((key, start), Decimal(0))


def tracker(store: FakeStore, clock: FakeClock, **kwargs: float) -> SpendTracker:
    return SpendTracker(store.read, refresh_s=kwargs.get("refresh_s", 1.0), monotonic=clock)


async def settle_background() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class TestSpendTracker:
    async def test_reads_once_per_refresh_interval(self) -> None:
        """Checks within ``refresh_s`` of a read answer from memory; the store is read once."""
        store, clock = FakeStore(), FakeClock()
        store.figures[("a", MONTH)] = Decimal("12.5")
        spend = tracker(store, clock)
        for _ in range(10):
            assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal("12.5")
        assert len(store.reads) == 1

    async def test_stale_figure_refreshed_in_background(self) -> None:
        """Past ``refresh_s`` the current figure answers while one refresh runs; the next check sees the new one."""
        store, clock = FakeStore(), FakeClock()
        store.figures[("a", MONTH)] = Decimal(1)
        spend = tracker(store, clock)
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(1)
        store.figures[("a", MONTH)] = Decimal(7)  # another process spent
        clock.now += 1.5
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(1)
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(1)  # refresh in flight: not started twice
        await settle_background()
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(7)
        assert len(store.reads) == 2

    async def test_local_additions_count_at_once_and_fold_into_the_next_read(self) -> None:
        """A task this process recorded counts immediately; a read that started later replaces it."""
        store, clock = FakeStore(), FakeClock()
        spend = tracker(store, clock)
        assert await spend.spent("a", MONTH, NEXT_MONTH) == 0
        spend.add("a", MONTH, Decimal("0.84"))
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal("0.84")
        store.figures[("a", MONTH)] = Decimal("0.84")  # the row is in the store now
        clock.now += 2
        await spend.spent("a", MONTH, NEXT_MONTH)
        await settle_background()
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal("0.84")  # not counted twice

    async def test_addition_during_a_read_is_kept(self) -> None:
        """A task recorded while a read is in flight may be missing from that read: it stays counted."""
        store, clock = FakeStore(), FakeClock()
        spend = tracker(store, clock)
        await spend.spent("a", MONTH, NEXT_MONTH)
        clock.now += 2
        store.gate = asyncio.Event()
        await spend.spent("a", MONTH, NEXT_MONTH)  # starts the refresh, which now waits on the gate
        await asyncio.sleep(0)
        clock.now += 0.01
        spend.add("a", MONTH, Decimal(3))
        store.gate.set()
        await settle_background()
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(3)

    async def test_holds_count_until_released(self) -> None:
        """Held estimates (submissions on their way upstream) count against the key until released."""
        store, clock = FakeStore(), FakeClock()
        spend = tracker(store, clock)
        spend.hold("a", Decimal(2))
        spend.hold("a", Decimal(3))
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(5)
        spend.release("a", Decimal(2))
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(3)
        spend.release("a", Decimal(3))
        assert await spend.spent("a", MONTH, NEXT_MONTH) == 0

    async def test_settlement_replaces_the_estimate(self) -> None:
        """A failed task settled here frees its estimate at once; a completed one counts its real cost."""
        store, clock = FakeStore(), FakeClock()
        store.figures[("a", MONTH)] = Decimal(10)  # includes two outstanding estimates of 4
        spend = tracker(store, clock)
        await spend.spent("a", MONTH, NEXT_MONTH)
        spend.settled("a", MONTH, Decimal(4), Decimal(0))
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(6)
        spend.settled("a", MONTH, Decimal(4), Decimal("4.5"))
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal("6.5")

    async def test_new_month_reads_again_and_forgets_the_old(self) -> None:
        """A check for another month waits for that month's figure; additions to the old month do not carry."""
        store, clock = FakeStore(), FakeClock()
        store.figures[("a", MONTH)] = Decimal(50)
        spend = tracker(store, clock)
        await spend.spent("a", MONTH, NEXT_MONTH)
        spend.add("a", MONTH, Decimal(5))
        assert await spend.spent("a", NEXT_MONTH, NEXT_MONTH + 28 * 86400) == 0
        spend.add("a", MONTH, Decimal(5))  # late addition for the old month: ignored
        assert await spend.spent("a", NEXT_MONTH, NEXT_MONTH + 28 * 86400) == 0

    async def test_concurrent_first_checks_share_one_read(self) -> None:
        """Many checks of a key never seen before wait for one store read between them."""
        store, clock = FakeStore(), FakeClock()
        store.figures[("a", MONTH)] = Decimal(2)
        store.gate = asyncio.Event()
        spend = tracker(store, clock)
        checks = [asyncio.create_task(spend.spent("a", MONTH, NEXT_MONTH)) for _ in range(20)]
        await asyncio.sleep(0)
        store.gate.set()
        assert await asyncio.gather(*checks) == [Decimal(2)] * 20
        assert len(store.reads) == 1

    async def test_first_read_failure_raises(self) -> None:
        """With no figure at all, a store failure is the check's failure (the route answers 503)."""
        store, clock = FakeStore(), FakeClock()
        store.fail = True
        spend = tracker(store, clock)
        with pytest.raises(StoreError):
            await spend.spent("a", MONTH, NEXT_MONTH)
        store.fail = False
        assert await spend.spent("a", MONTH, NEXT_MONTH) == 0

    async def test_background_refresh_failure_keeps_the_figure(self) -> None:
        """A failed background refresh is not reported as an unretrieved error; the next check tries again."""
        store, clock = FakeStore(), FakeClock()
        store.figures[("a", MONTH)] = Decimal(1)
        spend = tracker(store, clock)
        await spend.spent("a", MONTH, NEXT_MONTH)
        clock.now += 2
        store.fail = True
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(1)
        await settle_background()
        store.fail = False
        store.figures[("a", MONTH)] = Decimal(9)
        await spend.spent("a", MONTH, NEXT_MONTH)
        await settle_background()
        assert await spend.spent("a", MONTH, NEXT_MONTH) == Decimal(9)
        assert len(store.reads) == 3

    def test_bad_settings_refused(self) -> None:
        store = FakeStore()
        with pytest.raises(ValueError):
            SpendTracker(store.read, refresh_s=-1)
        with pytest.raises(ValueError):
            SpendTracker(store.read, max_keys=0)


class TestBudgetReservation:
    """``Ledger.budget_reserved`` against a real SQLite store: holds make concurrent submissions see each other."""

    async def test_concurrent_submissions_cannot_share_the_last_dollars(self, tmp_path: Path) -> None:
        store = await open_store(f"sqlite:///{tmp_path}/t.db")
        try:
            ledger = Ledger(store, PriceTable.from_settings(PricingSettings()), create_metrics(), make_logger())
            principal = Principal(name="team-a", monthly_budget_usd=Decimal("1.00"))
            est = Estimate(
                seconds=5,
                usd=Decimal("0.60"),
                price_per_second=Decimal("0.12"),
                mode_multiplier=Decimal(1),
                duration_defaulted=False,
            )
            async with ledger.budget_reserved(principal, est):
                with pytest.raises(TooManyRequests) as refused:
                    async with ledger.budget_reserved(principal, est):
                        pass
                assert refused.value.code == "budget_exceeded"
            async with ledger.budget_reserved(principal, est):  # the first one ended without a task: freed
                pass
        finally:
            await store.close()
