"""The durable store: keys, submission intents, the task ledger and idempotency records, behind one interface."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Final, NamedTuple, Protocol

from gateway.catalog import DEFAULT_ACCOUNT, TaskStatus
from gateway.keys import KeyRecord

USAGE_GROUPS: Final = ("key", "model", "mode", "day", "account")
"""Dimensions :meth:`Store.usage` can group by."""

FIXED_DIGITS: Final = 9
_FIXED_SCALE: Final = 10**FIXED_DIGITS
_FIXED_QUANTUM: Final = Decimal(1).scaleb(-FIXED_DIGITS)
IDEMPOTENCY_TTL_S: Final = 86400.0
"""How long an idempotency record answers repeats: 24 hours."""
IDEMPOTENCY_IN_FLIGHT_TTL_S: Final = 300.0
"""An in-flight idempotency record older than this is taken to belong to a crashed process and taken over."""


class StoreError(Exception):
    """The store failed or refused an operation (database unavailable, locked too long, closed, ...)."""


class KeyExists(StoreError):
    """A key with this name already exists."""


class KeyNotFound(StoreError):
    """No key with this name."""


class KeyRevoked(StoreError):
    """The key is revoked, so it cannot be rotated."""


#: A budget hold outlives any upstream exchange; one older than this was left by a process that died.
BUDGET_HOLD_TTL_S = 600.0


def to_fixed(amount: Decimal) -> int:
    """Decimal -> integer count of 1e-9 units (half-even past 9 places): ``Decimal("0.42")`` -> 420000000."""
    if not amount.is_finite():
        raise ValueError("amount must be finite")
    try:
        return int((amount * _FIXED_SCALE).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    except InvalidOperation as exc:  # pragma: no cover - only for absurdly large amounts
        raise ValueError("amount out of range") from exc


def from_fixed(units: int) -> Decimal:
    """Integer count of 1e-9 units -> Decimal without superfluous trailing zeros (420000000 -> ``0.42``)."""
    # Integer arithmetic and an exact shift of the exponent: no division, no rounding (reports convert thousands).
    whole, fraction = divmod(units, _FIXED_SCALE)
    if fraction == 0:
        return Decimal(whole)
    return Decimal(units).scaleb(-FIXED_DIGITS).normalize()


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One upstream task in the ledger: who made it, what it was estimated at, and how it settled.

    ``duration`` is what the client asked for (None if omitted); ``estimate_seconds`` is what the estimate
    used (the configured default when ``duration_defaulted``). ``outcome`` and ``settled_*`` stay None until
    settlement.
    ``terminal_body`` is the upstream's terminal status JSON, so a poll after a restart is answered from here.
    """

    task_id: str
    key_name: str
    model: str
    mode: str
    tier: str
    audio: bool
    duration: int | None
    duration_defaulted: bool
    estimate_seconds: int
    estimate_usd: Decimal
    price_per_second_usd: Decimal
    mode_multiplier: Decimal
    request_id: str
    submitted_at: float
    status: str = TaskStatus.QUEUED.value
    progress: int | None = None
    last_polled_at: float | None = None
    last_checked_at: float | None = None
    outcome: str | None = None
    settled_seconds: Decimal | None = None
    settled_usd: Decimal | None = None
    settled_at: float | None = None
    terminal_body: bytes | None = None
    #: The upstream account that created the task: every later upstream call for it uses that account's key.
    account: str = DEFAULT_ACCOUNT

    @property
    def settled(self) -> bool:
        """True once the task has been settled (completed, failed or given up as unknown)."""
        return self.settled_at is not None

    @property
    def cost_usd(self) -> Decimal:
        """What the task counts for against a budget: the settled amount, else the estimate."""
        return self.settled_usd if self.settled_usd is not None else self.estimate_usd


@dataclass(frozen=True, slots=True)
class IntentRecord:
    """A submission written before forwarding whose outcome has not been recorded (yet)."""

    intent_id: str
    key_name: str
    request_id: str
    model: str
    mode: str
    submitted_at: float
    account: str = DEFAULT_ACCOUNT


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """A budget hold asked of :meth:`Store.record_intent`: ``amount`` of the intent's key's ``budget`` for the
    calendar ``month`` [start, end), taken at ``now``; holds older than ``ttl_s`` (a crashed process's) no longer
    count."""

    hold_id: str
    amount: Decimal
    budget: Decimal
    month: tuple[float, float]
    now: float
    ttl_s: float = BUDGET_HOLD_TTL_S


class Admission(enum.Enum):
    """What :meth:`Store.record_intent` did."""

    ADMITTED = "admitted"  # the intent is written (and the hold, if one was asked)
    NO_ROOM = "no_room"  # the account is full: nothing written
    OVER_BUDGET = "over_budget"  # the hold would pass the budget: nothing written


@dataclass(frozen=True, slots=True)
class IntentOutcome:
    """:meth:`Store.record_intent`'s answer; ``spent`` is the key's spend before this request (settled +
    outstanding + other live holds) when a hold was asked for, else None."""

    admission: Admission
    spent: Decimal | None = None

    @property
    def admitted(self) -> bool:
        return self.admission is Admission.ADMITTED


class UsageRow(NamedTuple):
    """One group of :meth:`Store.usage`; a dimension not grouped by is None.

    ``requested_seconds`` sums the seconds each estimate used (defaults included, see ``defaulted``);
    ``settled_usd`` sums settled tasks only; ``cost_usd`` is settled amounts plus estimates still outstanding.
    ``day`` is an ISO date (UTC) of submission. A named tuple rather than a frozen dataclass: as immutable, and
    several times cheaper to build (a report of a few thousand groups spent milliseconds in ``__init__``).
    """

    key: str | None
    model: str | None
    mode: str | None
    day: str | None
    tasks: int
    requested_seconds: int
    settled_seconds: Decimal
    estimated_usd: Decimal
    settled_usd: Decimal
    cost_usd: Decimal
    completed: int
    failed: int
    unknown: int
    pending: int
    defaulted: int
    account: str | None = None


class IdemKind(enum.Enum):
    """What :meth:`Store.idempotency_begin` found."""

    NEW = "new"
    """No record: one was created in flight; go ahead, then finish or abandon it."""
    IN_FLIGHT = "in_flight"
    """The first request with this key is still running (409)."""
    CONFLICT = "conflict"
    """The key was used with a different body (422)."""
    REPLAY = "replay"
    """The first request finished: replay its stored response."""


@dataclass(frozen=True, slots=True)
class IdemState:
    """Result of :meth:`Store.idempotency_begin`; status, headers and body are set for ``REPLAY`` only."""

    kind: IdemKind
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One completion webhook in the outbox: ``pending`` until delivered (then deleted) or ``failed`` (kept).

    ``delivery_id`` is the ``webhook-id`` of every attempt, so receivers can de-duplicate; ``attempts`` counts the
    attempts that finished (a process that dies mid-attempt leaves it unchanged: the attempt is made again).
    """

    delivery_id: str
    key_name: str
    host: str
    url: str
    body: bytes
    created_at: float
    state: str = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A delivery to write with a task's first settlement (:meth:`Store.settle`), unless its key or host already
    has that many pending."""

    record: OutboxRecord
    max_pending_per_key: int
    max_pending_per_host: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What :meth:`Store.settle` did: ``first`` when this call settled the task, ``webhook_queued`` when the
    webhook given with it was written in the same transaction (False: none given, not first, or its key or host
    at the pending cap)."""

    first: bool
    webhook_queued: bool = False

    def __bool__(self) -> bool:
        raise TypeError("a Settlement is not a truth value: read .first (was it this call?) or .webhook_queued")


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    """A completed task's archived video (``gateway.store.archive_rows`` has the states), or the attempt to make it."""

    task_id: str
    state: str
    attempts: int = 0
    claim_until: float | None = None
    key: str | None = None
    size: int | None = None
    sha256: str | None = None
    archived_at: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One admin action (``gateway.audit``): who (``actor``, ``address``), what (``action`` on ``target``, the
    ``changes`` as JSON-able values, never a secret) and when (``at``)."""

    audit_id: str
    at: float
    actor: str
    address: str | None
    action: str
    target: str
    changes: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AccountMark:
    """An upstream account set aside, as every process of the deployment sees it (``gateway.accounts.board``):
    after a capacity or rate refusal until ``set_aside_until``; after a rejected key while its key's fingerprint
    is ``unauthorized_key``."""

    account: str
    set_aside_until: float = 0.0
    unauthorized_key: str | None = None


class Store(Protocol):
    """The narrow async interface every backend implements, and the semantics every backend keeps.

    ``open_store(url)`` picks the backend from the URL scheme: SQLite (``gateway.store.sqlite``, one machine) or
    PostgreSQL (``gateway.store.postgres``, any number of processes and replicas), behind the same :class:`Store`
    protocol; ``gateway.store.rows`` holds the row layout they share. Every method is a coroutine and every write is
    one transaction, so callers never see half a change.

    Semantics every backend keeps:

    * **Keys** are stored by hash (``gateway.keys``). Every key change bumps :meth:`Store.keys_version` in the
      same transaction; processes poll that counter (about every 0.5 s) and reload :meth:`Store.list_keys`, so
      per-request authentication never touches the store yet a revocation is seen everywhere within a second.
    * **Intents**: a submission writes an intent *before* it is forwarded; :meth:`Store.resolve_intent` turns it
      into a task row (and deletes the intent) in one transaction; :meth:`Store.drop_intent` forgets one the
      upstream refused. What :meth:`Store.list_intents` returns after a crash is "outcome unknown", to reconcile.
    * **Settlement** happens at most once per task, whichever process sees the terminal status first
      (``UPDATE ... WHERE settled_at IS NULL``): :meth:`Store.settle` and :meth:`Store.mark_unknown` say so only to
      that first caller, so metrics counted on it never double count. The task's completion webhook, if any, is
      written to the outbox by that same transaction: settled and enqueued together, or neither.
    * **Money** is ``decimal.Decimal`` at this interface. Amounts (and settled seconds) are kept as exact
      fixed-point integers with 9 decimal places (nano-dollars / nano-seconds; see :func:`to_fixed`), so SQL
      ``SUM`` is exact and fast (no float, no Decimal parsing per row); anything finer than 1e-9 is rounded
      half-even on the way in. Prices and multipliers, which are never summed, are kept as decimal text.
    * **Idempotency** records are scoped per client key: see :meth:`Store.idempotency_begin`.
    * **Webhook outbox** rows are leased, never locked across a delivery: see :meth:`Store.outbox_claim`.
    * **Audit trail**: one append-only row per admin action (:class:`AuditRecord`); never a secret.

    Times are Unix epoch seconds (floats) passed in by the caller, so tests control the clock. Days are UTC.
    Failures of the backend surface as :class:`StoreError` (never a driver-specific exception).
    """

    async def close(self) -> None:
        """Release connections and worker threads; later calls raise :class:`StoreError`."""

    async def ping(self) -> bool:
        """True if the store answers a trivial query (readiness)."""

    # keys
    async def create_key(self, record: KeyRecord) -> None:
        """Insert a key; :class:`KeyExists` if the name is taken."""

    async def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, ordered by name."""

    async def get_key(self, name: str) -> KeyRecord | None:
        """The key called ``name``, or None."""

    async def find_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose current or previous (rotated-out) hash is ``key_hash``; check ``accepts`` on it."""

    async def revoke_key(self, name: str, at: float) -> bool:
        """Revoke ``name``; False if it does not exist or was already revoked."""

    async def rotate_key(self, name: str, new_hash: str, new_prefix: str, grace_until: float) -> KeyRecord:
        """Give ``name`` a new secret hash; the old one stays valid until ``grace_until``.

        Raises :class:`KeyNotFound` or :class:`KeyRevoked`. A second rotation ends the first one's grace.
        """

    async def keys_version(self) -> int:
        """Counter bumped by every key change, in the same transaction."""

    # intents
    async def record_intent(
        self,
        intent_id: str,
        key_name: str,
        request_id: str,
        model: str,
        mode: str,
        submitted_at: float,
        account: str = DEFAULT_ACCOUNT,
        max_in_flight: int = 0,
        hold_since: float = 0.0,
        hold: HoldRequest | None = None,
    ) -> IntentOutcome:
        """Write the intent to submit on ``account``, before forwarding; the admission of its capacity and, with
        ``hold``, of its key's budget, in one transaction.

        With ``hold``, the key's budget is checked first: when settled + outstanding estimates of tasks submitted
        in the hold's month + live holds + ``hold.amount`` would pass ``hold.budget``, nothing is written
        (``OVER_BUDGET``); else the hold is written with the intent. Budget checks of one key are serialised across
        processes and replicas (SQLite's write lock; a PostgreSQL advisory lock per key, taken before the account's),
        so concurrent submissions never overshoot. With ``max_in_flight`` > 0 the intent is written only if the
        account's unsettled tasks plus its intents submitted since ``hold_since`` are fewer, atomically across
        processes; else nothing is written (``NO_ROOM``, no hold either). With 0 (no limit) there is no count.
        """

    async def account_in_flight(self, hold_since: float) -> dict[str, int]:
        """Per account: unsettled tasks plus intents submitted since ``hold_since`` (accounts with none left out)."""

    async def account_marks(self) -> list[AccountMark]:
        """Every account's shared set-aside marks (stale ones included: the reader compares times and keys)."""

    async def mark_account_aside(self, account: str, until: float, at: float) -> None:
        """Set ``account`` aside until ``until`` for every process (its unauthorized mark kept)."""

    async def mark_account_unauthorized(self, account: str, key_fingerprint: str, at: float) -> None:
        """Record that the upstream rejected ``account``'s key of ``key_fingerprint`` (its set-aside kept)."""

    async def end_account_aside(self, account: str, until: float) -> None:
        """End ``account``'s set-aside (one of its tasks ended) if it is not later than ``until``, the one the
        caller knew of: a newer refusal's set-aside stays."""

    async def resolve_intent(self, intent_id: str, task: TaskRecord, release_hold: str | None = None) -> bool:
        """Insert ``task`` and delete the intent in one transaction; safe to retry.

        Returns False if the task row already existed (a retried write that had in fact committed, or an upstream
        answering with a task id it already gave another submission); the row is then left as it was and the
        intent, if any, stays (outcome unknown). An unknown ``intent_id`` is fine: the task is inserted all the same.
        ``release_hold`` names the submission's budget hold (taken by :meth:`record_intent`), deleted by the same
        transaction either way: the task row replaces the hold atomically, and a budgeted submission costs no extra
        write.
        """

    async def release_hold(self, hold_id: str) -> None:
        """Drop a hold whose submission ended without a task row (refused, failed, cancelled); none is fine."""

    async def budget_spent(
        self, key_name: str, month: tuple[float, float], now: float, ttl_s: float = BUDGET_HOLD_TTL_S
    ) -> Decimal:
        """What a budget check of ``key_name`` counts now (a read, no hold): settled + outstanding estimates of tasks
        submitted in ``month`` + holds younger than ``ttl_s``."""

    async def drop_intent(self, intent_id: str) -> bool:
        """Delete an intent whose submission the upstream refused; False if there was none."""

    async def list_intents(self) -> list[IntentRecord]:
        """Submissions whose outcome is unknown (oldest first)."""

    # tasks
    async def get_task(self, task_id: str) -> TaskRecord | None:
        """The ledger row for ``task_id``, or None."""

    async def update_status(self, task_id: str, status: str, progress: int | None, at: float, polled: bool) -> bool:
        """Record a non-final status seen at ``at`` (by a client poll if ``polled``, else by the settler).

        ``progress`` None keeps the previous value. Settled tasks are left alone (returns False), as are
        unknown task ids.
        """

    async def settle(
        self,
        task_id: str,
        outcome: str,
        seconds: Decimal,
        usd: Decimal,
        terminal_body: bytes | None,
        at: float,
        webhook: OutboxEntry | None = None,
    ) -> Settlement:
        """Settle ``task_id`` as ``completed``/``failed``; ``first`` only for the first settlement, any process.

        With ``webhook``, the first settlement also adds it to the outbox (within its pending caps, like
        :meth:`outbox_add`) in the same transaction; a later one writes nothing.
        """

    async def mark_unknown(self, task_id: str, at: float) -> bool:
        """Give up on ``task_id``: settled as ``unknown`` at its estimate; True only if this settled it (no webhook:
        the upstream never said how the task ended)."""

    async def tasks_for_key(
        self, key_name: str | None, limit: int = 50, before: str | None = None, *, status: str | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        """A page of tasks, newest first, and the cursor of the next page.

        ``key_name`` None: every key's; ``status``: only tasks in that status (one of ``TASK_STATUSES``).
        """

    async def tasks_needing_settlement(self, idle_since: float, limit: int = 100) -> list[TaskRecord]:
        """Unsettled tasks neither polled nor checked since ``idle_since``, least recently checked first."""

    async def outstanding_and_settled_usd(self, key_name: str, month_start: float, month_end: float) -> Decimal:
        """Settled amounts plus outstanding estimates of ``key_name``'s tasks submitted in [start, end)."""

    async def usage(
        self, since: float | None = None, until: float | None = None, group_by: tuple[str, ...] = ()
    ) -> list[UsageRow]:
        """Totals of tasks submitted in [since, until), grouped by a subset of :data:`USAGE_GROUPS`."""

    # idempotency
    async def idempotency_begin(
        self,
        key_name: str,
        idem_key: str,
        body_hash: str,
        now: float,
        ttl_s: float = IDEMPOTENCY_TTL_S,
        in_flight_ttl_s: float = IDEMPOTENCY_IN_FLIGHT_TTL_S,
    ) -> IdemState:
        """Claim ``idem_key`` for ``key_name``, atomically across processes.

        Records older than ``ttl_s`` count as absent; an in-flight record older than ``in_flight_ttl_s``
        (its process died) is taken over and reported as NEW. A different ``body_hash`` is CONFLICT, even
        while in flight.
        """

    async def idempotency_finish(
        self, key_name: str, idem_key: str, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Store the response to replay for ``idem_key``."""

    async def idempotency_abandon(self, key_name: str, idem_key: str) -> None:
        """Delete an in-flight record (the request failed retryably) so a retry can proceed."""

    # -- webhook outbox (gateway.webhooks.outbox) ---------------------------------------------------------------

    async def outbox_add(self, record: OutboxRecord, max_pending_per_key: int, max_pending_per_host: int) -> bool:
        """Insert a delivery unless its key or host already has that many pending ones (then False)."""

    async def outbox_claim(
        self,
        now: float,
        owner: str,
        lease_until: float,
        limit: int,
        per_host: int,
        per_key: int,
        busy_hosts: Sequence[str] = (),
        busy_keys: Sequence[str] = (),
    ) -> list[OutboxRecord]:
        """Lease up to ``limit`` due pending deliveries to ``owner`` until ``lease_until``, atomically across
        processes (a leased row is claimed by nobody else until the lease ends), oldest first, at most
        ``per_host``/``per_key`` for one host/key and none for ``busy_hosts``/``busy_keys``."""

    async def outbox_release(self, delivery_id: str, owner: str) -> bool:
        """Give back a leased delivery without an attempt (due again at once)."""

    async def outbox_retry(self, delivery_id: str, owner: str, next_attempt_at: float, error: str) -> bool:
        """Count a failed attempt and schedule the next one; False if ``owner`` lost the lease."""

    async def outbox_failed(self, delivery_id: str, owner: str, error: str) -> bool:
        """Count the final failed attempt and keep the row as ``failed``; False if ``owner`` lost the lease."""

    async def outbox_delivered(self, delivery_id: str, owner: str) -> bool:
        """Delete a delivered row; False if ``owner`` lost the lease."""

    async def outbox_list(self, state: str, limit: int = 1000) -> list[OutboxRecord]:
        """Rows in ``state`` (``pending`` or ``failed``), oldest first."""

    async def update_key_limits(self, record: KeyRecord) -> KeyRecord:
        """Set ``record.name``'s models, rpm, monthly budget and webhook URL to ``record``'s (bumps the keys
        version); :class:`KeyNotFound` / :class:`KeyRevoked` otherwise. Returns the stored record."""

    # archive (SPEC section 10): one row per completed task whose video is copied; see gateway.store.archive_rows
    async def archive_candidates(self, completed_since: float, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """(task id, settled at) of completed tasks settled since ``completed_since`` never claimed, or whose claim
        ran out by ``now``; oldest first."""

    async def archive_claim(self, task_id: str, now: float, until: float) -> bool:
        """Claim copying ``task_id`` until ``until``; True only for one process while the claim holds."""

    async def archive_stored(self, task_id: str, key: str, size: int, sha256: str, at: float) -> None:
        """Record the verified copy."""

    async def archive_retry(self, task_id: str, retry_at: float | None, error: str) -> None:
        """Count a failed attempt: claimable again after ``retry_at``, or given up (``failed``) when None."""

    async def get_archive(self, task_id: str) -> ArchiveRecord | None:
        """The archive row of ``task_id``, or None."""

    async def archives_stored_before(self, before: float, limit: int = 100) -> list[ArchiveRecord]:
        """Stored copies archived before ``before``, oldest first (for ``[archive] keep_days``)."""

    async def archive_removed(self, task_id: str) -> None:
        """Mark a stored copy as deleted."""

    async def archive_summary(self) -> dict[str, tuple[int, int]]:
        """``{state: (tasks, bytes)}`` for every state, plus ``unarchived`` completed tasks."""

    async def archive_records(self, after: str = "", limit: int = 1000) -> list[ArchiveRecord]:
        """A page of archive rows ordered by task id, after ``after`` (for copy-store)."""

    async def restore_archive(self, record: ArchiveRecord) -> None:
        """Insert an archive row as it is (copy-store); an existing row is left alone."""

    async def archive_retry_failed(self) -> int:
        """Make every given-up copy claimable again (``archive backfill``); how many."""

    # -- audit trail (gateway.audit) ------------------------------------------------------------------------------

    async def audit_add(self, record: AuditRecord) -> None:
        """Append one admin action."""

    async def audit_list(
        self, since: float | None, limit: int = 50, before: str | None = None
    ) -> tuple[list[AuditRecord], str | None]:
        """A page of admin actions at or after ``since``, newest first, and the next page's cursor (None: last)."""

    async def revoke_ui_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Record that admin UI session ``session_id`` signed out; revocations that expired by ``now`` go."""

    async def ui_session_revoked(self, session_id: str) -> bool:
        """True when admin UI session ``session_id`` has signed out (its cookie no longer opens a page)."""
