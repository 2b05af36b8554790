"""The background settler: polls tasks nobody polls any more, so every task reaches a terminal state in the ledger.

Each sweep takes the unsettled tasks least recently checked (none for ``idle_s``) and, paced at ``max_rps``, polls
them through the status poller, or gives up (``unknown`` at the estimate, paced separately) those older than
``task_max_age_s`` or whose account is no longer configured. An upstream or store failure is never an outcome: the
sweep backs off exponentially. Every task checked goes to the back of the queue; the queue is the ledger, so a
restart resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from gateway.config import SettlerSettings
from gateway.errors import GatewayError
from gateway.ledger.service import Ledger
from gateway.logs import Logger
from gateway.status.poller import STALE_ON_STATUS, PollOutcome, parse_object
from gateway.store.base import Store, StoreError, TaskRecord

Sleep = Callable[[float], Awaitable[None]]


class CallPacer:
    """Fixed spacing: grants at most ``rate`` slots a second, in order, to any number of concurrent callers.

    A pacer, not a rate limiter: it delays callers, it never refuses one.

    >>> pacer = CallPacer(5.0)  # slots 0.2 s apart; ``await pacer.acquire()`` before each call
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = float("-inf")

    async def acquire(self) -> None:
        """Wait for this caller's slot (slots are handed out without awaiting, so they never collide)."""
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await self._sleep(slot - now)


@dataclass
class _Sweep:
    """What one sweep did: tasks handled, whether the upstream answered usefully, whether something failed."""

    handled: int = 0
    answered: bool = False
    failed: bool = False


class Settler:
    """Drives unpolled tasks to a terminal state in the ledger (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        poll: Callable[[str], Awaitable[PollOutcome]],
        *,
        idle_s: float,
        max_rps: float,
        concurrency: int,
        max_give_ups_per_s: float = 50.0,
        task_max_age_s: float,
        log: Logger,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        batch_size: int = 100,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        has_account: Callable[[str], bool] = lambda _account: True,
    ) -> None:
        if idle_s < 0 or task_max_age_s <= 0 or concurrency < 1 or batch_size < 1:
            raise ValueError("idle_s >= 0, task_max_age_s > 0, concurrency >= 1 and batch_size >= 1 required")
        if backoff_base_s <= 0 or backoff_max_s < backoff_base_s:
            raise ValueError("backoff_base_s must be positive and at most backoff_max_s")
        self._store = store
        self._ledger = ledger
        self._poll = poll
        self._idle_s = idle_s
        self._concurrency = concurrency
        self._max_age_s = task_max_age_s
        self._log = log
        self._clock = clock
        self._sleep = sleep
        self._pacer = CallPacer(max_rps, clock=monotonic, sleep=sleep)
        self._give_up_pacer = CallPacer(max_give_ups_per_s, clock=monotonic, sleep=sleep)
        self._batch = batch_size
        self._idle_sleep_s = min(idle_s, 5.0) or 0.5
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._has_account = has_account

    @classmethod
    def from_settings(
        cls,
        settings: SettlerSettings,
        store: Store,
        ledger: Ledger,
        poll: Callable[[str], Awaitable[PollOutcome]],
        log: Logger,
        *,
        clock: Callable[[], float] = time.time,
        has_account: Callable[[str], bool] = lambda _account: True,
    ) -> Settler:
        """A settler configured by ``[settler]`` (``clock`` is wall time: it is compared with ``submitted_at``)."""
        return cls(
            store,
            ledger,
            poll,
            idle_s=settings.idle_s,
            max_rps=settings.max_rps,
            concurrency=settings.concurrency,
            max_give_ups_per_s=settings.max_give_ups_per_s,
            task_max_age_s=settings.task_max_age_s,
            log=log,
            clock=clock,
            has_account=has_account,
        )

    # -- running -------------------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a background task (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="settler")
        return self._task

    async def stop(self) -> None:
        """Cancel the background task and wait for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Sweep forever: right away while work remains, every few seconds when idle, backing off on failure."""
        self._log.info("settler_started", idle_s=self._idle_s, max_age_s=self._max_age_s)
        while True:
            try:
                sweep = await self._sweep()
            except Exception as exc:  # a bug must not stop settlement for the life of the process
                self._log.error("settler_sweep_failed", error=f"{type(exc).__name__}: {exc}")
                sweep = _Sweep(failed=True)
            await self._sleep(self._pause(sweep))

    def _pause(self, sweep: _Sweep) -> float:
        """Seconds to wait before the next sweep.

        A failed sweep lengthens the backoff; only a useful upstream answer ends it (a sweep that found nothing
        due says nothing about the upstream, so the next failure keeps growing the delay).
        """
        if sweep.failed:
            self._failures += 1
            delay = min(self._backoff_max_s, self._backoff_base_s * 2.0 ** (self._failures - 1))
            self._log.warning("settler_backoff", delay_s=delay, failures=self._failures)
            return delay
        if sweep.answered and self._failures:
            self._log.info("settler_recovered", failures=self._failures)
            self._failures = 0
        return 0.0 if sweep.handled >= self._batch else self._idle_sleep_s

    async def run_once(self) -> int:
        """One sweep; the number of tasks polled or given up."""
        return (await self._sweep()).handled

    # -- one sweep -----------------------------------------------------------------------------------------------

    async def _sweep(self) -> _Sweep:
        sweep = _Sweep()
        now = self._clock()
        try:
            tasks = await self._store.tasks_needing_settlement(idle_since=now - self._idle_s, limit=self._batch)
        except StoreError as exc:
            self._log.error("settler_store_failed", error=str(exc))
            sweep.failed = True
            return sweep
        queue = iter(tasks)
        async with asyncio.TaskGroup() as group:
            for _ in range(min(self._concurrency, len(tasks))):
                group.create_task(self._worker(queue, sweep))
        return sweep

    async def _worker(self, queue: Iterator[TaskRecord], sweep: _Sweep) -> None:
        for task in queue:
            if sweep.failed:
                return  # the upstream or the store is failing: leave the rest to the next sweep
            try:
                if self._clock() - task.submitted_at > self._max_age_s:
                    await self._give_up_pacer.acquire()
                    await self._ledger.give_up(task)
                elif not self._has_account(task.account):
                    # Its account was removed from the configuration: no key to ask with; given up at max age.
                    await self._touch(task)
                else:
                    await self._pacer.acquire()
                    if sweep.failed:
                        return
                    if await self._settle(task):
                        sweep.answered = True
                    else:
                        sweep.failed = True
            except (GatewayError, StoreError) as exc:
                self._log.warning("settler_poll_failed", task_id=task.task_id, error=f"{type(exc).__name__}: {exc}")
                sweep.failed = True
                await self._touch(task)
                return
            except Exception as exc:  # one odd task (say, a status the ledger refuses) must not stall the rest
                self._log.error("settler_task_failed", task_id=task.task_id, error=f"{type(exc).__name__}: {exc}")
                await self._touch(task)
            sweep.handled += 1

    async def _settle(self, task: TaskRecord) -> bool:
        """Poll ``task`` once and record what it says; False when the answer says the upstream is failing."""
        outcome = await self._poll(task.task_id)
        if outcome.x_cache == "STALE" or outcome.status_code in STALE_ON_STATUS:
            self._log.warning(
                "settler_upstream_failing", task_id=task.task_id, status=outcome.status_code, cache=outcome.x_cache
            )
            await self._touch(task)
            return False
        body = parse_object(outcome.body) if outcome.status_code == 200 else None
        if body is not None and isinstance(body.get("status"), str):
            await self._ledger.observe(task, body, outcome.body, polled=False)
            return True
        # Neither a status nor an outage (a 404, an unusable body): look again after idle_s, give up at max age.
        self._log.warning("settler_unusable_answer", task_id=task.task_id, status=outcome.status_code)
        await self._touch(task)
        return True

    async def _touch(self, task: TaskRecord) -> None:
        """Stamp ``task`` checked (status unchanged) so it waits ``idle_s`` before the next look."""
        try:
            await self._store.update_status(task.task_id, task.status, None, self._clock(), False)
        except StoreError as exc:
            self._log.warning("settler_touch_failed", task_id=task.task_id, error=str(exc))
