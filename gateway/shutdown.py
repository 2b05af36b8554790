"""Graceful shutdown, readiness first: on SIGTERM (or SIGINT) ``/readyz`` fails at once, before anything stops."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

from gateway.logs import Logger

HOOKED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.05

SignalHandler = Callable[[int, FrameType | None], Any]


class _ShutdownSignal:
    """The wrapping handler: mark shutting down now, hand the signal to the server's handler now or after grace."""

    def __init__(self, mark: Callable[[], None], previous: dict[int, SignalHandler], grace_s: float) -> None:
        self._mark = mark
        self._previous = previous
        self._grace_s = grace_s
        self.signal: int | None = None
        self.received_at = 0.0
        self.chained = False

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler: plain attribute writes and the chained handler only."""
        first = self.signal is None
        if first:
            self.signal, self.received_at = sig, time.monotonic()
        self._mark()
        if not first or self._grace_s <= 0:
            # Every signal after the first reaches the server at once (a second Ctrl-C still forces the exit).
            self.chained = True
            self._previous[sig](sig, frame)

    async def follow(self, grace_s: float, log: Logger) -> None:
        """On the loop: log the shutdown start, and chain the held signal once the grace period is over."""
        # Polled: a signal handler may only set plain attributes (an asyncio.Event is not safe to set from one).
        while self.signal is None:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)
        sig = self.signal
        log.info("shutdown_started", signal=signal.Signals(sig).name, grace_s=grace_s)
        await asyncio.sleep(max(0.0, self.received_at + grace_s - time.monotonic()))
        if not self.chained:
            self.chained = True
            self._previous[sig](sig, None)


@contextlib.asynccontextmanager
async def shutdown_hook(mark: Callable[[], None], *, log: Logger, grace_s: float = 0.0) -> AsyncIterator[None]:
    """While the block runs, SIGTERM/SIGINT call ``mark()`` first, then the server's own handler (after ``grace_s``).

    Enter it in the lifespan, after start-up; the previous handlers are back when the block ends.

    uvicorn installs ``Server.handle_exit`` for SIGTERM/SIGINT with ``signal.signal`` before it runs the app's
    lifespan, and calls the lifespan's shutdown only after in-flight requests have drained. To make readiness fail
    *first*, the lifespan wraps that handler for as long as the app runs (``shutdown_hook``): the wrapper sets
    ``services.shutting_down`` (``/readyz`` answers 503 from then on) and chains to the server's handler, which stops
    accepting, lets in-flight requests finish within ``[server] shutdown_timeout_s`` and then runs the lifespan
    shutdown. With ``[server] shutdown_grace_s`` > 0 the chaining waits that long, so a load balancer sees the failed
    readiness check and stops sending traffic while the gateway still accepts and serves everything; a second signal
    during the grace period stops at once.

    This works the same with one process or ``--workers N`` (each worker's lifespan hooks its own server). It does
    nothing outside the main thread (``TestClient`` runs the lifespan in a helper thread) or when the current handler
    is not a Python callable (then whoever handles the signal is not uvicorn, and the default must stay in force).
    The signal handler itself only sets attributes; logging and the delayed chaining run on the event loop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, SignalHandler] = {}
    for hooked in HOOKED_SIGNALS:
        handler = signal.getsignal(hooked)
        if callable(handler):
            previous[hooked] = handler
    if not previous:
        yield
        return
    hook = _ShutdownSignal(mark, previous, grace_s)
    for number in previous:
        signal.signal(number, hook)
    follower = asyncio.create_task(hook.follow(grace_s, log), name="shutdown-signal")
    try:
        yield
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        for number, original in previous.items():
            if signal.getsignal(number) is hook:
                signal.signal(number, original)
