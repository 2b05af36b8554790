"""SQLite backend of the store (``sqlite:///path.db``): WAL, one writer thread with group commit, migrations in code.

The threads, durability, usage rollup and migration rules are described on :class:`SQLiteStore`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, TypeVar

from gateway.catalog import DEFAULT_ACCOUNT, TASK_STATUSES, TERMINAL
from gateway.keys import KeyRecord
from gateway.store import archive_rows as arch
from gateway.store.archive_rows import archive_schema
from gateway.store.base import (
    BUDGET_HOLD_TTL_S,
    FIXED_DIGITS,
    IDEMPOTENCY_IN_FLIGHT_TTL_S,
    IDEMPOTENCY_TTL_S,
    AccountMark,
    Admission,
    ArchiveRecord,
    AuditRecord,
    HoldRequest,
    IdemKind,
    IdemState,
    IntentOutcome,
    IntentRecord,
    KeyExists,
    KeyNotFound,
    KeyRevoked,
    OutboxEntry,
    OutboxRecord,
    Settlement,
    StoreError,
    TaskRecord,
    UsageRow,
    from_fixed,
    to_fixed,
)
from gateway.store.rows import (
    AUDIT_COLUMNS,
    MAX_PAGE,
    OUTBOX_COLUMNS,
    add_usage,
    audit_page_sql,
    audit_record,
    audit_row,
    check_group_by,
    decode_cursor,
    encode_cursor,
    insert_delta,
    key_record,
    key_row,
    outbox_record,
    outbox_row,
    page_params,
    settle_delta,
    task_record,
    task_row,
    usage_queries,
    usage_rows,
)
from gateway.store.sqlite_writer import MAX_BATCH, GroupCommitWriter, connect, guarded, run_on, transaction

T = TypeVar("T")

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE client_keys (
                name TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                prefix TEXT NOT NULL,
                models TEXT NOT NULL,
                rpm INTEGER,
                monthly_budget_usd TEXT,
                created_at REAL NOT NULL,
                revoked_at REAL,
                previous_hash TEXT,
                previous_valid_until REAL,
                webhook_url TEXT
            )""",
            "CREATE INDEX client_keys_previous_hash ON client_keys (previous_hash)",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            "INSERT INTO counters (name, value) VALUES ('keys_version', 0)",
            """CREATE TABLE intents (
                intent_id TEXT PRIMARY KEY,
                key_name TEXT NOT NULL,
                request_id TEXT NOT NULL,
                model TEXT NOT NULL,
                mode TEXT NOT NULL,
                submitted_at REAL NOT NULL
            )""",
            # Money and settled seconds are integers in units of 1e-9 (exact, fast SUM); see gateway.store.base.
            """CREATE TABLE tasks (
                task_id TEXT PRIMARY KEY,
                key_name TEXT NOT NULL,
                model TEXT NOT NULL,
                mode TEXT NOT NULL,
                tier TEXT NOT NULL,
                audio INTEGER NOT NULL,
                duration INTEGER,
                duration_defaulted INTEGER NOT NULL,
                estimate_seconds INTEGER NOT NULL,
                estimate_nano INTEGER NOT NULL,
                price_per_second_usd TEXT NOT NULL,
                mode_multiplier TEXT NOT NULL,
                request_id TEXT NOT NULL,
                submitted_at REAL NOT NULL,
                submitted_day INTEGER NOT NULL,
                status TEXT NOT NULL,
                progress INTEGER,
                last_polled_at REAL,
                last_checked_at REAL,
                outcome TEXT,
                settled_seconds_nano INTEGER,
                settled_nano INTEGER,
                settled_at REAL
            )""",
            # Bodies apart, so the tasks table stays narrow and usage scans stay fast.
            """CREATE TABLE task_bodies (
                task_id TEXT PRIMARY KEY REFERENCES tasks (task_id) ON DELETE CASCADE,
                body BLOB NOT NULL
            )""",
            "CREATE INDEX tasks_key_time ON tasks (key_name, submitted_at, task_id)",
            "CREATE INDEX tasks_time ON tasks (submitted_at, task_id)",
            # The settler's queue: unsettled tasks, least recently checked first.
            "CREATE INDEX tasks_unsettled ON tasks (COALESCE(last_checked_at, submitted_at), task_id) "
            "WHERE settled_at IS NULL",
            """CREATE TABLE idempotency (
                key_name TEXT NOT NULL,
                idem_key TEXT NOT NULL,
                body_hash TEXT NOT NULL,
                state TEXT NOT NULL,
                created_at REAL NOT NULL,
                status INTEGER,
                headers TEXT,
                body BLOB,
                PRIMARY KEY (key_name, idem_key)
            )""",
            "CREATE INDEX idempotency_created ON idempotency (created_at)",
            # Per-day totals kept in step with tasks (same transactions), so usage and budget queries read
            # a few thousand rollup rows instead of sorting a month of tasks.
            """CREATE TABLE usage_daily (
                day INTEGER NOT NULL,
                key_name TEXT NOT NULL,
                model TEXT NOT NULL,
                mode TEXT NOT NULL,
                tasks INTEGER NOT NULL,
                requested_seconds INTEGER NOT NULL,
                settled_seconds_nano INTEGER NOT NULL,
                estimate_nano INTEGER NOT NULL,
                settled_nano INTEGER NOT NULL,
                cost_nano INTEGER NOT NULL,
                completed INTEGER NOT NULL,
                failed INTEGER NOT NULL,
                unknown INTEGER NOT NULL,
                pending INTEGER NOT NULL,
                defaulted INTEGER NOT NULL,
                PRIMARY KEY (day, key_name, model, mode)
            )""",
            "CREATE INDEX usage_daily_key ON usage_daily (key_name, day)",
        ),
    ),
    (
        2,
        (
            # Completion webhooks waiting for (or given up on) delivery: gateway.webhooks.outbox.
            """CREATE TABLE webhook_outbox (
                delivery_id TEXT PRIMARY KEY,
                key_name TEXT NOT NULL,
                host TEXT NOT NULL,
                url TEXT NOT NULL,
                body BLOB NOT NULL,
                created_at REAL NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                next_attempt_at REAL NOT NULL,
                lease_owner TEXT,
                lease_until REAL NOT NULL,
                last_error TEXT
            )""",
            "CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at)",
            "CREATE INDEX webhook_outbox_key ON webhook_outbox (key_name, state)",
            "CREATE INDEX webhook_outbox_host ON webhook_outbox (host, state)",
        ),
    ),
    (3, archive_schema("REAL", "INTEGER", "TEXT")),
    (
        4,
        (
            # Upstream accounts (SPEC section 9): tasks and intents recorded before them belong to 'default'.
            "ALTER TABLE intents ADD COLUMN account TEXT NOT NULL DEFAULT 'default'",
            "ALTER TABLE tasks ADD COLUMN account TEXT NOT NULL DEFAULT 'default'",
            # Capacity admission counts an account's unsettled tasks (and its intents: a small table, only the
            # submissions on their way, so it needs no index of its own).
            "CREATE INDEX tasks_account_unsettled ON tasks (account) WHERE settled_at IS NULL",
        ),
    ),
    (
        5,
        (
            # Budget held by submissions on their way upstream (taken with the intent, Store.record_intent).
            """CREATE TABLE budget_holds (
                hold_id TEXT PRIMARY KEY,
                key_name TEXT NOT NULL,
                amount_nano INTEGER NOT NULL,
                created_at REAL NOT NULL
            )""",
            "CREATE INDEX budget_holds_key ON budget_holds (key_name, created_at)",
        ),
    ),
    (
        6,
        (
            # The audit trail of admin actions: gateway.audit.
            """CREATE TABLE audit_log (
                audit_id TEXT PRIMARY KEY,
                at REAL NOT NULL,
                actor TEXT NOT NULL,
                address TEXT,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                changes TEXT NOT NULL
            )""",
            "CREATE INDEX audit_log_at ON audit_log (at, audit_id)",
        ),
    ),
    (
        7,
        (
            # Admin UI (issue 17). The tasks page's status filter: newest tasks of one status, an index range.
            "CREATE INDEX tasks_status_time ON tasks (status, submitted_at, task_id)",
            # Reports grouped by key (and model) read the rollup in group order from the index alone, with no
            # sort of its rows: the 60-day by key and model report halves.
            "CREATE INDEX usage_daily_key_model ON usage_daily (key_name, model, day, tasks, requested_seconds, "
            "settled_seconds_nano, estimate_nano, settled_nano, cost_nano, completed, failed, unknown, pending, "
            "defaulted)",
            # Signed-out UI sessions, until their cookies would have expired anyway (Store.revoke_ui_session).
            """CREATE TABLE ui_session_revocations (
                session_id TEXT PRIMARY KEY,
                expires_at REAL NOT NULL
            )""",
            "CREATE INDEX ui_session_revocations_expiry ON ui_session_revocations (expires_at)",
        ),
    ),
    (
        8,
        (
            # Upstream accounts set aside, shared by every process when there is no Redis: gateway.accounts.board.
            """CREATE TABLE account_marks (
                account TEXT PRIMARY KEY,
                set_aside_until REAL NOT NULL,
                unauthorized_key TEXT,
                updated_at REAL NOT NULL
            )""",
        ),
    ),
)
"""The schema, as (version, statements) in order; append, never edit."""

_KEY_COLUMNS = (
    "name, key_hash, prefix, models, rpm, monthly_budget_usd, created_at, revoked_at, "
    "previous_hash, previous_valid_until, webhook_url"
)
_TASK_COLUMNS = (
    "task_id, key_name, model, mode, tier, audio, duration, duration_defaulted, estimate_seconds, "
    "estimate_nano, price_per_second_usd, mode_multiplier, request_id, submitted_at, submitted_day, status, "
    "progress, last_polled_at, last_checked_at, outcome, settled_seconds_nano, settled_nano, settled_at, account"
)
_SELECT_TASK = (
    "SELECT t.task_id, t.key_name, t.model, t.mode, t.tier, t.audio, t.duration, t.duration_defaulted, "
    "t.estimate_seconds, t.estimate_nano, t.price_per_second_usd, t.mode_multiplier, t.request_id, "
    "t.submitted_at, t.status, t.progress, t.last_polled_at, t.last_checked_at, t.outcome, "
    "t.settled_seconds_nano, t.settled_nano, t.settled_at, b.body, t.account "
    "FROM tasks t LEFT JOIN task_bodies b ON b.task_id = t.task_id"
)
_SQL_INSERT_KEY = (  # constant fragments only, values are bound parameters
    f"INSERT INTO client_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
    "ON CONFLICT (name) DO NOTHING"
)
_SQL_SELECT_KEYS = f"SELECT {_KEY_COLUMNS} FROM client_keys"  # noqa: S608 - constant column list
_SQL_BUMP_KEYS = "UPDATE counters SET value = value + 1 WHERE name = 'keys_version'"
_SQL_INSERT_TASK = (  # constant fragments only, values are bound parameters
    f"INSERT INTO tasks ({_TASK_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO NOTHING"
)
_SQL_UPSERT_BODY = (
    "INSERT INTO task_bodies (task_id, body) VALUES (?, ?) ON CONFLICT (task_id) DO UPDATE SET body = excluded.body"
)
_SQL_STATUS_POLLED = (
    "UPDATE tasks SET status = ?, progress = COALESCE(?, progress), last_polled_at = ? "
    "WHERE task_id = ? AND settled_at IS NULL"
)
_SQL_STATUS_CHECKED = (
    "UPDATE tasks SET status = ?, progress = COALESCE(?, progress), last_checked_at = ? "
    "WHERE task_id = ? AND settled_at IS NULL"
)
_SQL_SETTLE = (
    "UPDATE tasks SET status = ?, outcome = ?, settled_seconds_nano = ?, settled_nano = ?, settled_at = ? "
    "WHERE task_id = ? AND settled_at IS NULL"
)
_SQL_MARK_UNKNOWN = (
    "UPDATE tasks SET status = 'unknown', outcome = 'unknown', "
    "settled_seconds_nano = estimate_seconds * 1000000000, settled_nano = estimate_nano, settled_at = ? "
    "WHERE task_id = ? AND settled_at IS NULL"
)
_SQL_NEEDING_SETTLEMENT = (
    f"{_SELECT_TASK} WHERE t.settled_at IS NULL "
    "AND COALESCE(t.last_polled_at, t.submitted_at) < ? AND COALESCE(t.last_checked_at, t.submitted_at) < ? "
    "ORDER BY COALESCE(t.last_checked_at, t.submitted_at), t.task_id LIMIT ?"
)
_SQL_UNSETTLED = (
    "SELECT submitted_day, key_name, model, mode, estimate_seconds, estimate_nano FROM tasks "
    "WHERE task_id = ? AND settled_at IS NULL"
)
_PAGE_SQL = MappingProxyType(
    {
        (has_key, has_status, has_cursor): (
            _SELECT_TASK
            + " WHERE 1 = 1"
            + (" AND t.key_name = ?" if has_key else "")
            + (" AND t.status = ?" if has_status else "")
            + (" AND (t.submitted_at, t.task_id) < (?, ?)" if has_cursor else "")
            + " ORDER BY t.submitted_at DESC, t.task_id DESC LIMIT ?"
        )
        for has_key in (False, True)
        for has_status in (False, True)
        for has_cursor in (False, True)
    }
)
_MEASURES = (
    "tasks",
    "requested_seconds",
    "settled_seconds_nano",
    "estimate_nano",
    "settled_nano",
    "cost_nano",
    "completed",
    "failed",
    "unknown",
    "pending",
    "defaulted",
)
_ROLLUP_SUMS = ", ".join(f"COALESCE(SUM({m}), 0)" for m in _MEASURES)
_SQL_ROLLUP_ADD = (  # constant fragments only, values are bound parameters
    f"INSERT INTO usage_daily (day, key_name, model, mode, {', '.join(_MEASURES)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * (4 + len(_MEASURES)))}) "
    "ON CONFLICT (day, key_name, model, mode) DO UPDATE SET "
    + ", ".join(f"{m} = usage_daily.{m} + excluded.{m}" for m in _MEASURES)
)
_USAGE_AGGREGATES = (
    "COUNT(*), "
    "COALESCE(SUM(estimate_seconds), 0), "
    "COALESCE(SUM(settled_seconds_nano), 0), "
    "COALESCE(SUM(estimate_nano), 0), "
    "COALESCE(SUM(settled_nano), 0), "
    "COALESCE(SUM(CASE WHEN settled_at IS NULL THEN estimate_nano ELSE settled_nano END), 0), "
    "COALESCE(SUM(CASE WHEN outcome = 'completed' THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN outcome = 'unknown' THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN settled_at IS NULL THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN duration_defaulted THEN 1 ELSE 0 END), 0)"
)
_SQL_REBUILD_ROLLUP = (  # the rollup recomputed from the ledger rows (repair, bulk loads)
    f"INSERT INTO usage_daily (day, key_name, model, mode, {', '.join(_MEASURES)}) "  # noqa: S608
    f"SELECT submitted_day, key_name, model, mode, {_USAGE_AGGREGATES} FROM tasks "
    "GROUP BY submitted_day, key_name, model, mode"
)
_SQL_INTENT = (
    "INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at, account) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The admission of an account's capacity: the intent is written only while the account has room, in the same
# statement that counts (writes are serialised by the file's write lock, across processes too).
_SQL_INTENT_IF_ROOM = (
    "INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at, account) "
    "SELECT ?, ?, ?, ?, ?, ?, ? WHERE "
    "(SELECT COUNT(*) FROM tasks WHERE account = ? AND settled_at IS NULL) + "
    "(SELECT COUNT(*) FROM intents WHERE account = ? AND submitted_at >= ?) < ?"
)
_SQL_HOLD = "INSERT INTO budget_holds (hold_id, key_name, amount_nano, created_at) VALUES (?, ?, ?, ?)"
_SQL_HELD = "SELECT COALESCE(SUM(amount_nano), 0) FROM budget_holds WHERE key_name = ? AND created_at >= ?"
_ADMITTED: Final = IntentOutcome(Admission.ADMITTED)
_NO_ROOM: Final = IntentOutcome(Admission.NO_ROOM)
_SQL_ACCOUNT_IN_FLIGHT = (
    "SELECT account, SUM(n) FROM ("
    "SELECT account, COUNT(*) AS n FROM tasks WHERE settled_at IS NULL GROUP BY account "
    "UNION ALL SELECT account, COUNT(*) AS n FROM intents WHERE submitted_at >= ? GROUP BY account"
    ") GROUP BY account"
)
_IDEM_PURGE_EVERY_S = 60.0
_READERS = 2
_OPEN_DEADLINE_S: Final = 30.0
"""How long opening keeps retrying while other processes hold the new file busy."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _migrate(conn: sqlite3.Connection) -> tuple[int, ...]:
    """Apply the migrations this database lacks; return the versions applied (empty if up to date)."""

    def apply(conn: sqlite3.Connection) -> tuple[int, ...]:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        done = {int(row[0]) for row in conn.execute("SELECT version FROM schema_migrations")}
        known = max(version for version, _ in MIGRATIONS)
        if done and max(done) > known:
            raise StoreError(f"database schema version {max(done)} is newer than this gateway's ({known})")
        applied: list[int] = []
        for version, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, time.time()))
            applied.append(version)
        return tuple(applied)

    return transaction(conn, apply)


def _placeholder(n: int, kind: str) -> str:
    return "?"


def _aggregate(
    conn: sqlite3.Connection,
    since: float | None,
    until: float | None,
    group_by: tuple[str, ...],
    key_name: str | None = None,
) -> dict[tuple[Any, ...], list[int]]:
    """Usage measures per group for tasks submitted in [since, until), from one read snapshot."""
    queries = usage_queries(
        since,
        until,
        group_by,
        key_name,
        placeholder=_placeholder,
        task_sums=_USAGE_AGGREGATES,
        rollup_sums=_ROLLUP_SUMS,
    )
    totals: dict[tuple[Any, ...], list[int]] = {}
    width = len(group_by)
    conn.execute("BEGIN")
    try:
        for sql, params in queries:
            for row in conn.execute(sql, params):
                add_usage(totals, row, width)
    finally:
        conn.execute("COMMIT")
    return totals


# A month of whole UTC days (what budgets use) is summed from the daily rollup in one statement, holds included.
_SQL_SPENT_WHOLE_DAYS = (
    "SELECT (SELECT COALESCE(SUM(cost_nano), 0) FROM usage_daily WHERE key_name = ? AND day >= ? AND day < ?) "
    "+ (SELECT COALESCE(SUM(amount_nano), 0) FROM budget_holds WHERE key_name = ? AND created_at >= ?)"
)


def _spent_nano(conn: sqlite3.Connection, key_name: str, month: tuple[float, float], holds_since: float) -> int:
    """What a budget check counts, in nano-dollars: the month's settled + outstanding, plus live holds."""
    start, end = month
    if start % 86400 == 0 and end % 86400 == 0:
        days = (int(start // 86400), int(end // 86400))
        return int(conn.execute(_SQL_SPENT_WHOLE_DAYS, (key_name, *days, key_name, holds_since)).fetchone()[0])
    queries = usage_queries(
        start,
        end,
        (),
        key_name,
        placeholder=_placeholder,
        task_sums=_USAGE_AGGREGATES,
        rollup_sums=_ROLLUP_SUMS,
    )
    held = conn.execute(_SQL_HELD, (key_name, holds_since)).fetchone()[0]
    totals: dict[tuple[Any, ...], list[int]] = {}
    for sql, params in queries:
        for row in conn.execute(sql, params):
            add_usage(totals, row, 0)
    return int(held) + totals.get((), [0] * len(_MEASURES))[_MEASURES.index("cost_nano")]


class SQLiteStore:
    """:class:`gateway.store.base.Store` on one SQLite file. Create with ``await SQLiteStore.open(path)``.

    Threads: every write (and the migrations) runs on one dedicated worker thread with its own connection, the
    single writer path, so the event loop never waits on the database and writes never contend inside a process.
    For a file database, reads run on a second small pool of read-only connections (WAL lets readers proceed while
    the writer commits), so a month-long usage report never delays a submission's writes. ``:memory:`` databases
    (tests) do everything on the writer thread, since another connection would see another database.

    Connection setup is the only SQLite-specific part besides the DDL: ``journal_mode=WAL``,
    ``synchronous=NORMAL``, ``busy_timeout=5000``, ``foreign_keys=ON``. In WAL mode with ``synchronous=NORMAL``
    a transaction is in the WAL file (the OS page cache) when COMMIT returns, so it survives the process being
    killed, ``kill -9`` included; only an OS crash or power loss can lose the last commits (``synchronous=FULL``
    would trade throughput for that). Writes run in ``BEGIN IMMEDIATE`` transactions: they take the write lock up
    front, so two processes on one file serialise instead of failing on lock upgrades.

    Group commit: writes are queued and committed together by :class:`gateway.store.sqlite_writer.GroupCommitWriter`
    ("awaited = committed"; each operation still succeeds or fails alone).

    The DML uses only portable SQL (``?`` placeholders, ``INSERT ... ON CONFLICT``, row values, ``CASE``,
    ``COALESCE``, partial indexes), so a PostgreSQL backend can reuse the statements with ``%s`` placeholders.

    Usage: besides the ``tasks`` rows, ``usage_daily`` holds per (UTC day, key, model, mode) totals, updated in
    the same transaction as every task insert and settlement. A usage or budget query reads whole days from it
    and only the partial days at the ends of its window from ``tasks``, so a month over a million tasks answers
    in milliseconds rather than sorting every row (see ``bench/ledger_scale.py``).
    :meth:`SQLiteStore.rebuild_usage_rollup` recomputes it from the rows.

    Migrations are ``(version, statements)`` pairs applied in order at open inside one ``BEGIN IMMEDIATE``
    transaction and recorded in ``schema_migrations``; concurrent starts serialise on the lock, the second finds
    nothing to do. Never edit a released migration; append a new one.
    """

    def __init__(self, path: str, *, max_batch: int = MAX_BATCH) -> None:
        """Prepare (not open) a store on ``path``; use :meth:`open`.

        ``max_batch`` bounds the write operations committed together (1: one transaction per operation).
        """
        self._writer = GroupCommitWriter(path, max_batch=max_batch)
        self._path = path
        self._memory = path == ":memory:"
        self._readers = (
            self._writer.executor
            if self._memory
            else ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="store-reader")
        )
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._last_idem_purge = float("-inf")
        self.applied_migrations: tuple[int, ...] = ()
        """Migration versions this open applied (empty when the schema was already current)."""

    @property
    def commits(self) -> int:
        """Write transactions committed since open (migrations not counted), for tests and benchmarks."""
        return self._writer.commits

    @classmethod
    async def open(cls, path: str, *, max_batch: int = MAX_BATCH) -> SQLiteStore:
        """Open ``path`` (creating its directory and the schema as needed) and apply pending migrations."""
        store = cls(path, max_batch=max_batch)
        try:
            store.applied_migrations = await store._writer.call(store._setup)
        except BaseException:
            await store.close()
            raise
        return store

    def _setup(self) -> tuple[int, ...]:
        # Several processes opening a new file at once can see SQLITE_BUSY without the busy handler running
        # (switching the file to WAL, or upgrading a read to a write while another connection migrates), so
        # the whole open is retried with a fresh connection until a deadline.
        deadline = time.monotonic() + _OPEN_DEADLINE_S
        delay = 0.01
        while True:
            try:
                if not self._memory:
                    os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
                return _migrate(self._writer.conn())
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + delay > deadline:
                    raise StoreError(f"cannot open the SQLite store: {exc}") from exc
                self._writer.drop_conn()
                time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
                delay = min(delay * 2, 0.5)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open the SQLite store: {exc}") from exc

    # -- plumbing -------------------------------------------------------------------------------------------

    def _reader_conn(self) -> sqlite3.Connection:
        if self._memory:
            return self._writer.conn()
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = connect(self._path, readonly=True)
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` as one atomic write, group-committed (see :meth:`GroupCommitWriter.transaction`)."""
        return await self._writer.transaction(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a reader connection (the writer's for ``:memory:``)."""
        if self._writer.closed:
            raise StoreError("store is closed")
        return await run_on(self._readers, lambda: guarded(self._reader_conn, fn))

    async def close(self) -> None:
        """Wait for queued work (queued writes are committed), then close every connection and thread. Idempotent."""
        if self._writer.begin_close():
            await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._readers.shutdown(wait=True)
        self._writer.stop()
        with self._reader_lock:
            readers, self._reader_conns = self._reader_conns, []
        for conn in readers:
            conn.close()
        self._writer.close_conn()

    async def __aenter__(self) -> SQLiteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ping(self) -> bool:
        """True if both the writer and a reader connection answer ``SELECT 1``."""
        try:
            await self._writer.run(lambda conn: conn.execute("SELECT 1").fetchone())
            await self._read(lambda conn: conn.execute("SELECT 1").fetchone())
        except StoreError:
            return False
        return True

    # -- keys -----------------------------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> None:
        """Insert a key; :class:`KeyExists` if the name is taken."""
        row = key_row(record)

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute(_SQL_INSERT_KEY, row).rowcount != 1:
                raise KeyExists(f"a key named {record.name!r} already exists")
            conn.execute(_SQL_BUMP_KEYS)

        await self._tx(op)

    async def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, ordered by name."""
        rows = await self._read(lambda conn: conn.execute(_SQL_SELECT_KEYS + " ORDER BY name").fetchall())
        return [key_record(row) for row in rows]

    async def get_key(self, name: str) -> KeyRecord | None:
        """The key called ``name``, or None."""
        row = await self._read(lambda conn: conn.execute(_SQL_SELECT_KEYS + " WHERE name = ?", (name,)).fetchone())
        return None if row is None else key_record(row)

    async def find_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose current or previous hash is ``key_hash`` (whether or not it still accepts it)."""
        sql = _SQL_SELECT_KEYS + " WHERE key_hash = ? OR previous_hash = ?"
        rows = await self._read(lambda conn: conn.execute(sql, (key_hash, key_hash)).fetchall())
        for row in rows:  # the current hash wins over someone's rotated-out one (never happens in practice)
            if hmac.compare_digest(row[1], key_hash):
                return key_record(row)
        return key_record(rows[0]) if rows else None

    async def revoke_key(self, name: str, at: float) -> bool:
        """Revoke ``name``; False if it does not exist or was already revoked."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE client_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (at, name)
            )
            if cur.rowcount != 1:
                return False
            conn.execute(_SQL_BUMP_KEYS)
            return True

        return await self._tx(op)

    async def rotate_key(self, name: str, new_hash: str, new_prefix: str, grace_until: float) -> KeyRecord:
        """Give ``name`` a new hash; the old one stays valid until ``grace_until``."""

        def op(conn: sqlite3.Connection) -> KeyRecord:
            row = conn.execute(_SQL_SELECT_KEYS + " WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key named {name!r}")
            if row[7] is not None:
                raise KeyRevoked(f"key {name!r} is revoked")
            conn.execute(
                "UPDATE client_keys SET previous_hash = key_hash, previous_valid_until = ?, key_hash = ?, "
                "prefix = ? WHERE name = ?",
                (grace_until, new_hash, new_prefix, name),
            )
            conn.execute(_SQL_BUMP_KEYS)
            return key_record(conn.execute(_SQL_SELECT_KEYS + " WHERE name = ?", (name,)).fetchone())

        return await self._tx(op)

    async def keys_version(self) -> int:
        """Counter bumped by every key change, in the same transaction."""
        row = await self._read(
            lambda conn: conn.execute("SELECT value FROM counters WHERE name = 'keys_version'").fetchone()
        )
        return int(row[0])

    # -- intents --------------------------------------------------------------------------------------------

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
        """Write the intent to submit, before forwarding: with ``hold``, only within the key's budget (the hold
        written beside it); with a limit, only while ``account`` has room. One write: the file's write lock makes
        every process on it take its turn."""
        params = (intent_id, key_name, request_id, model, mode, submitted_at, account)
        guarded = (*params, account, account, hold_since, max_in_flight)
        if hold is None:
            if max_in_flight <= 0:
                await self._tx(lambda conn: conn.execute(_SQL_INTENT, params))
                return _ADMITTED
            admitted = await self._tx(lambda conn: conn.execute(_SQL_INTENT_IF_ROOM, guarded).rowcount == 1)
            return _ADMITTED if admitted else _NO_ROOM
        amount_nano, budget_nano, since = to_fixed(hold.amount), to_fixed(hold.budget), hold.now - hold.ttl_s

        def op(conn: sqlite3.Connection) -> tuple[Admission, int]:
            spent = _spent_nano(conn, key_name, hold.month, since)
            if spent + amount_nano > budget_nano:
                return Admission.OVER_BUDGET, spent
            if max_in_flight <= 0:
                conn.execute(_SQL_INTENT, params)
            elif conn.execute(_SQL_INTENT_IF_ROOM, guarded).rowcount != 1:
                return Admission.NO_ROOM, spent
            conn.execute("DELETE FROM budget_holds WHERE key_name = ? AND created_at < ?", (key_name, since))
            conn.execute(_SQL_HOLD, (hold.hold_id, key_name, amount_nano, hold.now))
            return Admission.ADMITTED, spent

        admission, spent = await self._tx(op)
        return IntentOutcome(admission, from_fixed(spent))

    async def account_in_flight(self, hold_since: float) -> dict[str, int]:
        """Per account: unsettled tasks plus intents submitted since ``hold_since``."""
        rows = await self._read(lambda conn: conn.execute(_SQL_ACCOUNT_IN_FLIGHT, (hold_since,)).fetchall())
        return {str(account): int(count) for account, count in rows if count}

    async def account_marks(self) -> list[AccountMark]:
        """Every account's shared set-aside marks."""
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT account, set_aside_until, unauthorized_key FROM account_marks ORDER BY account"
            ).fetchall()
        )
        return [AccountMark(str(row[0]), float(row[1]), row[2]) for row in rows]

    async def mark_account_aside(self, account: str, until: float, at: float) -> None:
        """Set ``account`` aside until ``until`` for every process."""
        await self._tx(lambda conn: conn.execute(_SQL_MARK_ASIDE, (account, until, at)))

    async def mark_account_unauthorized(self, account: str, key_fingerprint: str, at: float) -> None:
        """Record the fingerprint of ``account``'s rejected key for every process."""
        await self._tx(lambda conn: conn.execute(_SQL_MARK_UNAUTHORIZED, (account, key_fingerprint, at)))

    async def end_account_aside(self, account: str, until: float) -> None:
        """End ``account``'s set-aside if it is not later than ``until``."""
        await self._tx(lambda conn: conn.execute(_SQL_END_ASIDE, (account, until)))

    async def resolve_intent(self, intent_id: str, task: TaskRecord, release_hold: str | None = None) -> bool:
        """Insert ``task``, delete the intent and release the budget hold in one transaction; False if the task
        row already existed."""
        row = task_row(task)

        def op(conn: sqlite3.Connection) -> bool:
            inserted = conn.execute(_SQL_INSERT_TASK, row).rowcount == 1
            if inserted:
                conn.execute(_SQL_ROLLUP_ADD, insert_delta(task))
                if task.terminal_body is not None:
                    conn.execute(_SQL_UPSERT_BODY, (task.task_id, task.terminal_body))
                # A task id already in the ledger is not this submission's: its intent stays, as outcome unknown.
                conn.execute("DELETE FROM intents WHERE intent_id = ?", (intent_id,))
            if release_hold is not None:
                conn.execute("DELETE FROM budget_holds WHERE hold_id = ?", (release_hold,))
            return inserted

        return await self._tx(op)

    async def release_hold(self, hold_id: str) -> None:
        await self._tx(lambda conn: conn.execute("DELETE FROM budget_holds WHERE hold_id = ?", (hold_id,)))

    async def budget_spent(
        self, key_name: str, month: tuple[float, float], now: float, ttl_s: float = BUDGET_HOLD_TTL_S
    ) -> Decimal:
        """Settled + outstanding + live holds of ``key_name`` (one read snapshot)."""

        def read(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN")
            try:
                return _spent_nano(conn, key_name, month, now - ttl_s)
            finally:
                conn.execute("COMMIT")

        return from_fixed(await self._read(read))

    async def drop_intent(self, intent_id: str) -> bool:
        """Delete an intent whose submission the upstream refused; False if there was none."""
        return await self._tx(
            lambda conn: conn.execute("DELETE FROM intents WHERE intent_id = ?", (intent_id,)).rowcount == 1
        )

    async def list_intents(self) -> list[IntentRecord]:
        """Submissions whose outcome is unknown, oldest first."""
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT intent_id, key_name, request_id, model, mode, submitted_at, account FROM intents "
                "ORDER BY submitted_at, intent_id"
            ).fetchall()
        )
        return [IntentRecord(*row) for row in rows]

    # -- tasks ----------------------------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """The ledger row for ``task_id``, or None."""
        sql = _SELECT_TASK + " WHERE t.task_id = ?"
        row = await self._read(lambda conn: conn.execute(sql, (task_id,)).fetchone())
        return None if row is None else task_record(row)

    async def update_status(self, task_id: str, status: str, progress: int | None, at: float, polled: bool) -> bool:
        """Record a status seen at ``at``; settled or unknown tasks are left alone (False)."""
        if status not in TASK_STATUSES:
            raise ValueError(f"unknown task status {status!r}")
        sql = _SQL_STATUS_POLLED if polled else _SQL_STATUS_CHECKED
        params = (status, progress, at, task_id)
        return await self._tx(lambda conn: conn.execute(sql, params).rowcount == 1)

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
        """Settle ``task_id`` once, with its webhook in the same transaction; ``first`` only for the first."""
        if outcome not in TERMINAL:
            raise ValueError(f"settlement outcome must be completed or failed, not {outcome!r}")
        seconds_nano, usd_nano = to_fixed(seconds), to_fixed(usd)
        params = (outcome, outcome, seconds_nano, usd_nano, at, task_id)
        hook = None if webhook is None else _outbox_add_params(webhook)

        def op(conn: sqlite3.Connection) -> Settlement:
            unsettled = conn.execute(_SQL_UNSETTLED, (task_id,)).fetchone()
            if unsettled is None or conn.execute(_SQL_SETTLE, params).rowcount != 1:
                return _NOT_FIRST
            conn.execute(_SQL_ROLLUP_ADD, settle_delta(unsettled, outcome, seconds_nano, usd_nano))
            if terminal_body is not None:
                conn.execute(_SQL_UPSERT_BODY, (task_id, terminal_body))
            queued = hook is not None and conn.execute(_SQL_OUTBOX_ADD, hook).rowcount == 1
            return Settlement(first=True, webhook_queued=queued)

        return await self._tx(op)

    async def mark_unknown(self, task_id: str, at: float) -> bool:
        """Settle ``task_id`` as ``unknown`` at its estimate; True only if this call settled it."""

        def op(conn: sqlite3.Connection) -> bool:
            unsettled = conn.execute(_SQL_UNSETTLED, (task_id,)).fetchone()
            if unsettled is None or conn.execute(_SQL_MARK_UNKNOWN, (at, task_id)).rowcount != 1:
                return False
            estimate_s, estimate_nano = unsettled[4], unsettled[5]
            delta = settle_delta(unsettled, "unknown", estimate_s * 10**FIXED_DIGITS, estimate_nano)
            conn.execute(_SQL_ROLLUP_ADD, delta)
            return True

        return await self._tx(op)

    async def tasks_for_key(
        self, key_name: str | None, limit: int = 50, before: str | None = None, *, status: str | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        """A page of tasks, newest first, and the cursor for the next page (None on the last page)."""
        params = page_params(key_name, status, limit, before)
        sql = _PAGE_SQL[(key_name is not None, status is not None, before is not None)]
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        tasks = [task_record(row) for row in rows[:limit]]
        cursor = None
        if len(rows) > limit:
            cursor = encode_cursor(tasks[-1].submitted_at, tasks[-1].task_id)
        return tasks, cursor

    async def tasks_needing_settlement(self, idle_since: float, limit: int = 100) -> list[TaskRecord]:
        """Unsettled tasks neither polled nor checked since ``idle_since``, least recently checked first."""
        params = (idle_since, idle_since, limit)
        rows = await self._read(lambda conn: conn.execute(_SQL_NEEDING_SETTLEMENT, params).fetchall())
        return [task_record(row) for row in rows]

    async def outstanding_and_settled_usd(self, key_name: str, month_start: float, month_end: float) -> Decimal:
        """Settled amounts plus outstanding estimates of ``key_name``'s tasks submitted in [start, end)."""
        totals = await self._read(lambda conn: _aggregate(conn, month_start, month_end, (), key_name))
        cost = totals.get((), [0] * len(_MEASURES))[_MEASURES.index("cost_nano")]
        return from_fixed(cost)

    async def usage(
        self, since: float | None = None, until: float | None = None, group_by: tuple[str, ...] = ()
    ) -> list[UsageRow]:
        """Totals of tasks submitted in [since, until), one row per group that has tasks, in group order."""
        check_group_by(group_by)
        totals = await self._read(lambda conn: _aggregate(conn, since, until, group_by))
        return usage_rows(group_by, totals)

    async def rebuild_usage_rollup(self) -> None:
        """Recompute the per-day usage rollup from the ledger rows (after a bulk load, or as a repair)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM usage_daily")
            conn.execute(_SQL_REBUILD_ROLLUP)

        # A maintenance scan of every task row, seconds on a big ledger: its own transaction, so it never holds
        # back the COMMIT of submissions that happened to be batched with it.
        await self._writer.transaction_alone(op)

    # -- idempotency ----------------------------------------------------------------------------------------

    async def idempotency_begin(
        self,
        key_name: str,
        idem_key: str,
        body_hash: str,
        now: float,
        ttl_s: float = IDEMPOTENCY_TTL_S,
        in_flight_ttl_s: float = IDEMPOTENCY_IN_FLIGHT_TTL_S,
    ) -> IdemState:
        """Claim ``idem_key`` for ``key_name`` (see :meth:`gateway.store.base.Store.idempotency_begin`)."""
        ident = (key_name, idem_key)

        def op(conn: sqlite3.Connection) -> IdemState:
            if now - self._last_idem_purge >= _IDEM_PURGE_EVERY_S:  # only ever touched on the writer thread
                conn.execute("DELETE FROM idempotency WHERE created_at <= ?", (now - ttl_s,))
                self._last_idem_purge = now
            conn.execute(
                "DELETE FROM idempotency WHERE key_name = ? AND idem_key = ? AND created_at <= ?",
                (*ident, now - ttl_s),
            )
            inserted = conn.execute(
                "INSERT INTO idempotency (key_name, idem_key, body_hash, state, created_at) "
                "VALUES (?, ?, ?, 'in_flight', ?) ON CONFLICT (key_name, idem_key) DO NOTHING",
                (*ident, body_hash, now),
            )
            if inserted.rowcount == 1:
                return IdemState(IdemKind.NEW)
            row = conn.execute(
                "SELECT body_hash, state, created_at, status, headers, body FROM idempotency "
                "WHERE key_name = ? AND idem_key = ?",
                ident,
            ).fetchone()
            if row is None:  # removed between the two statements (possible on PostgreSQL only)
                return IdemState(IdemKind.IN_FLIGHT)
            stored_hash, state, created_at, status, headers, body = row
            if not hmac.compare_digest(stored_hash, body_hash):
                return IdemState(IdemKind.CONFLICT)
            if state == "in_flight":
                if created_at <= now - in_flight_ttl_s:
                    taken = conn.execute(
                        "UPDATE idempotency SET created_at = ? WHERE key_name = ? AND idem_key = ? "
                        "AND state = 'in_flight' AND created_at = ?",
                        (now, *ident, created_at),
                    )
                    if taken.rowcount == 1:
                        return IdemState(IdemKind.NEW)
                return IdemState(IdemKind.IN_FLIGHT)
            pairs = tuple((str(name), str(value)) for name, value in json.loads(headers or "[]"))
            return IdemState(IdemKind.REPLAY, status=status, headers=pairs, body=bytes(body or b""))

        return await self._tx(op)

    async def idempotency_finish(
        self, key_name: str, idem_key: str, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Store the response to replay for ``idem_key``."""
        params = (status, json.dumps([list(pair) for pair in headers]), body, key_name, idem_key)
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ? "
                "WHERE key_name = ? AND idem_key = ?",
                params,
            )
        )

    async def idempotency_abandon(self, key_name: str, idem_key: str) -> None:
        """Delete an in-flight record so a retry can proceed."""
        await self._tx(
            lambda conn: conn.execute(
                "DELETE FROM idempotency WHERE key_name = ? AND idem_key = ? AND state = 'in_flight'",
                (key_name, idem_key),
            )
        )

    # -- webhook outbox ---------------------------------------------------------------------------------------

    async def outbox_add(self, record: OutboxRecord, max_pending_per_key: int, max_pending_per_host: int) -> bool:
        """Insert a delivery unless its key or host is at its pending cap (see :class:`gateway.store.base.Store`)."""
        params = _outbox_add_params(OutboxEntry(record, max_pending_per_key, max_pending_per_host))
        return await self._tx(lambda conn: conn.execute(_SQL_OUTBOX_ADD, params).rowcount == 1)

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
        """Lease due deliveries to ``owner`` (one ``BEGIN IMMEDIATE`` transaction: processes serialise)."""
        params = (
            owner,
            lease_until,
            now,
            now,
            json.dumps(list(busy_hosts)),
            json.dumps(list(busy_keys)),
            per_host,
            per_key,
            limit,
        )
        rows = await self._tx(lambda conn: conn.execute(_SQL_OUTBOX_CLAIM, params).fetchall())
        return sorted((outbox_record(row) for row in rows), key=lambda r: (r.next_attempt_at, r.delivery_id))

    async def outbox_release(self, delivery_id: str, owner: str) -> bool:
        """Give back a leased delivery without an attempt."""
        sql = "UPDATE webhook_outbox SET lease_owner = NULL, lease_until = 0 WHERE delivery_id = ? AND lease_owner = ?"
        return await self._tx(lambda conn: conn.execute(sql, (delivery_id, owner)).rowcount == 1)

    async def outbox_retry(self, delivery_id: str, owner: str, next_attempt_at: float, error: str) -> bool:
        """Count a failed attempt and schedule the next one."""
        params = (next_attempt_at, error, delivery_id, owner)
        return await self._tx(lambda conn: conn.execute(_SQL_OUTBOX_RETRY, params).rowcount == 1)

    async def outbox_failed(self, delivery_id: str, owner: str, error: str) -> bool:
        """Count the final failed attempt and keep the row as ``failed``."""
        params = (error, delivery_id, owner)
        return await self._tx(lambda conn: conn.execute(_SQL_OUTBOX_FAILED, params).rowcount == 1)

    async def outbox_delivered(self, delivery_id: str, owner: str) -> bool:
        """Delete a delivered row."""
        sql = "DELETE FROM webhook_outbox WHERE delivery_id = ? AND lease_owner = ? AND state = 'pending'"
        return await self._tx(lambda conn: conn.execute(sql, (delivery_id, owner)).rowcount == 1)

    async def outbox_list(self, state: str, limit: int = 1000) -> list[OutboxRecord]:
        """Rows in ``state``, oldest first."""
        sql = f"SELECT {OUTBOX_COLUMNS} FROM webhook_outbox WHERE state = ? ORDER BY created_at, delivery_id LIMIT ?"  # noqa: S608
        rows = await self._read(lambda conn: conn.execute(sql, (state, limit)).fetchall())
        return [outbox_record(row) for row in rows]

    async def update_key_limits(self, record: KeyRecord) -> KeyRecord:
        """Set the key's models, rpm, monthly budget and webhook URL; KeyNotFound / KeyRevoked otherwise."""
        row = key_row(record)

        def op(conn: sqlite3.Connection) -> KeyRecord:
            current = conn.execute(_SQL_SELECT_KEYS + " WHERE name = ?", (record.name,)).fetchone()
            if current is None:
                raise KeyNotFound(f"no key named {record.name!r}")
            if current[7] is not None:
                raise KeyRevoked(f"key {record.name!r} is revoked")
            conn.execute(
                "UPDATE client_keys SET models = ?, rpm = ?, monthly_budget_usd = ?, webhook_url = ? WHERE name = ?",
                (row[3], row[4], row[5], row[10], record.name),
            )
            conn.execute(_SQL_BUMP_KEYS)
            return key_record(conn.execute(_SQL_SELECT_KEYS + " WHERE name = ?", (record.name,)).fetchone())

        return await self._tx(op)

    # -- archive --------------------------------------------------------------------------------------------

    async def archive_candidates(self, completed_since: float, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Completed tasks never claimed, or whose claim ran out by ``now``."""
        params = (completed_since, now, limit)
        rows = await self._read(lambda conn: conn.execute(arch.SQL_CANDIDATES, params).fetchall())
        return [(str(row[0]), float(row[1])) for row in rows]

    async def archive_claim(self, task_id: str, now: float, until: float) -> bool:
        """Claim copying ``task_id`` until ``until``; True only for one process while the claim holds."""
        params = (task_id, until, now)
        return await self._tx(lambda conn: conn.execute(arch.SQL_CLAIM, params).rowcount == 1)

    async def archive_stored(self, task_id: str, key: str, size: int, sha256: str, at: float) -> None:
        """Record the verified copy."""
        params = (key, size, sha256, at, task_id)
        await self._tx(lambda conn: conn.execute(arch.SQL_STORED, params))

    async def archive_retry(self, task_id: str, retry_at: float | None, error: str) -> None:
        """Count a failed attempt: claimable again after ``retry_at``, or given up when None."""
        params = ("failed" if retry_at is None else "claimed", retry_at, error[:500], task_id)
        await self._tx(lambda conn: conn.execute(arch.SQL_RETRY, params))

    async def get_archive(self, task_id: str) -> ArchiveRecord | None:
        """The archive row of ``task_id``, or None."""
        row = await self._read(lambda conn: conn.execute(arch.SQL_GET, (task_id,)).fetchone())
        return None if row is None else arch.archive_record(row)

    async def archives_stored_before(self, before: float, limit: int = 100) -> list[ArchiveRecord]:
        """Stored copies archived before ``before``, oldest first."""
        rows = await self._read(lambda conn: conn.execute(arch.SQL_STORED_BEFORE, (before, limit)).fetchall())
        return [arch.archive_record(row) for row in rows]

    async def archive_removed(self, task_id: str) -> None:
        """Mark a stored copy as deleted."""
        await self._tx(lambda conn: conn.execute(arch.SQL_REMOVED, (task_id,)))

    async def archive_summary(self) -> dict[str, tuple[int, int]]:
        """``{state: (tasks, bytes)}`` plus ``unarchived`` completed tasks."""

        def read(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            rows = conn.execute(arch.SQL_SUMMARY).fetchall()
            return arch.summary(rows, int(conn.execute(arch.SQL_UNARCHIVED).fetchone()[0]))

        return await self._read(read)

    async def archive_records(self, after: str = "", limit: int = 1000) -> list[ArchiveRecord]:
        """A page of archive rows ordered by task id."""
        rows = await self._read(lambda conn: conn.execute(arch.SQL_PAGE, (after, limit)).fetchall())
        return [arch.archive_record(row) for row in rows]

    async def restore_archive(self, record: ArchiveRecord) -> None:
        """Insert an archive row as it is; an existing row is left alone."""
        await self._tx(lambda conn: conn.execute(arch.SQL_RESTORE, arch.record_row(record)))

    async def archive_retry_failed(self) -> int:
        """Make every given-up copy claimable again; how many."""
        return await self._tx(lambda conn: conn.execute(arch.SQL_RETRY_FAILED).rowcount)

    # -- audit trail --------------------------------------------------------------------------------------------

    async def audit_add(self, record: AuditRecord) -> None:
        """Append one admin action."""
        row = audit_row(record)
        await self._tx(lambda conn: conn.execute(_SQL_AUDIT_ADD, row))

    async def audit_list(
        self, since: float | None, limit: int = 50, before: str | None = None
    ) -> tuple[list[AuditRecord], str | None]:
        """A page of admin actions at or after ``since``, newest first, and the next page's cursor."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        params: list[Any] = [] if since is None else [since]
        if before is not None:
            params.extend(decode_cursor(before))
        params.append(limit + 1)
        sql = _AUDIT_PAGE_SQL[(since is not None, before is not None)]
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        records = [audit_record(row) for row in rows[:limit]]
        cursor = encode_cursor(records[-1].at, records[-1].audit_id) if len(rows) > limit else None
        return records, cursor

    # -- admin UI sessions --------------------------------------------------------------------------------------

    async def revoke_ui_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Record that admin UI session ``session_id`` signed out; revocations that expired by ``now`` go."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_SQL_UI_SESSIONS_PURGE, (now,))
            conn.execute(_SQL_UI_SESSION_REVOKE, (session_id, expires_at))

        await self._tx(op)

    async def ui_session_revoked(self, session_id: str) -> bool:
        """True when admin UI session ``session_id`` has signed out (its cookie no longer opens a page)."""
        row = await self._read(lambda conn: conn.execute(_SQL_UI_SESSION_REVOKED, (session_id,)).fetchone())
        return row is not None


_SQL_UI_SESSIONS_PURGE = "DELETE FROM ui_session_revocations WHERE expires_at <= ?"
_SQL_UI_SESSION_REVOKE = (
    "INSERT INTO ui_session_revocations (session_id, expires_at) VALUES (?, ?) ON CONFLICT (session_id) DO NOTHING"
)
_SQL_UI_SESSION_REVOKED = "SELECT 1 FROM ui_session_revocations WHERE session_id = ?"
_SQL_MARK_ASIDE = (
    "INSERT INTO account_marks (account, set_aside_until, unauthorized_key, updated_at) VALUES (?, ?, NULL, ?) "
    "ON CONFLICT (account) DO UPDATE SET set_aside_until = excluded.set_aside_until, updated_at = excluded.updated_at"
)
_SQL_MARK_UNAUTHORIZED = (
    "INSERT INTO account_marks (account, set_aside_until, unauthorized_key, updated_at) VALUES (?, 0, ?, ?) "
    "ON CONFLICT (account) DO UPDATE SET unauthorized_key = excluded.unauthorized_key, "
    "updated_at = excluded.updated_at"
)
_SQL_END_ASIDE = "UPDATE account_marks SET set_aside_until = 0 WHERE account = ? AND set_aside_until <= ?"
_SQL_AUDIT_ADD = f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
_AUDIT_PAGE_SQL = MappingProxyType(
    {
        (has_since, has_cursor): audit_page_sql(has_since=has_since, has_cursor=has_cursor, placeholder=lambda _: "?")
        for has_since in (False, True)
        for has_cursor in (False, True)
    }
)
_SQL_OUTBOX_ADD = (  # constant fragments only, values are bound parameters
    f"INSERT INTO webhook_outbox ({OUTBOX_COLUMNS}, lease_until) "  # noqa: S608
    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0 "
    "WHERE (SELECT COUNT(*) FROM webhook_outbox WHERE key_name = ? AND state = 'pending') < ? "
    "AND (SELECT COUNT(*) FROM webhook_outbox WHERE host = ? AND state = 'pending') < ? "
    "ON CONFLICT (delivery_id) DO NOTHING"
)
_NOT_FIRST: Final = Settlement(first=False)


def _outbox_add_params(entry: OutboxEntry) -> tuple[Any, ...]:
    record = entry.record
    return (*outbox_row(record), record.key_name, entry.max_pending_per_key, record.host, entry.max_pending_per_host)


_SQL_OUTBOX_CLAIM = (  # constant fragments only, values are bound parameters
    "UPDATE webhook_outbox SET lease_owner = ?, lease_until = ? WHERE delivery_id IN ("  # noqa: S608
    " SELECT delivery_id FROM ("
    "  SELECT delivery_id, next_attempt_at,"
    "   ROW_NUMBER() OVER (PARTITION BY host ORDER BY next_attempt_at, delivery_id) AS by_host,"
    "   ROW_NUMBER() OVER (PARTITION BY key_name ORDER BY next_attempt_at, delivery_id) AS by_key"
    "  FROM webhook_outbox WHERE state = 'pending' AND next_attempt_at <= ? AND lease_until <= ?"
    "  AND host NOT IN (SELECT value FROM json_each(?)) AND key_name NOT IN (SELECT value FROM json_each(?))"
    " ) WHERE by_host <= ? AND by_key <= ? ORDER BY next_attempt_at, delivery_id LIMIT ?"
    f") RETURNING {OUTBOX_COLUMNS}"
)
_SQL_OUTBOX_RETRY = (
    "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, lease_owner = NULL, "
    "lease_until = 0 WHERE delivery_id = ? AND lease_owner = ? AND state = 'pending'"
)
_SQL_OUTBOX_FAILED = (
    "UPDATE webhook_outbox SET attempts = attempts + 1, state = 'failed', last_error = ?, lease_owner = NULL, "
    "lease_until = 0 WHERE delivery_id = ? AND lease_owner = ? AND state = 'pending'"
)
