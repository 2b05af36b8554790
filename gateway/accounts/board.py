"""Which upstream accounts are set aside, shared by every worker and replica of a deployment (SPEC section 9).

A refusal seen by one process is written to the board at once; each process reads the board about once a second
(``AccountPool.follow_marks``) and keeps the result in memory, so a submission never waits for it. The marks live in
Redis when ``[cache] url`` names one (``gateway.shared.fail_open.SharedAccounts``: a Redis failure leaves each
process with what it knows), else in the store (:class:`StoreBoard`, SQLite or PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from gateway.store.base import AccountMark, Store, StoreError

_WARN_EVERY_S: Final = 10.0


class AccountBoard(Protocol):
    """The shared marks of the upstream accounts."""

    async def read(self) -> dict[str, AccountMark] | None:
        """Every account's marks, or None when the board cannot be read now (keep what is known)."""

    async def set_aside(self, account: str, until: float) -> bool:
        """``account`` refused a submission for capacity or rate: set aside until ``until`` (epoch seconds).
        False when it could not be written (the writer then keeps it as its own)."""

    async def unauthorized(self, account: str, key_fingerprint: str) -> bool:
        """The upstream rejected ``account``'s key (of ``key_fingerprint``): set aside until the key changes."""

    async def end_aside(self, account: str, until: float) -> bool:
        """One of ``account``'s tasks ended: its set-aside until ``until`` (not a later one) is over."""


class StoreBoard:
    """The marks in the store's ``account_marks`` table; a store failure is logged (at most every 10 s) and the
    process keeps what it knows."""

    def __init__(self, store: Store, log: Any, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._log = log
        self._clock = clock
        self._warned = float("-inf")

    async def read(self) -> dict[str, AccountMark] | None:
        try:
            marks = await self._store.account_marks()
        except StoreError as exc:
            self._failed("read", exc)
            return None
        return {mark.account: mark for mark in marks}

    async def set_aside(self, account: str, until: float) -> bool:
        return await self._write("set_aside", self._store.mark_account_aside(account, until, self._clock()))

    async def unauthorized(self, account: str, key_fingerprint: str) -> bool:
        return await self._write(
            "unauthorized", self._store.mark_account_unauthorized(account, key_fingerprint, self._clock())
        )

    async def end_aside(self, account: str, until: float) -> bool:
        return await self._write("end_aside", self._store.end_account_aside(account, until))

    async def _write(self, operation: str, write: Awaitable[None]) -> bool:
        try:
            await write
        except StoreError as exc:
            self._failed(operation, exc)
            return False
        return True

    def _failed(self, operation: str, exc: StoreError) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            self._log.error("account_marks_unavailable", operation=operation, error=str(exc))
