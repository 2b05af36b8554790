"""The upstream accounts of one process: their keys, what each is doing, and the waiting line for room."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.accounts.board import AccountBoard
from gateway.accounts.parse import AccountsError, AccountSettings, fingerprint, parse_keys_file
from gateway.accounts.policy import (
    AccountView,
    all_unauthorized,
    candidates,
    capacity_retry_after,
    refusal,
    retry_after_s,
)
from gateway.catalog import RefusalReason
from gateway.errors import GatewayError, TooManyRequests, UpstreamUnavailable
from gateway.known_secrets import KnownSecrets
from gateway.metrics import Metrics
from gateway.store.base import AccountMark, Store, StoreError

T = TypeVar("T")

INTENT_HOLD_S: Final = 600.0
"""An intent (a submission on its way, or one whose answer never came) holds its account's slot this long."""
_WAIT_POLL_S: Final = 0.25
_REFRESH_S: Final = 5.0
MARKS_EVERY_S: Final = 1.0
"""How often each process reads the shared set-aside marks (``gateway.accounts.board``)."""


@dataclass(frozen=True, slots=True)
class Placed:
    """A submission admitted on ``account`` (its intent written)."""

    account: str
    admitted: Any


class AccountPool:
    """Keys, states and capacity bookkeeping of the upstream accounts.

    The store is the authority on capacity (``Store.record_intent`` admits an intent only while its account has room,
    across every process); this pool keeps what one process needs around it:

    * **keys** by account, re-read from ``UNIALL_API_KEYS_FILE`` when the file changes (``follow``), so a key is
      rotated without a restart; an account whose key changed is no longer ``unauthorized``. A file that turns
      unreadable or malformed keeps the last good keys (an error line says why). Every key loaded joins the app's
      ``KnownSecrets`` (masked in log lines and upstream answers; a rotated-out one for a while longer).
    * **in flight** per account: the store's count (re-read every few seconds), moved here on every admission and
      release in between, for the choice and the gauge ``kling_gateway_upstream_account_in_flight``.
    * **set aside**: after a capacity or rate refusal, until its ``Retry-After`` passes or one of its tasks ends;
      after a 401/403, ``unauthorized`` until its key changes (an error log line, the refusal counter, a gauge).
      Written on the deployment's ``AccountBoard`` at each refusal and read from it about once a second
      (``follow_marks``), so every worker and replica sets the account aside; a submission never waits for the board.
    * **removed** accounts: ones the ledger still has unfinished tasks on but no key for. They are reported (a
      warning at start-up, ``removed`` in ``GET /gateway/accounts``); the settler gives their tasks up at max age.
    * **the waiting line** (``[upstream] capacity_wait_s``): submissions finding no room wait first come, first
      served; a release in this process wakes the head at once, other processes' releases are seen by re-trying
      every ``_WAIT_POLL_S``.

    Key material is never logged, exported or answered: only names and :func:`fingerprint` s.
    """

    def __init__(
        self,
        keys: Mapping[str, str],
        settings: Mapping[str, AccountSettings],
        metrics: Metrics,
        log: Any,
        *,
        keys_file: str = "",
        capacity_wait_s: float = 0.0,
        capacity_retry_after_s: int = 5,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        secrets: KnownSecrets | None = None,
        board: AccountBoard | None = None,
    ) -> None:
        self._keys = dict(keys)
        self._board = board
        self._secrets = secrets if secrets is not None else KnownSecrets()
        self._secrets.upstream_keys(self._keys.values())
        self._settings = dict(settings)
        self._metrics = metrics
        self._log = log
        self._keys_file = keys_file
        self._file_stamp = self._stamp()
        self._wait_s = capacity_wait_s
        self._retry_after_s = capacity_retry_after_s
        self._clock = clock
        self._monotonic = monotonic
        self._in_flight: dict[str, int] = dict.fromkeys(self._keys, 0)
        self._set_aside: dict[str, float] = {}
        self._unauthorized: dict[str, str] = {}  # account -> fingerprint of the key the upstream rejected
        # Set-asides the board does not hold (its write failed): kept here until they pass or a task ends.
        self._unshared_aside: dict[str, float] = {}
        self._aside_written: dict[str, float] = {}  # account -> monotonic time of this process's last set-aside
        self._ends: dict[str, float] = {}  # set-asides ended here by a task, not yet ended on the board
        self._removed: dict[str, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        for name in self._keys:
            self._metrics.account_in_flight.labels(name).set(0)
            self._metrics.account_unauthorized.labels(name).set(0)
            self._metrics.account_max_in_flight.labels(name).set(self._limit(name))

    # -- keys ------------------------------------------------------------------------------------------------------

    def key(self, account: str) -> str | None:
        """The key of ``account`` now (None for an account no longer configured)."""
        return self._keys.get(account)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @property
    def simple(self) -> bool:
        """One account without a limit: the submit path needs no choice and no capacity count."""
        if len(self._keys) != 1:
            return False
        return self._limit(next(iter(self._keys))) <= 0

    def _stamp(self) -> tuple[float, int, int] | None:
        if not self._keys_file:
            return None
        try:
            stat = os.stat(self._keys_file)
        except OSError:
            return None
        return (stat.st_mtime, stat.st_size, stat.st_ino)

    def reload_keys(self) -> bool:
        """Re-read the key file if it changed; True when the keys were replaced."""
        if not self._keys_file:
            return False
        stamp = self._stamp()
        if stamp == self._file_stamp:
            return False
        self._file_stamp = stamp
        try:
            keys = parse_keys_file(Path(self._keys_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, AccountsError) as exc:
            reason = str(exc) if isinstance(exc, AccountsError) else type(exc).__name__
            self._log.error("upstream_keys_reload_failed", file=self._keys_file, error=reason)
            return False
        self.replace_keys(keys)
        return True

    def replace_keys(self, keys: Mapping[str, str]) -> None:
        """Use ``keys`` from now on: a changed key clears ``unauthorized``; a dropped account's tasks are removed."""
        old = self._keys
        self._keys = dict(keys)
        self._secrets.upstream_keys(keys.values())  # masked in log lines and answers before the first use
        changed = sorted(name for name in keys if name in old and old[name] != keys[name])
        for name in list(self._unauthorized):
            if name in keys and fingerprint(keys[name]) != self._unauthorized[name]:
                del self._unauthorized[name]
                self._metrics.account_unauthorized.labels(name).set(0)
                self._log.info("upstream_account_key_changed", account=name, key_fingerprint=fingerprint(keys[name]))
        for name in keys:
            self._in_flight.setdefault(name, 0)
            self._metrics.account_max_in_flight.labels(name).set(self._limit(name))
            self._metrics.account_unauthorized.labels(name).set(1 if name in self._unauthorized else 0)
        self._log.info(
            "upstream_keys_reloaded",
            accounts=sorted(keys),
            added=sorted(set(keys) - set(old)),
            dropped=sorted(set(old) - set(keys)),
            changed=changed,
        )
        self._wake()

    # -- state -----------------------------------------------------------------------------------------------------

    def _limit(self, account: str) -> int:
        settings = self._settings.get(account)
        return settings.max_in_flight if settings is not None else 0

    def views(self) -> list[AccountView]:
        """Every configured account, then every removed one, as the choice and the admin answer see them."""
        views = []
        for name in self._keys:
            settings = self._settings.get(name, AccountSettings())
            views.append(
                AccountView(
                    name,
                    self._in_flight.get(name, 0),
                    settings.max_in_flight,
                    settings.weight,
                    settings.models,
                    self._set_aside.get(name, 0.0),
                    name in self._unauthorized,
                )
            )
        for name, count in sorted(self._removed.items()):
            if name not in self._keys:
                views.append(AccountView(name, count, removed=True))
        return views

    def describe(self) -> list[dict[str, Any]]:
        """``GET /gateway/accounts`` rows: never a key, only its fingerprint."""
        now = self._clock()
        rows = []
        for view in self.views():
            key = self._keys.get(view.name)
            rows.append(
                {
                    "name": view.name,
                    "state": view.state(now).value,
                    "in_flight": view.in_flight,
                    "max_in_flight": view.max_in_flight,
                    "weight": view.weight,
                    "models": list(view.models),
                    "key_fingerprint": fingerprint(key) if key is not None else None,
                }
            )
        return rows

    def hold_since(self) -> float:
        """Intents submitted after this time still hold their account's slot."""
        return self._clock() - INTENT_HOLD_S

    async def refresh(self, store: Store) -> None:
        """Take every process's in-flight counts from the store; note accounts the ledger has but no key names."""
        counts = await store.account_in_flight(self.hold_since())
        for name in set(self._in_flight) | set(counts):
            if name in self._keys:
                self._in_flight[name] = counts.get(name, 0)
                self._metrics.account_in_flight.labels(name).set(self._in_flight[name])
        removed = {name: count for name, count in counts.items() if name not in self._keys}
        for name in set(self._removed) - set(removed):
            self._metrics.account_in_flight.labels(name).set(0)
        for name, count in removed.items():
            self._metrics.account_in_flight.labels(name).set(count)
        self._removed = removed

    async def check_removed(self, store: Store) -> None:
        """At start-up: read the counts and warn about each removed account that still has unfinished tasks."""
        await self.refresh(store)
        for name, count in sorted(self._removed.items()):
            self._log.warning(
                "upstream_account_removed", account=name, unfinished_tasks=count, will_end="unknown at max age"
            )

    async def follow(self, store: Store, interval_s: float = _REFRESH_S) -> None:
        """Forever: re-read the key file when it changed, and the in-flight counts."""
        while True:
            await asyncio.sleep(interval_s)
            self.reload_keys()
            try:
                await self.refresh(store)
            except StoreError as exc:
                self._log.error("account_refresh_failed", error=str(exc))
            self._wake()  # other processes may have freed slots

    async def sync(self) -> None:
        """Take the deployment's set-aside marks from the board (after ending there the set-asides tasks ended
        here): a refusal seen by any process sets the account aside in this one too."""
        if self._board is None:
            return
        for account, until in list(self._ends.items()):
            if await self._board.end_aside(account, until):
                self._ends.pop(account, None)
        started = self._monotonic()
        marks = await self._board.read()
        if marks is not None:
            self.apply_marks(marks, read_since=started)

    def apply_marks(self, marks: Mapping[str, AccountMark], read_since: float = float("inf")) -> None:
        """The board's marks over this process's: its set-aside times (kept: one written here since the read
        began, one the board could not take, one a task here has just ended); an unauthorized mark counts while
        it names the account's current key. An account this process found unauthorized stays so whatever the
        board says: only a new key clears that."""
        now = self._clock()
        for name, key in self._keys.items():
            mark = marks.get(name)
            if self._aside_written.get(name, float("-inf")) < read_since and name not in self._ends:
                shared = mark.set_aside_until if mark is not None else 0.0
                until = max(shared, self._unshared_aside.get(name, 0.0))
                if until > now:
                    self._set_aside[name] = until
                else:
                    self._set_aside.pop(name, None)
                    self._unshared_aside.pop(name, None)
            rejected = fingerprint(key)
            if mark is not None and mark.unauthorized_key == rejected and name not in self._unauthorized:
                self._unauthorized[name] = rejected
                self._metrics.account_unauthorized.labels(name).set(1)
        self._wake()

    async def follow_marks(self, interval_s: float = MARKS_EVERY_S) -> None:
        """Forever: :meth:`sync` about once a second (each process reads the board once, not per submission)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.sync()

    # -- admission ---------------------------------------------------------------------------------------------

    async def place(
        self,
        model: str,
        admit: Callable[[str, int], Awaitable[T | None]],
        *,
        exclude: Iterable[str] = (),
        wait: bool,
        before_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[str, T] | None:
        """Admit a submission for ``model`` on the least loaded account with room (``admit(account, limit)`` writes
        the intent and answers None when the store found the account full; what it raises ends the placement).
        With ``wait`` and a ``capacity_wait_s``, wait first come first served for room, after ``before_wait`` (once:
        it may refuse the submission instead); None when no account could take it."""
        exclude = set(exclude)
        deadline = self._monotonic() + (self._wait_s if wait else 0.0)
        first = True
        while True:
            if first and self._waiters:
                placed = None  # others wait already: queue behind them
            else:
                try:
                    placed = await self._try(model, admit, exclude)
                except BaseException:
                    self._wake()  # refused for another reason: the next in line may take the room
                    raise
            if placed is not None:
                self._wake()  # the head got in: the next may have room too
                return placed
            remaining = deadline - self._monotonic()
            if remaining <= 0 or all_unauthorized(self.views(), model):  # no key to wait for
                return None
            if first and before_wait is not None:
                await before_wait()
            first = False
            await self._wait_turn(remaining)

    async def _try(
        self, model: str, admit: Callable[[str, int], Awaitable[T | None]], exclude: set[str]
    ) -> tuple[str, T] | None:
        for name in candidates(self.views(), model, self._clock(), exclude):
            limit = self._limit(name)
            admitted = await admit(name, limit)
            if admitted is not None:
                self._in_flight[name] = self._in_flight.get(name, 0) + 1
                self._metrics.account_in_flight.labels(name).set(self._in_flight[name])
                return name, admitted
            self._in_flight[name] = max(self._in_flight.get(name, 0), limit)  # the store says full
        return None

    async def _wait_turn(self, remaining: float) -> None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout=min(remaining, _WAIT_POLL_S))
        except TimeoutError:
            pass
        finally:
            if turn in self._waiters:
                self._waiters.remove(turn)

    def _wake(self) -> None:
        """Let the first waiter try again."""
        while self._waiters:
            head = self._waiters.popleft()
            if not head.done():
                head.set_result(None)
                return

    def no_account_error(self, model: str) -> GatewayError:
        """No account can take a submission for ``model``; nothing was forwarded. Every account serving it
        unauthorized: 502 ``upstream_auth_failed`` (waiting helps nobody until the operator replaces a key); else
        (full, set aside for capacity or rate, a mix with unauthorized ones, or none serving the model) 429
        ``upstream_capacity`` with the ``Retry-After`` of the soonest account that could take it."""
        views, now = self.views(), self._clock()
        if all_unauthorized(views, model):
            failed = UpstreamUnavailable(
                f"The upstream rejected the key of every upstream account serving '{model}'; "
                "the operator has been alerted.",
                code="upstream_auth_failed",
            )
            failed.request_sent = False
            return failed
        seconds = capacity_retry_after(views, model, now, self._retry_after_s)
        return TooManyRequests(
            f"No upstream account serving '{model}' has room for another task; retry in {seconds} s.",
            code="upstream_capacity",
            headers={"Retry-After": str(seconds)},
        )

    def unauthorized(self, account: str) -> bool:
        """Whether the upstream rejected ``account``'s current key (a dict lookup: the one-account path asks it
        on every submission)."""
        return account in self._unauthorized

    # -- outcomes --------------------------------------------------------------------------------------------------

    def released(self, account: str, task_ended: bool) -> None:
        """A slot of ``account`` is free: one of its tasks ended (which also ends a set-aside), or a submission
        on it failed before the upstream had it."""
        if account in self._removed:
            self._removed[account] = max(0, self._removed[account] - 1)
            self._metrics.account_in_flight.labels(account).set(self._removed[account])
            return
        self._in_flight[account] = max(0, self._in_flight.get(account, 0) - 1)
        self._metrics.account_in_flight.labels(account).set(self._in_flight[account])
        if task_ended:
            until = self._set_aside.pop(account, None)
            self._unshared_aside.pop(account, None)
            if until is not None and self._board is not None:
                self._ends[account] = max(until, self._ends.get(account, 0.0))  # ended on the board at next sync
        self._wake()

    async def refused(self, account: str, status: int, body: bytes, retry_after: str | None) -> RefusalReason | None:
        """Read an upstream answer to a submission on ``account``; set the account aside if it was a refusal,
        here and on the board (so every process skips it)."""
        reason = refusal(status, body)
        if reason is None:
            return None
        self._metrics.account_refusals.labels(account, reason.value).inc()
        if reason is RefusalReason.UNAUTHORIZED:
            key = self._keys.get(account, "")
            self._unauthorized[account] = fingerprint(key)
            self._metrics.account_unauthorized.labels(account).set(1)
            self._log.error(
                "upstream_account_unauthorized",
                account=account,
                status=status,
                key_fingerprint=fingerprint(key),
                until="its key changes",
            )
            if self._board is not None:
                await self._board.unauthorized(account, fingerprint(key))
            return reason
        seconds = retry_after_s(retry_after)
        until = self._clock() + (seconds if seconds is not None else float(self._retry_after_s))
        self._set_aside[account] = until
        self._aside_written[account] = self._monotonic()
        self._ends.pop(account, None)
        self._log.warning(
            "upstream_account_set_aside", account=account, reason=reason.value, for_s=until - self._clock()
        )
        if self._board is not None and not await self._board.set_aside(account, until):
            self._unshared_aside[account] = until
        return reason
