"""The upstream circuit breaker: a pure state machine on an injected clock, plus the error it answers with.

The states and transitions are described on :class:`CircuitBreaker`.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import ServiceUnavailable, UpstreamUnavailable


class BreakerState(enum.Enum):
    """Where the breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one upstream call; report its outcome with ``success``, ``failure`` or ``abandon``."""

    probe: bool
    generation: int


class BreakerOpen(Exception):
    """The breaker refused a call; ``retry_after_s`` is how long until it will let a probe through."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"circuit open for another {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s


class CircuitOpen(ServiceUnavailable, UpstreamUnavailable):
    """503 ``upstream_unavailable`` answered by the breaker; nothing was sent (``request_sent`` False).

    A ``ServiceUnavailable`` (503, ``server_error``) for the client, and an ``UpstreamUnavailable`` for the
    submission path, which then drops the intent row at once: the upstream never saw this request.
    """

    request_sent = False


def open_error(retry_after_s: float) -> CircuitOpen:
    """The client-visible error for a refused call, with ``Retry-After`` in whole seconds (at least 1)."""
    seconds = max(1, math.ceil(retry_after_s))
    return CircuitOpen(
        f"The upstream is failing; the gateway stopped calling it for now. Retry in {seconds} s.",
        code="upstream_unavailable",
        headers={"Retry-After": str(seconds)},
    )


class CircuitBreaker:
    """Consecutive-failure breaker; not thread-safe (one per event loop, as the ``UpstreamClient`` is).

    After ``failure_threshold`` consecutive upstream failures (transport errors and 5xx answers; a 4xx is an answer,
    not a failure) the breaker opens: calls fail fast with 503 ``upstream_unavailable`` and ``Retry-After`` = the
    remaining open time, without touching the upstream. After ``open_s`` it is half-open: exactly one call (the probe)
    goes through while every other keeps failing fast; the probe's success closes the breaker, its failure opens it
    for another ``open_s``. A probe that ends without an outcome (cancelled) hands the probe to the next caller::

                  failures ≥ threshold                 open_s elapsed, next call = probe
        CLOSED ─────────────────────────► OPEN ─────────────────────────────────────────► HALF_OPEN
           ▲                                ▲                probe fails                      │
           │                                └─────────────────────────────────────────────────┤
           └──────────────────────────────────────────────────────────────────────────────────┘
                                                  probe succeeds

    Outcomes of calls admitted before the breaker opened (still in flight when it did) are ignored: only the probe
    decides when it is not closed. ``failure_threshold = 0`` turns the breaker off (every call is admitted).
    Status polls keep being answered from the status cache (``X-Cache: STALE``) while it is open, since the poller
    serves a stale entry on any ``GatewayError`` of 500 or more.
    """

    def __init__(self, failure_threshold: int, open_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 0:
            raise ValueError("failure_threshold must not be negative")
        if open_s <= 0:
            raise ValueError("open_s must be positive")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        #: Bumped on every transition, so late outcomes of calls admitted in an earlier state are recognised.
        self._generation = 0

    @property
    def enabled(self) -> bool:
        """False when ``failure_threshold`` is 0 (the breaker never opens)."""
        return self.failure_threshold > 0

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose time is up reads as half-open."""
        if self._state is BreakerState.OPEN and self._remaining() <= 0:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row counted while closed (kept as they were when it opened)."""
        return self._failures

    def admit(self) -> Permit:
        """A permit for one call, or ``BreakerOpen`` with the seconds until a probe will be let through."""
        if not self.enabled or self._state is BreakerState.CLOSED:
            return Permit(probe=False, generation=self._generation)
        if self._state is BreakerState.OPEN:
            remaining = self._remaining()
            if remaining > 0:
                raise BreakerOpen(remaining)
            self._transition(BreakerState.HALF_OPEN)
        if self._probe_out:
            # Half-open with the probe in flight: the others wait for its verdict (at least a second).
            raise BreakerOpen(0.0)
        self._probe_out = True
        return Permit(probe=True, generation=self._generation)

    def success(self, permit: Permit) -> None:
        """The call reached the upstream and got a non-5xx answer."""
        if permit.generation != self._generation:
            return
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        elif permit.probe:
            self._transition(BreakerState.CLOSED)

    def failure(self, permit: Permit) -> None:
        """The call failed: transport error, timeout, invalid answer or 5xx."""
        if not self.enabled or permit.generation != self._generation:
            return
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
        elif permit.probe:
            self._open()

    def abandon(self, permit: Permit) -> None:
        """The call ended without an outcome (cancelled): a probe is handed to the next caller."""
        if permit.probe and permit.generation == self._generation:
            self._probe_out = False

    def _open(self) -> None:
        """Open now, for ``open_s``."""
        self._transition(BreakerState.OPEN)
        self._opened_at = self._clock()

    def _transition(self, state: BreakerState) -> None:
        """Enter ``state``: a new generation, no probe out."""
        self._state = state
        self._generation += 1
        self._probe_out = False
        if state is BreakerState.CLOSED:
            self._failures = 0

    def _remaining(self) -> float:
        """Seconds left open (negative once a probe may go)."""
        return self._opened_at + self.open_s - self._clock()
