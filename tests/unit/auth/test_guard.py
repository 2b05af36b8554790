"""The guessing limiter: wrong secrets per address, a lockout, forgetting, and bounded memory."""

from __future__ import annotations

import pytest

from gateway.auth.guard import GuessLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **options: float) -> GuessLimiter:
    settings: dict[str, float] = {"max_failures": 3, "window_s": 60, "lockout_s": 300, **options}
    return GuessLimiter(
        max_failures=int(settings["max_failures"]),
        window_s=settings["window_s"],
        lockout_s=settings["lockout_s"],
        max_addresses=int(settings.get("max_addresses", 100)),
        clock=clock,
    )


class TestGuessLimiter:
    @pytest.mark.parametrize(
        ("failures", "locked"),
        [(1, False), (2, False), (3, True)],
    )
    def test_locks_after_max_failures(self, failures: int, locked: bool) -> None:
        """The third wrong secret within the window locks the address out for the lockout."""
        clock = Clock()
        guard = limiter(clock)
        results = [guard.failed("10.0.0.1") for _ in range(failures)]
        assert results[-1] is locked
        assert guard.retry_after("10.0.0.1") == (300 if locked else None)

    def test_lockout_ends(self) -> None:
        """After the lockout the address may try again, counting from zero."""
        clock = Clock()
        guard = limiter(clock)
        for _ in range(3):
            guard.failed("a")
        clock.now += 299.5
        assert guard.retry_after("a") == 1
        clock.now += 1
        assert guard.retry_after("a") is None
        assert guard.failed("a") is False

    def test_window_forgets_old_failures(self) -> None:
        """Failures further apart than the window never add up."""
        clock = Clock()
        guard = limiter(clock)
        outcomes = []
        for _ in range(6):
            outcomes.append(guard.failed("a"))
            outcomes.append(guard.failed("a"))
            clock.now += 61
        assert not any(outcomes) and guard.retry_after("a") is None

    def test_addresses_are_apart_and_success_clears(self) -> None:
        """One address's failures never lock another; a right secret clears the count."""
        clock = Clock()
        guard = limiter(clock)
        guard.failed("a")
        guard.failed("a")
        guard.succeeded("a")
        assert guard.failed("a") is False
        for _ in range(3):
            guard.failed("b")
        assert guard.retry_after("a") is None and guard.retry_after("b") == 300

    def test_memory_is_bounded(self) -> None:
        """Past ``max_addresses`` the least recently seen address is forgotten."""
        clock = Clock()
        guard = limiter(clock, max_addresses=2)
        for address in ("a", "b", "c"):
            guard.failed(address)
        assert len(guard._tallies) == 2 and "a" not in guard._tallies
