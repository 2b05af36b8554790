"""The background settler on a real SQLite ledger: drives idle tasks to terminal, rate-limited, backing off."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.auth.principal import Principal
from gateway.config import PricingSettings, SettlerSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import Ledger
from gateway.ledger.settler import CallPacer, Settler
from gateway.logs import make_logger
from gateway.metrics import Metrics, create_metrics
from gateway.status.poller import Coalescer, FetchResult, MemoryStatusCache, PollOutcome, StatusPoller
from gateway.store import open_store
from gateway.store.base import Store, StoreError, TaskRecord
from gateway.validation.checks import ValidRequest

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
IDLE_S = 30.0
JSON = (("content-type", "application/json"),)


class FakeClock:
    """Wall and monotonic time in one, moved by hand or by ``sleep``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class World:
    """A real store and ledger, a fake clock, metrics and the log."""

    store: Store
    ledger: Ledger
    clock: FakeClock
    metrics: Metrics
    logs: io.StringIO

    def settled(self, outcome: str, model: str = "kling-v3-std-silent", key: str = "team-a") -> float:
        labels = {"model": model, "outcome": outcome, "key": key}
        return self.metrics.registry.get_sample_value("kling_gateway_tasks_settled_total", labels) or 0.0

    def log_events(self) -> list[str]:
        return [orjson.loads(line)["event"] for line in self.logs.getvalue().splitlines()]

    async def submit(self, task_id: str, *, duration: int = 5) -> TaskRecord:
        """A task through the real submission path (intent, then acceptance)."""
        request = ValidRequest(
            body={"model": "kling-v3-std-silent", "prompt": "x", "duration": duration},
            model="kling-v3-std-silent",
            tier="std",
            audio=False,
            mode="text",
            duration=duration,
            media_hosts=(),
        )
        principal = Principal(name="team-a")
        submission = await self.ledger.begin(principal, request, self.ledger.estimate(request), f"req-{task_id}")
        return await self.ledger.accepted(submission, task_id)

    def settler(self, poll: Callable[[str], Awaitable[PollOutcome]], **overrides: Any) -> Settler:
        options: dict[str, Any] = {
            "idle_s": IDLE_S,
            "max_rps": 1000.0,
            "concurrency": 4,
            "task_max_age_s": 86400.0,
            "clock": self.clock,
            "sleep": self.clock.sleep,
            "monotonic": self.clock,
        }
        options.update(overrides)
        return Settler(self.store, self.ledger, poll, log=make_logger(stream=self.logs), **options)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await open_store(f"sqlite:///{tmp_path}/t.db")
    clock, metrics, logs = FakeClock(), create_metrics(), io.StringIO()
    ledger = Ledger(store, PriceTable.from_settings(PricingSettings()), metrics, make_logger(stream=logs), clock=clock)
    yield World(store, ledger, clock, metrics, logs)
    await store.close()


@dataclass
class FakeUpstream:
    """Each task walks through its scripted statuses, one step per upstream call; counts the calls."""

    script: list[str] = field(default_factory=lambda: ["queued", "in_progress", "completed"])
    calls: dict[str, int] = field(default_factory=dict)
    failure: FetchResult | Exception | None = None

    async def fetch(self, task_id: str) -> FetchResult:
        if isinstance(self.failure, Exception):
            raise self.failure
        if self.failure is not None:
            return self.failure
        step = self.calls.get(task_id, 0)
        self.calls[task_id] = step + 1
        status = self.script[min(step, len(self.script) - 1)]
        body: dict[str, Any] = {"id": task_id, "task_id": task_id, "status": status}
        if status == "completed":
            body["output_seconds"] = 4
        raw = orjson.dumps(body)
        return FetchResult(200, list(JSON), raw, body)


def real_poller(world: World, upstream: FakeUpstream) -> StatusPoller:
    """The production wiring: status cache, coalescer, and the ledger observation as on_fresh."""

    async def on_fresh(task_id: str, result: FetchResult) -> None:
        task = await world.store.get_task(task_id)
        if task is not None and result.parsed is not None:
            await world.ledger.observe(task, result.parsed, result.body, polled=True)

    cache = MemoryStatusCache(
        pending_ttl_s=2, terminal_ttl_s=3600, max_entries=1000, max_bytes=1 << 20, clock=world.clock
    )
    return StatusPoller(
        cache, Coalescer(), world.metrics, fetch=upstream.fetch, on_fresh=on_fresh, log=make_logger(stream=world.logs)
    )


def outcome(status_code: int, body: dict[str, Any] | bytes, x_cache: str = "MISS") -> PollOutcome:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return PollOutcome(status_code, JSON, raw, x_cache)  # type: ignore[arg-type]


class TestDrivesToTerminal:
    """Tasks nobody polls are polled until terminal and settled exactly once."""

    async def test_unpolled_tasks_reach_terminal_and_settle_once(self, world: World) -> None:
        """Sweeps every idle_s move five tasks queued → in_progress → completed; each settles once."""
        ids = [f"task_{n}" for n in range(5)]
        for task_id in ids:
            await world.submit(task_id)
        upstream = FakeUpstream()
        settler = world.settler(real_poller(world, upstream).poll)

        assert await settler.run_once() == 0  # nobody idle yet
        seen = []
        for _ in range(4):
            world.clock.now += IDLE_S + 1
            await settler.run_once()
            assert await settler.run_once() == 0  # just checked: not polled again before idle_s
            seen.append({(await world.store.get_task(i)).status for i in ids})  # type: ignore[union-attr]
        assert seen == [{"queued"}, {"in_progress"}, {"completed"}, {"completed"}]
        assert upstream.calls == dict.fromkeys(ids, 3)
        for task_id in ids:
            task = await world.store.get_task(task_id)
            assert task is not None and task.outcome == "completed"
            assert task.settled_seconds == Decimal(4) and task.settled_usd == Decimal("0.336")
            assert task.terminal_body is not None
        assert world.settled("completed") == 5
        assert (
            world.metrics.registry.get_sample_value("kling_gateway_tasks_in_flight", {"model": "kling-v3-std-silent"})
            == 0
        )

    async def test_pending_check_stamps_last_checked(self, world: World) -> None:
        """A task left pending is stamped checked, so it waits idle_s before the next poll."""
        await world.submit("t1")
        upstream = FakeUpstream(script=["in_progress"])
        settler = world.settler(real_poller(world, upstream).poll)
        world.clock.now += IDLE_S + 1
        assert await settler.run_once() == 1
        task = await world.store.get_task("t1")
        assert task is not None and task.last_checked_at == world.clock.now and not task.settled
        world.clock.now += IDLE_S - 1
        assert await settler.run_once() == 0
        world.clock.now += 2
        assert await settler.run_once() == 1
        assert upstream.calls == {"t1": 2}

    async def test_client_polled_tasks_are_left_alone(self, world: World) -> None:
        """A task a client polled within idle_s is not in the settler's queue."""
        await world.submit("t1")
        upstream = FakeUpstream(script=["in_progress"])
        poller = real_poller(world, upstream)
        world.clock.now += IDLE_S + 1
        await poller.poll("t1")  # a client
        calls: list[str] = []

        async def poll(task_id: str) -> PollOutcome:
            calls.append(task_id)
            return await poller.poll(task_id)

        assert await world.settler(poll).run_once() == 0
        assert calls == []

    async def test_failed_status_settles_at_zero(self, world: World) -> None:
        """A failed task is settled once at zero cost."""
        await world.submit("t1")
        settler = world.settler(real_poller(world, FakeUpstream(script=["failed"])).poll)
        world.clock.now += IDLE_S + 1
        await settler.run_once()
        task = await world.store.get_task("t1")
        assert task is not None and task.outcome == "failed" and task.settled_usd == 0
        assert world.settled("failed") == 1

    async def test_settles_once_with_a_plain_poll(self, world: World) -> None:
        """Without on_fresh the settler's own observation settles the task, once, however often it sees it."""
        await world.submit("t1")

        async def poll(task_id: str) -> PollOutcome:
            return outcome(200, {"id": task_id, "status": "completed", "output_seconds": 5})

        settler = world.settler(poll)
        for _ in range(3):
            world.clock.now += IDLE_S + 1
            await settler.run_once()
        assert world.settled("completed") == 1

    async def test_resumes_after_restart(self, world: World, tmp_path: Path) -> None:
        """A new process finds the unsettled tasks in the ledger and settles them."""
        for n in range(3):
            await world.submit(f"t{n}")
        await world.store.close()
        store = await open_store(f"sqlite:///{tmp_path}/t.db")
        try:
            metrics = create_metrics()
            ledger = Ledger(
                store,
                PriceTable.from_settings(PricingSettings()),
                metrics,
                make_logger(stream=world.logs),
                clock=world.clock,
            )
            restarted = World(store, ledger, world.clock, metrics, world.logs)
            settler = restarted.settler(real_poller(restarted, FakeUpstream(script=["completed"])).poll)
            world.clock.now += IDLE_S + 1
            assert await settler.run_once() == 3
            assert restarted.settled("completed") == 3
        finally:
            await store.close()
            world.store = await open_store(f"sqlite:///{tmp_path}/t.db")  # for the fixture to close

    async def test_unusable_answer_is_checked_not_settled(self, world: World) -> None:
        """A 404 from the upstream is logged, the task stamped checked, and nothing settled."""
        await world.submit("t1")
        calls = []

        async def poll(task_id: str) -> PollOutcome:
            calls.append(task_id)
            return outcome(404, {"error": {"message": "no such task"}})

        settler = world.settler(poll)
        world.clock.now += IDLE_S + 1
        assert await settler.run_once() == 1
        assert await settler.run_once() == 0
        task = await world.store.get_task("t1")
        assert task is not None and not task.settled and task.last_checked_at == world.clock.now
        assert "settler_unusable_answer" in world.log_events()


class TestNeverSettlesOnFailure:
    """An upstream 429, 5xx, stale answer or error is never taken as the task's outcome."""

    @pytest.mark.parametrize(
        "answer",
        [
            outcome(429, {"error": {"message": "slow down"}}),
            outcome(500, {"status": "failed"}),
            outcome(503, b"busy"),
            outcome(200, {"status": "completed", "output_seconds": 5}, "STALE"),
            outcome(200, {"status": "failed"}, "STALE"),
            UpstreamUnavailable("unreachable"),
            UpstreamTimeout("slow"),
        ],
    )
    async def test_failure_answers_do_not_settle(self, world: World, answer: PollOutcome | Exception) -> None:
        """Tasks stay unsettled at their status, the one polled goes to the back of the queue, the sweep stops."""
        for n in range(10):
            await world.submit(f"t{n}")
        calls = []

        async def poll(task_id: str) -> PollOutcome:
            calls.append(task_id)
            if isinstance(answer, Exception):
                raise answer
            return answer

        settler = world.settler(poll, concurrency=2)
        world.clock.now += IDLE_S + 1
        await settler.run_once()
        assert 1 <= len(calls) <= 2  # the sweep stops taking tasks once the upstream fails
        for n in range(10):
            task = await world.store.get_task(f"t{n}")
            assert task is not None and not task.settled and task.status == "queued"
            assert (task.last_checked_at is not None) == (task.task_id in calls)
        assert world.settled("completed") == world.settled("failed") == 0

    async def test_stale_terminal_from_the_real_poller_is_not_an_outcome(self, world: World) -> None:
        """Through the real poller: with the upstream down, a cached status comes back STALE and is ignored."""
        await world.submit("t1")
        upstream = FakeUpstream(script=["in_progress"])
        poller = real_poller(world, upstream)
        settler = world.settler(poller.poll)
        world.clock.now += IDLE_S + 1
        await settler.run_once()
        upstream.failure = FetchResult(503, [], b"busy", None)
        world.clock.now += IDLE_S + 1
        await settler.run_once()
        assert world.metrics.registry.get_sample_value("kling_gateway_status_cache_total", {"result": "stale"}) == 1
        task = await world.store.get_task("t1")
        assert task is not None and not task.settled and task.status == "in_progress"

    async def test_one_failing_task_does_not_starve_the_others(self, world: World) -> None:
        """A task the upstream keeps failing on goes to the back; the next sweep settles the rest."""
        for n in range(3):
            await world.submit(f"t{n}")

        async def poll(task_id: str) -> PollOutcome:
            if task_id == "t0":
                raise UpstreamUnavailable("the upstream chokes on this one")
            return outcome(200, {"id": task_id, "status": "completed"})

        settler = world.settler(poll, concurrency=1)
        world.clock.now += IDLE_S + 1
        await settler.run_once()
        await settler.run_once()
        assert world.settled("completed") == 2
        t0 = await world.store.get_task("t0")
        assert t0 is not None and not t0.settled


class TestGivesUp:
    """Tasks older than task_max_age_s are left unknown at their estimate."""

    async def test_old_task_is_marked_unknown_without_upstream_call(self, world: World) -> None:
        """Past task_max_age_s the task is settled unknown at its estimate, with a metric and a warning."""
        young = await world.submit("young")
        world.clock.now += 3600
        await world.submit("fresh")
        calls: list[str] = []

        async def poll(task_id: str) -> PollOutcome:
            calls.append(task_id)
            return outcome(200, {"status": "in_progress"})

        settler = world.settler(poll, task_max_age_s=7200.0)
        world.clock.now = young.submitted_at + 7200 + 1
        assert await settler.run_once() == 2
        old = await world.store.get_task("young")
        assert old is not None and old.outcome == "unknown" and old.settled_usd == young.estimate_usd
        assert calls == ["fresh"]
        assert world.settled("unknown") == 1
        gave_up = world.metrics.registry.get_sample_value(
            "kling_gateway_settler_gave_up_total", {"model": "kling-v3-std-silent"}
        )
        assert gave_up == 1
        assert "task_unknown" in world.log_events()

    async def test_removed_account_tasks_are_not_polled_and_end_unknown(self, world: World) -> None:
        """A task whose account is no longer configured: never polled (no key), given up at max age."""
        task = await world.submit("orphan")
        calls: list[str] = []

        async def poll(task_id: str) -> PollOutcome:
            calls.append(task_id)
            return outcome(200, {"status": "in_progress"})

        settler = world.settler(poll, task_max_age_s=7200.0, has_account=lambda account: account != "default")
        world.clock.now = task.submitted_at + IDLE_S + 1
        assert await settler.run_once() == 1
        checked = await world.store.get_task("orphan")
        assert checked is not None and checked.settled_at is None and checked.last_checked_at is not None
        world.clock.now = task.submitted_at + 7200 + 1
        assert await settler.run_once() == 1
        gone = await world.store.get_task("orphan")
        assert gone is not None and gone.outcome == "unknown"
        assert calls == []

    async def test_give_ups_are_paced(self, world: World) -> None:
        """A backlog of overdue tasks is given up at most max_give_ups_per_s, apart from the poll limit."""
        for n in range(10):
            await world.submit(f"old{n}")

        async def poll(task_id: str) -> PollOutcome:
            raise AssertionError("overdue tasks are not polled")

        settler = world.settler(poll, task_max_age_s=60.0, max_give_ups_per_s=4.0)
        world.clock.now += 3600
        assert await settler.run_once() == 10
        assert world.settled("unknown") == 10
        # Slots 0.25 s apart from the first: nine waits, the last ending 2.25 s after the first give-up.
        assert world.clock.slept and max(world.clock.slept) <= 2.25 + 1e-9
        assert sum(1 for s in world.clock.slept if s > 0) == 9


class TestRateLimit:
    """Polls never exceed max_rps, with several in flight at once."""

    async def test_limiter_spaces_concurrent_slots(self) -> None:
        """Ten concurrent acquirers get slots exactly 1/rate apart."""
        clock = FakeClock(now=0.0)
        wakes: list[float] = []

        async def sleep(seconds: float) -> None:
            wakes.append(clock.now + seconds)

        limiter = CallPacer(5.0, clock=clock, sleep=sleep)
        await asyncio.gather(*(limiter.acquire() for _ in range(10)))
        assert sorted(wakes) == pytest.approx([0.2 * n for n in range(1, 10)])

    async def test_limiter_refills_after_idle(self) -> None:
        """After a quiet spell the next slot is immediate (no burst is saved up beyond one)."""
        clock = FakeClock(now=0.0)
        limiter = CallPacer(5.0, clock=clock, sleep=clock.sleep)
        await limiter.acquire()
        clock.now += 10
        await limiter.acquire()
        await limiter.acquire()
        assert clock.slept == [pytest.approx(0.2)]

    async def test_settler_respects_max_rps_in_real_time(self, world: World) -> None:
        """40 idle tasks at max_rps=100: at least 0.39 s, no 0.1 s window over its share, several in flight."""
        for n in range(40):
            await world.submit(f"t{n:02d}")
        stamps: list[float] = []
        in_flight = peak = 0

        async def poll(task_id: str) -> PollOutcome:
            nonlocal in_flight, peak
            stamps.append(time.monotonic())
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.03)
            in_flight -= 1
            return outcome(200, {"id": task_id, "status": "in_progress"})

        settler = world.settler(poll, max_rps=100.0, concurrency=4, sleep=asyncio.sleep, monotonic=time.monotonic)
        world.clock.now += IDLE_S + 1
        assert await settler.run_once() == 40
        assert stamps[-1] - stamps[0] >= 39 / 100 - 0.01
        for start in stamps:
            window = [s for s in stamps if start <= s < start + 0.1]
            assert len(window) <= 10 + 1 + 4  # rate share, plus at most the workers delayed together
        assert 2 <= peak <= 4


class TestBackoff:
    """Outages slow the settler down exponentially; it recovers when the upstream does."""

    async def test_backs_off_exponentially_then_recovers(self, world: World) -> None:
        """Failed sweeps wait 1, 2, 4, ... s (capped); a good sweep returns to the idle pause."""
        for n in range(10):
            await world.submit(f"t{n}")
        calls = 0

        async def poll(task_id: str) -> PollOutcome:
            nonlocal calls
            calls += 1
            if calls <= 8:
                raise UpstreamUnavailable("down")
            return outcome(200, {"id": task_id, "status": "in_progress"})

        class Done(Exception):
            pass

        pauses: list[float] = []  # between sweeps; the rate limiter's millisecond waits are not pauses

        async def sleep(seconds: float) -> None:
            await world.clock.sleep(seconds)
            if seconds >= 0.5:
                pauses.append(seconds)
                if len(pauses) == 11:
                    raise Done

        settler = world.settler(poll, sleep=sleep, backoff_max_s=60.0, concurrency=1)
        world.clock.now += IDLE_S + 1
        with pytest.raises(Done):
            await settler.run()
        assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 5, 5, 5]
        assert calls > 8  # one upstream call per failed sweep, then the due tasks
        events = world.log_events()
        assert events.count("settler_backoff") == 8 and "settler_recovered" in events

    async def test_store_failure_backs_off(self, world: World) -> None:
        """A store that fails to list tasks causes backoff, not a crash."""

        class BrokenStore:
            async def tasks_needing_settlement(self, idle_since: float, limit: int = 100) -> list[TaskRecord]:
                raise StoreError("database is locked")

        async def poll(task_id: str) -> PollOutcome:
            raise AssertionError("not called")

        three_sleeps = asyncio.Event()

        async def sleep(seconds: float) -> None:
            await world.clock.sleep(seconds)
            if len(world.clock.slept) >= 3:
                three_sleeps.set()

        settler = Settler(
            BrokenStore(),  # type: ignore[arg-type]
            world.ledger,
            poll,
            idle_s=IDLE_S,
            max_rps=5,
            concurrency=2,
            task_max_age_s=86400,
            log=make_logger(stream=world.logs),
            clock=world.clock,
            sleep=sleep,
        )
        assert await settler.run_once() == 0
        runner = asyncio.create_task(settler.run())
        await asyncio.wait_for(three_sleeps.wait(), 5)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert world.clock.slept[:3] == [1, 2, 4]
        assert "settler_store_failed" in world.log_events()


class TestLifecycle:
    """Starting and stopping with the app."""

    async def test_start_and_stop_cleanly(self, world: World) -> None:
        """stop() cancels the running settler mid-sweep and leaves no task behind."""
        for n in range(3):
            await world.submit(f"t{n}")
        started = asyncio.Event()

        async def poll(task_id: str) -> PollOutcome:
            started.set()
            await asyncio.Event().wait()  # an upstream that never answers
            raise AssertionError("unreachable")

        settler = world.settler(poll, sleep=asyncio.sleep, monotonic=time.monotonic)
        world.clock.now += IDLE_S + 1
        task = settler.start()
        assert settler.start() is task
        await asyncio.wait_for(started.wait(), 1)
        await settler.stop()
        assert task.cancelled()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []
        await settler.stop()  # idempotent

    def test_from_settings(self, world: World) -> None:
        """[settler] settings configure a settler."""

        async def poll(task_id: str) -> PollOutcome:
            raise AssertionError("not called")

        settler = Settler.from_settings(SettlerSettings(), world.store, world.ledger, poll, make_logger())
        assert isinstance(settler, Settler)

    @pytest.mark.parametrize(
        "overrides",
        [
            {"concurrency": 0},
            {"max_rps": 0},
            {"max_give_ups_per_s": 0},
            {"task_max_age_s": 0},
            {"idle_s": -1},
            {"backoff_base_s": 0},
        ],
    )
    def test_rejects_bad_settings(self, world: World, overrides: dict[str, float]) -> None:
        """Nonsense settings fail at construction."""

        async def poll(task_id: str) -> PollOutcome:
            raise AssertionError("not called")

        with pytest.raises(ValueError):
            world.settler(poll, **overrides)
