"""PostgreSQL backend of the store (``postgresql://user:pw@host/db``): one database shared by many gateways.

Connections, the cross-process guarantees, schema and migrations are described on :class:`PostgresStore`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from gateway.catalog import DEFAULT_ACCOUNT, TASK_STATUSES, TERMINAL
from gateway.keys import KeyRecord
from gateway.store import archive_rows as arch
from gateway.store.archive_rows import archive_schema, numbered
from gateway.store.base import (
    BUDGET_HOLD_TTL_S,
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
    UsageQuery,
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
    task_record,
    task_row,
    usage_queries,
    usage_rows,
)

# Shared with the SQLite backend on purpose: one definition of how records map to rows, of what a task adds to the
# rollup, of page cursors and page bounds, so the two backends cannot drift apart.
from gateway.url_secrets import scrub, url_secrets

T = TypeVar("T")

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE client_keys (
                name TEXT COLLATE "C" PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                prefix TEXT NOT NULL,
                models TEXT NOT NULL,
                rpm INTEGER,
                monthly_budget_usd TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION,
                previous_hash TEXT,
                previous_valid_until DOUBLE PRECISION,
                webhook_url TEXT
            )""",
            "CREATE INDEX client_keys_previous_hash ON client_keys (previous_hash)",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
            "INSERT INTO counters (name, value) VALUES ('keys_version', 0)",
            """CREATE TABLE intents (
                intent_id TEXT COLLATE "C" PRIMARY KEY,
                key_name TEXT NOT NULL,
                request_id TEXT NOT NULL,
                model TEXT NOT NULL,
                mode TEXT NOT NULL,
                submitted_at DOUBLE PRECISION NOT NULL
            )""",
            # Money and settled seconds are integers in units of 1e-9 (exact, fast SUM); see gateway.store.base.
            """CREATE TABLE tasks (
                task_id TEXT COLLATE "C" PRIMARY KEY,
                key_name TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                mode TEXT COLLATE "C" NOT NULL,
                tier TEXT NOT NULL,
                audio BOOLEAN NOT NULL,
                duration INTEGER,
                duration_defaulted BOOLEAN NOT NULL,
                estimate_seconds BIGINT NOT NULL,
                estimate_nano BIGINT NOT NULL,
                price_per_second_usd TEXT NOT NULL,
                mode_multiplier TEXT NOT NULL,
                request_id TEXT NOT NULL,
                submitted_at DOUBLE PRECISION NOT NULL,
                submitted_day INTEGER NOT NULL,
                status TEXT NOT NULL,
                progress INTEGER,
                last_polled_at DOUBLE PRECISION,
                last_checked_at DOUBLE PRECISION,
                outcome TEXT,
                settled_seconds_nano BIGINT,
                settled_nano BIGINT,
                settled_at DOUBLE PRECISION
            )""",
            # Bodies apart, so the tasks table stays narrow and usage scans stay fast.
            """CREATE TABLE task_bodies (
                task_id TEXT COLLATE "C" PRIMARY KEY REFERENCES tasks (task_id) ON DELETE CASCADE,
                body BYTEA NOT NULL
            )""",
            "CREATE INDEX tasks_key_time ON tasks (key_name, submitted_at, task_id)",
            "CREATE INDEX tasks_time ON tasks (submitted_at, task_id)",
            # The settler's queue: unsettled tasks, least recently checked first.
            "CREATE INDEX tasks_unsettled ON tasks ((COALESCE(last_checked_at, submitted_at)), task_id) "
            "WHERE settled_at IS NULL",
            """CREATE TABLE idempotency (
                key_name TEXT NOT NULL,
                idem_key TEXT NOT NULL,
                body_hash TEXT NOT NULL,
                state TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                status INTEGER,
                headers TEXT,
                body BYTEA,
                PRIMARY KEY (key_name, idem_key)
            )""",
            "CREATE INDEX idempotency_created ON idempotency (created_at)",
            # Per-day totals kept in step with tasks (same transactions): see the module docstring.
            """CREATE TABLE usage_daily (
                day INTEGER NOT NULL,
                key_name TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                mode TEXT COLLATE "C" NOT NULL,
                tasks BIGINT NOT NULL,
                requested_seconds BIGINT NOT NULL,
                settled_seconds_nano BIGINT NOT NULL,
                estimate_nano BIGINT NOT NULL,
                settled_nano BIGINT NOT NULL,
                cost_nano BIGINT NOT NULL,
                completed BIGINT NOT NULL,
                failed BIGINT NOT NULL,
                unknown BIGINT NOT NULL,
                pending BIGINT NOT NULL,
                defaulted BIGINT NOT NULL,
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
                delivery_id TEXT COLLATE "C" PRIMARY KEY,
                key_name TEXT NOT NULL,
                host TEXT NOT NULL,
                url TEXT NOT NULL,
                body BYTEA NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                next_attempt_at DOUBLE PRECISION NOT NULL,
                lease_owner TEXT,
                lease_until DOUBLE PRECISION NOT NULL,
                last_error TEXT
            )""",
            "CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at)",
            "CREATE INDEX webhook_outbox_key ON webhook_outbox (key_name, state)",
            "CREATE INDEX webhook_outbox_host ON webhook_outbox (host, state)",
        ),
    ),
    (3, archive_schema("DOUBLE PRECISION", "BIGINT", 'TEXT COLLATE "C"')),
    (
        4,
        (
            # Upstream accounts (SPEC section 9): tasks and intents recorded before them belong to 'default'.
            "ALTER TABLE intents ADD COLUMN account TEXT COLLATE \"C\" NOT NULL DEFAULT 'default'",
            "ALTER TABLE tasks ADD COLUMN account TEXT COLLATE \"C\" NOT NULL DEFAULT 'default'",
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
                hold_id TEXT COLLATE "C" PRIMARY KEY,
                key_name TEXT NOT NULL,
                amount_nano BIGINT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX budget_holds_key ON budget_holds (key_name, created_at)",
        ),
    ),
    (
        6,
        (
            # The audit trail of admin actions: gateway.audit.
            """CREATE TABLE audit_log (
                audit_id TEXT COLLATE "C" PRIMARY KEY,
                at DOUBLE PRECISION NOT NULL,
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
            # Signed-out UI sessions, until their cookies would have expired anyway (Store.revoke_ui_session).
            """CREATE TABLE ui_session_revocations (
                session_id TEXT COLLATE "C" PRIMARY KEY,
                expires_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX ui_session_revocations_expiry ON ui_session_revocations (expires_at)",
        ),
    ),
    (
        8,
        (
            # Upstream accounts set aside, shared by every process when there is no Redis: gateway.accounts.board.
            """CREATE TABLE account_marks (
                account TEXT COLLATE "C" PRIMARY KEY,
                set_aside_until DOUBLE PRECISION NOT NULL,
                unauthorized_key TEXT,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
)
"""The schema, as (version, statements) in order; append, never edit."""

POOL_MIN: Final = 1
POOL_MAX: Final = 10
POOL_SIZE_LIMIT: Final = 100
_CONNECT_TIMEOUT_S: Final = 10.0
_COMMAND_TIMEOUT_S: Final = 30.0
"""A statement running longer than this fails (StoreError) rather than holding a request forever."""
_PING_TIMEOUT_S: Final = 5.0
_CLOSE_TIMEOUT_S: Final = 10.0
_IDEM_PURGE_EVERY_S: Final = 60.0
_MIGRATION_LOCK: Final = 0x6B6C6E67
"""First key of the migration advisory lock (``klng``); the second is derived from the schema name."""
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
"""What asyncpg and the network raise; all become StoreError (``TimeoutError`` is an ``OSError``)."""

_KEY_COLUMNS = (
    "name, key_hash, prefix, models, rpm, monthly_budget_usd, created_at, revoked_at, "
    "previous_hash, previous_valid_until, webhook_url"
)
_TASK_COLUMNS = (
    "task_id, key_name, model, mode, tier, audio, duration, duration_defaulted, estimate_seconds, "
    "estimate_nano, price_per_second_usd, mode_multiplier, request_id, submitted_at, submitted_day, status, "
    "progress, last_polled_at, last_checked_at, outcome, settled_seconds_nano, settled_nano, settled_at, account"
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


def _placeholders(count: int, start: int = 1) -> str:
    """``$1, $2, ...``: numbered bind parameters."""
    return ", ".join(f"${n}" for n in range(start, start + count))


_SELECT_TASK = (
    "SELECT t.task_id, t.key_name, t.model, t.mode, t.tier, t.audio, t.duration, t.duration_defaulted, "
    "t.estimate_seconds, t.estimate_nano, t.price_per_second_usd, t.mode_multiplier, t.request_id, "
    "t.submitted_at, t.status, t.progress, t.last_polled_at, t.last_checked_at, t.outcome, "
    "t.settled_seconds_nano, t.settled_nano, t.settled_at, b.body, t.account "
    "FROM tasks t LEFT JOIN task_bodies b ON b.task_id = t.task_id"
)
_SQL_SELECT_KEYS = f"SELECT {_KEY_COLUMNS} FROM client_keys"  # noqa: S608 - constant column list
_SQL_INSERT_KEY = (  # constant fragments only, values are bound parameters
    f"INSERT INTO client_keys ({_KEY_COLUMNS}) VALUES ({_placeholders(11)}) "  # noqa: S608
    "ON CONFLICT (name) DO NOTHING"
)
_SQL_BUMP_KEYS = "UPDATE counters SET value = value + 1 WHERE name = 'keys_version'"
_ROLLUP_INSERT = f"INSERT INTO usage_daily (day, key_name, model, mode, {', '.join(_MEASURES)}) "
_ROLLUP_UPSERT = "ON CONFLICT (day, key_name, model, mode) DO UPDATE SET " + ", ".join(
    f"{m} = usage_daily.{m} + excluded.{m}" for m in _MEASURES
)
_SQL_INSERT_TASK = (  # constant fragments only, values are bound parameters
    f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES ({_placeholders(24)}) "  # noqa: S608
    "ON CONFLICT (task_id) DO NOTHING"
)
# resolve_intent as one statement (one round trip, its own transaction): insert the task, its terminal body if it
# has one, delete the intent and, only if the task was new, add it to the rollup; for a budgeted submission, also
# release its budget hold (either way). Foreign keys are checked at the end of the statement, so the body's
# reference to the task inserted beside it holds.
_RESOLVE_CTES = (  # constant fragments only, values are bound parameters
    f"WITH ins AS ({_SQL_INSERT_TASK} RETURNING task_id), "  # noqa: S608
    "body AS (INSERT INTO task_bodies (task_id, body) SELECT task_id, $25::bytea FROM ins WHERE $25::bytea IS NOT NULL "
    "ON CONFLICT (task_id) DO UPDATE SET body = excluded.body), "
    # A task id already in the ledger is not this submission's: its intent stays, as outcome unknown.
    "gone AS (DELETE FROM intents WHERE intent_id = $26 AND EXISTS (SELECT 1 FROM ins)), "
    f"roll AS ({_ROLLUP_INSERT}SELECT $27::integer, $28::text, $29::text, $30::text, "
    + ", ".join(f"${n}::bigint" for n in range(31, 31 + len(_MEASURES)))
    + f" FROM ins {_ROLLUP_UPSERT})"
)
_SQL_RESOLVE = _RESOLVE_CTES + " SELECT count(*) FROM ins"  # noqa: S608 - constant fragments only
_HOLD_PARAM: Final = 31 + len(_MEASURES)
_SQL_RESOLVE_RELEASING = (  # constant fragments only, values are bound parameters
    _RESOLVE_CTES + f", hold AS (DELETE FROM budget_holds WHERE hold_id = ${_HOLD_PARAM}) SELECT count(*) FROM ins"  # noqa: S608
)
_SQL_STATUS = MappingProxyType(
    {
        True: "UPDATE tasks SET status = $1, progress = COALESCE($2, progress), last_polled_at = $3 "
        "WHERE task_id = $4 AND settled_at IS NULL",
        False: "UPDATE tasks SET status = $1, progress = COALESCE($2, progress), last_checked_at = $3 "
        "WHERE task_id = $4 AND settled_at IS NULL",
    }
)
# Each settlement is one statement (one round trip, its own transaction): the UPDATE settles the task only if it
# is not settled yet (so exactly once, whichever process asks first), and only a task it settled moves the rollup:
# its estimate leaves ``pending`` and the settled amounts arrive, as ``store_rows.settle_delta`` computes for SQLite.
# With a webhook, the same statement adds its outbox row, again only for a task it settled (``FROM s``).
_SETTLE_CTES = (  # constant fragments only, values are bound parameters
    "WITH s AS (UPDATE tasks SET status = $1, outcome = $1, settled_seconds_nano = $2, settled_nano = $3, "  # noqa: S608
    "settled_at = $4 WHERE task_id = $5 AND settled_at IS NULL "
    "RETURNING task_id, submitted_day, key_name, model, mode, estimate_nano), "
    "body AS (INSERT INTO task_bodies (task_id, body) SELECT task_id, $6::bytea FROM s WHERE $6::bytea IS NOT NULL "
    "ON CONFLICT (task_id) DO UPDATE SET body = excluded.body), "
    f"roll AS ({_ROLLUP_INSERT}"
    "SELECT submitted_day, key_name, model, mode, 0, 0, $2::bigint, 0, $3::bigint, $3::bigint - estimate_nano, "
    f"($1 = 'completed')::int, ($1 = 'failed')::int, 0, -1, 0 FROM s {_ROLLUP_UPSERT})"
)
_SQL_SETTLE = _SETTLE_CTES + " SELECT count(*), 0 FROM s"  # noqa: S608 - constant fragments only
_SQL_SETTLE_WITH_WEBHOOK = (  # constant fragments only, values are bound parameters
    _SETTLE_CTES + f", hook AS (INSERT INTO webhook_outbox ({OUTBOX_COLUMNS}, lease_until) "  # noqa: S608
    "SELECT $7::text, $8::text, $9::text, $10::text, $11::bytea, $12::float8, $13::text, $14::integer, "
    "$15::float8, $16::text, 0 FROM s "
    "WHERE (SELECT COUNT(*) FROM webhook_outbox WHERE key_name = $8 AND state = 'pending') < $17 "
    "AND (SELECT COUNT(*) FROM webhook_outbox WHERE host = $9 AND state = 'pending') < $18 "
    "ON CONFLICT (delivery_id) DO NOTHING RETURNING 1) "
    "SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM hook)"
)
_SQL_MARK_UNKNOWN = (  # constant fragments only, values are bound parameters
    "WITH s AS (UPDATE tasks SET status = 'unknown', outcome = 'unknown', "  # noqa: S608
    "settled_seconds_nano = estimate_seconds * 1000000000, settled_nano = estimate_nano, settled_at = $1 "
    "WHERE task_id = $2 AND settled_at IS NULL "
    "RETURNING submitted_day, key_name, model, mode, estimate_seconds, estimate_nano), "
    f"roll AS ({_ROLLUP_INSERT}"
    "SELECT submitted_day, key_name, model, mode, 0, 0, estimate_seconds * 1000000000, 0, estimate_nano, 0, "
    f"0, 0, 1, -1, 0 FROM s {_ROLLUP_UPSERT}) "
    "SELECT count(*) FROM s"
)
_SQL_NEEDING_SETTLEMENT = (
    f"{_SELECT_TASK} WHERE t.settled_at IS NULL "
    "AND COALESCE(t.last_polled_at, t.submitted_at) < $1 AND COALESCE(t.last_checked_at, t.submitted_at) < $1 "
    "ORDER BY COALESCE(t.last_checked_at, t.submitted_at), t.task_id LIMIT $2"
)
# SUM of BIGINT is NUMERIC, which asyncpg hands over as one Decimal per cell (most of a big report's fetch time):
# the totals come back as BIGINT instead, as SQLite's do; 9.2e18 nano-units is $9.2 billion, far past any ledger.
_USAGE_AGGREGATES = (
    "COUNT(*), "
    "COALESCE(SUM(estimate_seconds), 0)::bigint, "
    "COALESCE(SUM(settled_seconds_nano), 0)::bigint, "
    "COALESCE(SUM(estimate_nano), 0)::bigint, "
    "COALESCE(SUM(settled_nano), 0)::bigint, "
    "COALESCE(SUM(CASE WHEN settled_at IS NULL THEN estimate_nano ELSE settled_nano END), 0)::bigint, "
    "COUNT(*) FILTER (WHERE outcome = 'completed'), "
    "COUNT(*) FILTER (WHERE outcome = 'failed'), "
    "COUNT(*) FILTER (WHERE outcome = 'unknown'), "
    "COUNT(*) FILTER (WHERE settled_at IS NULL), "
    "COUNT(*) FILTER (WHERE duration_defaulted)"
)
_ROLLUP_SUMS = ", ".join(f"COALESCE(SUM({m}), 0)::bigint" for m in _MEASURES)
_SQL_REBUILD_ROLLUP = (  # the rollup recomputed from the ledger rows (repair, bulk loads)
    f"INSERT INTO usage_daily (day, key_name, model, mode, {', '.join(_MEASURES)}) "  # noqa: S608
    f"SELECT submitted_day, key_name, model, mode, {_USAGE_AGGREGATES} FROM tasks "
    "GROUP BY submitted_day, key_name, model, mode"
)
_SQL_INTENT = (
    "INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at, account) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
# The admission of an account's capacity. The account's advisory lock (held to COMMIT) serialises admissions to
# one account across every process; the count is read by the INSERT's own statement, after the lock is taken, so
# no two processes can both see the last free slot.
_SQL_ACCOUNT_LOCK = "SELECT pg_advisory_xact_lock($1, $2)"
_SQL_INTENT_IF_ROOM = (
    "INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at, account) "
    "SELECT $1, $2, $3, $4, $5, $6, $7 WHERE "
    "(SELECT COUNT(*) FROM tasks WHERE account = $7 AND settled_at IS NULL) + "
    "(SELECT COUNT(*) FROM intents WHERE account = $7 AND submitted_at >= $8) < $9"
)
_SQL_BUDGET_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
_SQL_HELD = "SELECT COALESCE(SUM(amount_nano), 0) FROM budget_holds WHERE key_name = $1 AND created_at >= $2"
# The hold written, and the key's expired holds (a crashed process's) cleared, in one statement.
_SQL_HOLD = (
    "WITH old AS (DELETE FROM budget_holds WHERE key_name = $2 AND created_at < $5) "
    "INSERT INTO budget_holds (hold_id, key_name, amount_nano, created_at) VALUES ($1, $2, $3, $4)"
)
_ADMITTED: Final = IntentOutcome(Admission.ADMITTED)
# The archive's statements (written once, with ``?``, in ``archive_rows``) in PostgreSQL's numbering.
_ARCH_CANDIDATES = numbered(arch.SQL_CANDIDATES)
_ARCH_CLAIM = numbered(arch.SQL_CLAIM)
_ARCH_STORED = numbered(arch.SQL_STORED)
_ARCH_RETRY = numbered(arch.SQL_RETRY)
_ARCH_GET = numbered(arch.SQL_GET)
_ARCH_STORED_BEFORE = numbered(arch.SQL_STORED_BEFORE)
_ARCH_REMOVED = numbered(arch.SQL_REMOVED)
_ARCH_PAGE = numbered(arch.SQL_PAGE)
_ARCH_RESTORE = numbered(arch.SQL_RESTORE)
# A budgeted intent on an account without a limit, for a month of whole days: the check, the intent, the hold and
# the clearing of the key's expired holds in one statement, run after the key's budget lock (so its snapshot sees
# every earlier holder's commit). The lock is held for this statement and the COMMIT only.
_SQL_INTENT_WITHIN_BUDGET = (
    "WITH spent AS (SELECT "
    "(SELECT COALESCE(SUM(cost_nano), 0) FROM usage_daily WHERE key_name = $2 AND day >= $8 AND day < $9) "
    "+ (SELECT COALESCE(SUM(amount_nano), 0) FROM budget_holds WHERE key_name = $2 AND created_at >= $10) AS nano), "
    "ok AS (SELECT nano FROM spent WHERE nano + $11 <= $12), "
    "intent AS (INSERT INTO intents (intent_id, key_name, request_id, model, mode, submitted_at, account) "
    "SELECT $1, $2, $3, $4, $5, $6, $7 FROM ok RETURNING 1), "
    "old AS (DELETE FROM budget_holds WHERE key_name = $2 AND created_at < $10 AND EXISTS (SELECT 1 FROM ok)), "
    "hold AS (INSERT INTO budget_holds (hold_id, key_name, amount_nano, created_at) "
    "SELECT $13, $2, $11, $14 FROM ok RETURNING 1) "
    "SELECT (SELECT nano FROM spent), (SELECT COUNT(*) FROM intent)"
)
_SQL_ACCOUNT_IN_FLIGHT = (
    "SELECT account, SUM(n) FROM ("
    "SELECT account, COUNT(*) AS n FROM tasks WHERE settled_at IS NULL GROUP BY account "
    "UNION ALL SELECT account, COUNT(*) AS n FROM intents WHERE submitted_at >= $1 GROUP BY account"
    ") AS counts GROUP BY account"
)
_ACCOUNT_LOCK: Final = 0x6B616363
"""First key of an account's admission advisory lock (``kacc``); the second is derived from the account name."""
_SQL_IDEM_EXPIRE = "DELETE FROM idempotency WHERE key_name = $1 AND idem_key = $2 AND created_at <= $3"
_SQL_IDEM_CLAIM = (
    "INSERT INTO idempotency (key_name, idem_key, body_hash, state, created_at) VALUES ($1, $2, $3, 'in_flight', $4) "
    "ON CONFLICT (key_name, idem_key) DO NOTHING"
)
_SQL_IDEM_GET = (
    "SELECT body_hash, state, created_at, status, headers, body FROM idempotency WHERE key_name = $1 AND idem_key = $2"
)
_SQL_IDEM_TAKE_OVER = (
    "UPDATE idempotency SET created_at = $1 WHERE key_name = $2 AND idem_key = $3 "
    "AND state = 'in_flight' AND created_at = $4"
)


def _page_sql(has_key: bool, has_status: bool, has_cursor: bool) -> str:
    """The page query: optional key and status filters, optional ``(submitted_at, task_id)`` cursor, the limit."""
    where, n = [], 1
    if has_key:
        where.append(f" AND t.key_name = ${n}")
        n += 1
    if has_status:
        where.append(f" AND t.status = ${n}")
        n += 1
    if has_cursor:
        where.append(f" AND (t.submitted_at, t.task_id) < (${n}::double precision, ${n + 1}::text)")
        n += 2
    return f"{_SELECT_TASK} WHERE TRUE{''.join(where)} ORDER BY t.submitted_at DESC, t.task_id DESC LIMIT ${n}"


_PAGE_SQL = MappingProxyType(
    {(k, s, c): _page_sql(k, s, c) for k in (False, True) for s in (False, True) for c in (False, True)}
)


# -- URL handling ---------------------------------------------------------------------------------------------


def _take_param(url: str, name: str) -> tuple[str, list[str]]:
    """``url`` without the query parameter ``name``, and the values it had there."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [value for key, value in pairs if key == name]
    if not values:
        return url, values
    rest = [(key, value) for key, value in pairs if key != name]
    return urlunsplit(parts._replace(query=urlencode(rest))), values


def split_url(url: str, schema: str | None = None) -> tuple[str, str | None]:
    """``(dsn for asyncpg, schema)`` from a store URL: the ``schema`` query parameter is taken out of the URL.

    ValueError if the schema is not a plain identifier (``[A-Za-z_][A-Za-z0-9_]{0,62}``), given twice, or given
    both in the URL and as ``schema`` with different values. Messages never quote the URL.
    """
    url, in_url = _take_param(url, "schema")
    if len(in_url) > 1:
        raise ValueError("store URL: schema is given more than once")
    if in_url:
        if schema is not None and schema != in_url[0]:
            raise ValueError("store URL: schema differs from the schema argument")
        schema = in_url[0]
    if schema is not None and _SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError("store URL: schema must be a plain identifier: [A-Za-z_][A-Za-z0-9_]{0,62}")
    return url, schema


def take_pool_size(dsn: str) -> tuple[str, int]:
    """``(dsn without it, size)`` for the ``pool_size`` query parameter: connections per process (default
    ``POOL_MAX``); ValueError unless it is one integer from 1 to ``POOL_SIZE_LIMIT``."""
    dsn, given = _take_param(dsn, "pool_size")
    if not given:
        return dsn, POOL_MAX
    if len(given) > 1 or not given[0].isdigit() or not 1 <= int(given[0]) <= POOL_SIZE_LIMIT:
        raise ValueError(f"store URL: pool_size must be one integer from 1 to {POOL_SIZE_LIMIT}")
    return dsn, int(given[0])


def _lock_key(schema: str | None) -> int:
    """Second key of the migration lock: a signed 32-bit hash of the schema name ('' for the default schema)."""
    digest = zlib.crc32((schema or "").encode())
    return (digest ^ 0x80000000) - 0x80000000


def _quoted(schema: str) -> str:
    """The (validated) schema name as a quoted identifier: case is kept, as written in the URL."""
    return f'"{schema}"'


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``UPDATE 1`` or ``INSERT 0 1``."""
    return int(status.rpartition(" ")[2])


# -- migrations -----------------------------------------------------------------------------------------------


async def _ensure_schema(conn: asyncpg.Connection, schema: str | None) -> None:
    """Create the schema and the migrations table if missing (under the migration lock, so no race)."""
    if schema is not None and not await conn.fetchval("SELECT TRUE FROM pg_namespace WHERE nspname = $1", schema):
        await conn.execute(f"CREATE SCHEMA {_quoted(schema)}")  # validated identifier
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )


async def _migrate(conn: asyncpg.Connection, schema: str | None) -> tuple[int, ...]:
    """Apply the migrations this database lacks; return the versions applied (empty if up to date)."""
    async with conn.transaction(isolation="read_committed"):
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _MIGRATION_LOCK, _lock_key(schema))
        await _ensure_schema(conn, schema)
        done = {int(row[0]) for row in await conn.fetch("SELECT version FROM schema_migrations")}
        known = max(version for version, _ in MIGRATIONS)
        if done and max(done) > known:
            raise StoreError(f"database schema version {max(done)} is newer than this gateway's ({known})")
        applied: list[int] = []
        for version, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)", version, time.time()
            )
            applied.append(version)
        return tuple(applied)


# -- usage ----------------------------------------------------------------------------------------------------

_CASTS: Final = MappingProxyType({"int": "::bigint", "float": "::double precision", "text": ""})


def _placeholder(n: int, kind: str) -> str:
    return f"${n}{_CASTS[kind]}"


def _usage_queries(
    since: float | None, until: float | None, group_by: tuple[str, ...], key_name: str | None
) -> list[UsageQuery]:
    return usage_queries(
        since,
        until,
        group_by,
        key_name,
        placeholder=_placeholder,
        task_sums=_USAGE_AGGREGATES,
        rollup_sums=_ROLLUP_SUMS,
    )


# A month of whole UTC days (what budgets use): the daily rollup and the holds in one statement, one snapshot.
_SQL_SPENT_WHOLE_DAYS = (
    "SELECT (SELECT COALESCE(SUM(cost_nano), 0) FROM usage_daily WHERE key_name = $1 AND day >= $2 AND day < $3) "
    "+ (SELECT COALESCE(SUM(amount_nano), 0) FROM budget_holds WHERE key_name = $1 AND created_at >= $4)"
)


async def _spent_nano(conn: asyncpg.Connection, key_name: str, month: tuple[float, float], holds_since: float) -> int:
    """What a budget check counts, in nano-dollars: the month's settled + outstanding, plus live holds."""
    start, end = month
    if start % 86400 == 0 and end % 86400 == 0:
        days = (int(start // 86400), int(end // 86400))
        return int(await conn.fetchval(_SQL_SPENT_WHOLE_DAYS, key_name, *days, holds_since))
    held = int(await conn.fetchval(_SQL_HELD, key_name, holds_since))  # holds before tasks: see record_intent
    totals: dict[tuple[Any, ...], list[int]] = {}
    for sql, params in _usage_queries(start, end, (), key_name):
        for row in await conn.fetch(sql, *params):
            add_usage(totals, row, 0)
    return held + totals.get((), [0] * len(_MEASURES))[_MEASURES.index("cost_nano")]


async def _aggregate(
    conn: asyncpg.Connection, queries: list[UsageQuery], width: int
) -> dict[tuple[Any, ...], list[int]]:
    """Run the usage queries in one snapshot and add up their measures per group (``width`` group columns)."""
    totals: dict[tuple[Any, ...], list[int]] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for sql, params in queries:
            for row in await conn.fetch(sql, *params):
                add_usage(totals, row, width)
    return totals


# -- idempotency ----------------------------------------------------------------------------------------------


async def _claim(
    conn: asyncpg.Connection,
    ident: tuple[str, str],
    body_hash: str,
    now: float,
    ttl_s: float,
    in_flight_ttl_s: float,
) -> IdemState:
    """The body of :meth:`PostgresStore.idempotency_begin`, inside its transaction."""
    await conn.execute(_SQL_IDEM_EXPIRE, *ident, now - ttl_s)
    if _count(await conn.execute(_SQL_IDEM_CLAIM, *ident, body_hash, now)) == 1:
        return IdemState(IdemKind.NEW)
    row = await conn.fetchrow(_SQL_IDEM_GET, *ident)
    if row is None:  # abandoned between the two statements by another process: let the client retry
        return IdemState(IdemKind.IN_FLIGHT)
    stored_hash, state, created_at, status, headers, body = row
    if not hmac.compare_digest(stored_hash, body_hash):
        return IdemState(IdemKind.CONFLICT)
    if state == "in_flight":
        if created_at <= now - in_flight_ttl_s:
            taken = await conn.execute(_SQL_IDEM_TAKE_OVER, now, *ident, created_at)
            if _count(taken) == 1:
                return IdemState(IdemKind.NEW)
        return IdemState(IdemKind.IN_FLIGHT)
    pairs = tuple((str(name), str(value)) for name, value in json.loads(headers or "[]"))
    return IdemState(IdemKind.REPLAY, status=status, headers=pairs, body=bytes(body or b""))


class PostgresStore:
    """:class:`gateway.store.base.Store` on a PostgreSQL database. Create with ``await PostgresStore.open(url)``.

    Any number of gateway processes and replicas open :class:`PostgresStore` on the same database and share keys,
    intents, the ledger, idempotency records and usage (SPEC section 8). It keeps exactly the observable behaviour
    of :class:`gateway.store.sqlite.SQLiteStore` (same results, ordering, errors and edge cases); the row and record
    conversions, rollup deltas and page cursors are the SQLite backend's own functions, so both map records alike.

    Connections: a small asyncpg pool per process (1 to 10 connections). Every write is one ``READ COMMITTED``
    transaction (set explicitly, whatever the server default); a read spanning several statements (usage reports)
    runs in one ``REPEATABLE READ`` read-only transaction, so it sees a single snapshot.

    Across processes, the guarantees rest on row locks rather than on a single writer:

    * **Settlement once**: ``UPDATE tasks ... WHERE task_id = $n AND settled_at IS NULL RETURNING ...``. A second
      settler blocks on the row lock, re-checks the condition once the first commits, and updates nothing; only the
      caller whose UPDATE returned the row adds to the usage rollup and gets True.
    * **Tasks once**: ``INSERT ... ON CONFLICT (task_id) DO NOTHING``; :meth:`PostgresStore.resolve_intent` reports
      False when the row existed.
    * **Idempotency claims**: expired record deleted, then ``INSERT ... ON CONFLICT DO NOTHING`` (a concurrent claim
      waits for the first to commit and then finds its row); taking over a stale in-flight record is a compare-and-set
      on its ``created_at``, so exactly one of several takers wins.
    * **Keys**: every change bumps the ``counters`` row in the same transaction; rotation reads the key
      ``FOR UPDATE`` so two rotations serialise.

    Usage: ``usage_daily`` keeps per (UTC day, key, model, mode) totals in the same transactions as task inserts and
    settlements (upsert last, so its row lock is held only until COMMIT), exactly as in the SQLite backend.

    Schema: money and settled seconds are ``BIGINT`` units of 1e-9 (:func:`gateway.store.base.to_fixed`), times are
    ``DOUBLE PRECISION`` epoch seconds, bodies ``BYTEA``. Ordered text columns are ``COLLATE "C"`` so ordering is
    by code point, as in SQLite and Python, whatever the database's locale. ``?schema=name`` in the URL (or
    ``schema=``) puts every table in that PostgreSQL schema, created if missing.

    Migrations are ``(version, statements)`` pairs applied at open in one transaction holding
    ``pg_advisory_xact_lock`` (per schema), recorded in ``schema_migrations``; processes starting together wait for
    the first, then find nothing to do. A database migrated by a newer gateway is refused. Append, never edit.

    Every driver or network failure surfaces as :class:`gateway.store.base.StoreError`, with the URL's password (if any)
    never in the message.
    """

    def __init__(self, pool: asyncpg.Pool, secrets: tuple[str, ...]) -> None:
        """Wrap an open pool; use :meth:`open`."""
        self._pool: asyncpg.Pool | None = pool
        self._secrets = secrets
        self._last_idem_purge = float("-inf")
        self.applied_migrations: tuple[int, ...] = ()
        """Migration versions this open applied (empty when the schema was already current)."""

    @classmethod
    async def open(cls, url: str, *, schema: str | None = None) -> PostgresStore:
        """Connect a pool to ``url``, create the schema objects as needed and apply pending migrations.

        ``schema`` (or ``?schema=name`` in the URL) puts every table in that PostgreSQL schema, created if missing;
        ``?pool_size=N`` sets the connections this process may open (default ``POOL_MAX``).
        ValueError for an unusable URL; StoreError if the database cannot be reached or is too new.
        """
        dsn, schema = split_url(url, schema)
        dsn, pool_size = take_pool_size(dsn)
        secrets = url_secrets(url)
        settings = {"application_name": "kling-gateway"}
        if schema is not None:
            settings["search_path"] = _quoted(schema)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=POOL_MIN,
                max_size=pool_size,
                timeout=_CONNECT_TIMEOUT_S,
                command_timeout=_COMMAND_TIMEOUT_S,
                server_settings=settings,
            )
        except ValueError as exc:  # asyncpg's parsing of the URL and its options (ClientConfigurationError too)
            raise ValueError(scrub(f"store URL: not a usable PostgreSQL URL: {exc}", secrets)) from None
        except _DRIVER_ERRORS as exc:
            message = scrub(f"cannot connect to PostgreSQL: {exc}", secrets)
            raise StoreError(message) from _safe_cause(exc, secrets)
        store = cls(pool, secrets)
        try:
            store.applied_migrations = await store._run(lambda conn: _migrate(conn, schema), tx=False)
        except BaseException:
            await store.close()
            raise
        return store

    # -- plumbing -------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, tx: bool = True) -> T:
        """Run ``fn(conn)`` on a pooled connection, in a ``READ COMMITTED`` transaction if ``tx``.

        Driver and network errors become :class:`StoreError`; the store's own errors pass through.
        """
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed")
        try:
            async with pool.acquire() as conn:
                if not tx:
                    return await fn(conn)
                async with conn.transaction(isolation="read_committed"):
                    return await fn(conn)
        except _DRIVER_ERRORS as exc:
            raise StoreError(scrub(f"postgresql: {exc}", self._secrets)) from _safe_cause(exc, self._secrets)

    async def close(self) -> None:
        """Close the pool (waiting briefly for queries in flight); later calls raise StoreError. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=_CLOSE_TIMEOUT_S)
        except _DRIVER_ERRORS:  # TimeoutError included
            pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ping(self) -> bool:
        """True if the database answers ``SELECT 1`` within a few seconds; False (never an error) otherwise."""
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S):
                await self._run(lambda conn: conn.fetchval("SELECT 1"), tx=False)
        except (StoreError, TimeoutError):
            return False
        return True

    # -- keys -----------------------------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> None:
        """Insert a key; :class:`KeyExists` if the name is taken."""
        row = key_row(record)

        async def op(conn: asyncpg.Connection) -> None:
            if _count(await conn.execute(_SQL_INSERT_KEY, *row)) != 1:
                raise KeyExists(f"a key named {record.name!r} already exists")
            await conn.execute(_SQL_BUMP_KEYS)

        await self._run(op)

    async def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, ordered by name."""
        rows = await self._run(lambda conn: conn.fetch(_SQL_SELECT_KEYS + " ORDER BY name"), tx=False)
        return [key_record(row) for row in rows]

    async def get_key(self, name: str) -> KeyRecord | None:
        """The key called ``name``, or None."""
        row = await self._run(lambda conn: conn.fetchrow(_SQL_SELECT_KEYS + " WHERE name = $1", name), tx=False)
        return None if row is None else key_record(row)

    async def find_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose current or previous hash is ``key_hash`` (whether or not it still accepts it)."""
        sql = _SQL_SELECT_KEYS + " WHERE key_hash = $1 OR previous_hash = $1 ORDER BY name"
        rows = await self._run(lambda conn: conn.fetch(sql, key_hash), tx=False)
        for row in rows:  # the current hash wins over someone's rotated-out one (never happens in practice)
            if hmac.compare_digest(row[1], key_hash):
                return key_record(row)
        return key_record(rows[0]) if rows else None

    async def revoke_key(self, name: str, at: float) -> bool:
        """Revoke ``name``; False if it does not exist or was already revoked."""

        async def op(conn: asyncpg.Connection) -> bool:
            sql = "UPDATE client_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL"
            if _count(await conn.execute(sql, at, name)) != 1:
                return False
            await conn.execute(_SQL_BUMP_KEYS)
            return True

        return await self._run(op)

    async def rotate_key(self, name: str, new_hash: str, new_prefix: str, grace_until: float) -> KeyRecord:
        """Give ``name`` a new hash; the old one stays valid until ``grace_until``."""

        async def op(conn: asyncpg.Connection) -> KeyRecord:
            row = await conn.fetchrow(_SQL_SELECT_KEYS + " WHERE name = $1 FOR UPDATE", name)
            if row is None:
                raise KeyNotFound(f"no key named {name!r}")
            if row[7] is not None:
                raise KeyRevoked(f"key {name!r} is revoked")
            await conn.execute(
                "UPDATE client_keys SET previous_hash = key_hash, previous_valid_until = $1, key_hash = $2, "
                "prefix = $3 WHERE name = $4",
                grace_until,
                new_hash,
                new_prefix,
                name,
            )
            await conn.execute(_SQL_BUMP_KEYS)
            return key_record(await conn.fetchrow(_SQL_SELECT_KEYS + " WHERE name = $1", name))

        return await self._run(op)

    async def keys_version(self) -> int:
        """Counter bumped by every key change, in the same transaction."""
        sql = "SELECT value FROM counters WHERE name = 'keys_version'"
        return int(await self._run(lambda conn: conn.fetchval(sql), tx=False))

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
        written beside it); with a limit, only while ``account`` has room.

        One transaction. Its locks are always taken in the same order, the key's budget lock before the account's,
        so two submissions can never wait on each other crosswise. A submission's hold is released by the statement
        that writes its task row (``resolve_intent``); a month of whole days is read in one statement (one snapshot:
        each in-flight submission is a hold or a task), any other window holds first, then tasks (a hold, a task,
        or both, never neither).
        """
        params = (intent_id, key_name, request_id, model, mode, submitted_at, account)
        if hold is None and max_in_flight <= 0:
            await self._run(lambda conn: conn.execute(_SQL_INTENT, *params), tx=False)
            return _ADMITTED
        since = hold.now - hold.ttl_s if hold is not None else 0.0
        if hold is not None and max_in_flight <= 0 and hold.month[0] % 86400 == 0 and hold.month[1] % 86400 == 0:
            days = (int(hold.month[0] // 86400), int(hold.month[1] // 86400))
            amount, budget = to_fixed(hold.amount), to_fixed(hold.budget)
            within = (*params, *days, since, amount, budget, hold.hold_id, hold.now)

            async def in_one_statement(conn: asyncpg.Connection) -> IntentOutcome:
                await conn.execute(_SQL_BUDGET_LOCK, "budget:" + key_name)
                spent_nano, written = await conn.fetchrow(_SQL_INTENT_WITHIN_BUDGET, *within)
                admission = Admission.ADMITTED if written else Admission.OVER_BUDGET
                return IntentOutcome(admission, from_fixed(int(spent_nano)))

            return await self._run(in_one_statement)

        async def op(conn: asyncpg.Connection) -> IntentOutcome:
            spent: Decimal | None = None
            if hold is not None:
                await conn.execute(_SQL_BUDGET_LOCK, "budget:" + key_name)
                spent_nano = await _spent_nano(conn, key_name, hold.month, since)
                spent = from_fixed(spent_nano)
                if spent_nano + to_fixed(hold.amount) > to_fixed(hold.budget):
                    return IntentOutcome(Admission.OVER_BUDGET, spent)
            if max_in_flight <= 0:
                await conn.execute(_SQL_INTENT, *params)
            else:
                await conn.execute(_SQL_ACCOUNT_LOCK, _ACCOUNT_LOCK, _lock_key(account))
                if _count(await conn.execute(_SQL_INTENT_IF_ROOM, *params, hold_since, max_in_flight)) != 1:
                    return IntentOutcome(Admission.NO_ROOM, spent)
            if hold is not None:
                await conn.execute(_SQL_HOLD, hold.hold_id, key_name, to_fixed(hold.amount), hold.now, since)
            return IntentOutcome(Admission.ADMITTED, spent)

        return await self._run(op)

    async def account_in_flight(self, hold_since: float) -> dict[str, int]:
        """Per account: unsettled tasks plus intents submitted since ``hold_since``."""
        rows = await self._run(lambda conn: conn.fetch(_SQL_ACCOUNT_IN_FLIGHT, hold_since), tx=False)
        return {str(row[0]): int(row[1]) for row in rows if row[1]}

    async def account_marks(self) -> list[AccountMark]:
        """Every account's shared set-aside marks."""
        sql = "SELECT account, set_aside_until, unauthorized_key FROM account_marks ORDER BY account"
        rows = await self._run(lambda conn: conn.fetch(sql), tx=False)
        return [AccountMark(str(row[0]), float(row[1]), row[2]) for row in rows]

    async def mark_account_aside(self, account: str, until: float, at: float) -> None:
        """Set ``account`` aside until ``until`` for every process."""
        await self._run(lambda conn: conn.execute(_SQL_MARK_ASIDE, account, until, at), tx=False)

    async def mark_account_unauthorized(self, account: str, key_fingerprint: str, at: float) -> None:
        """Record the fingerprint of ``account``'s rejected key for every process."""
        await self._run(lambda conn: conn.execute(_SQL_MARK_UNAUTHORIZED, account, key_fingerprint, at), tx=False)

    async def end_account_aside(self, account: str, until: float) -> None:
        """End ``account``'s set-aside if it is not later than ``until``."""
        await self._run(lambda conn: conn.execute(_SQL_END_ASIDE, account, until), tx=False)

    async def resolve_intent(self, intent_id: str, task: TaskRecord, release_hold: str | None = None) -> bool:
        """Insert ``task``, delete the intent and release the budget hold in one statement; False if the task row
        already existed."""
        params: tuple[Any, ...] = (*task_row(task), task.terminal_body, intent_id, *insert_delta(task))
        sql = _SQL_RESOLVE
        if release_hold is not None:
            sql, params = _SQL_RESOLVE_RELEASING, (*params, release_hold)
        inserted = await self._run(lambda conn: conn.fetchval(sql, *params), tx=False)
        return bool(inserted)

    async def release_hold(self, hold_id: str) -> None:
        sql = "DELETE FROM budget_holds WHERE hold_id = $1"
        await self._run(lambda conn: conn.execute(sql, hold_id), tx=False)

    async def budget_spent(
        self, key_name: str, month: tuple[float, float], now: float, ttl_s: float = BUDGET_HOLD_TTL_S
    ) -> Decimal:
        """Settled + outstanding + live holds of ``key_name`` (one read snapshot)."""

        async def read(conn: asyncpg.Connection) -> int:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await _spent_nano(conn, key_name, month, now - ttl_s)

        return from_fixed(await self._run(read, tx=False))

    async def drop_intent(self, intent_id: str) -> bool:
        """Delete an intent whose submission the upstream refused; False if there was none."""
        sql = "DELETE FROM intents WHERE intent_id = $1"
        return _count(await self._run(lambda conn: conn.execute(sql, intent_id), tx=False)) == 1

    async def list_intents(self) -> list[IntentRecord]:
        """Submissions whose outcome is unknown, oldest first."""
        sql = (
            "SELECT intent_id, key_name, request_id, model, mode, submitted_at, account FROM intents "
            "ORDER BY submitted_at, intent_id"
        )
        rows = await self._run(lambda conn: conn.fetch(sql), tx=False)
        return [IntentRecord(*row) for row in rows]

    # -- tasks ----------------------------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """The ledger row for ``task_id``, or None."""
        sql = _SELECT_TASK + " WHERE t.task_id = $1"
        row = await self._run(lambda conn: conn.fetchrow(sql, task_id), tx=False)
        return None if row is None else task_record(row)

    async def update_status(self, task_id: str, status: str, progress: int | None, at: float, polled: bool) -> bool:
        """Record a status seen at ``at``; settled or unknown tasks are left alone (False)."""
        if status not in TASK_STATUSES:
            raise ValueError(f"unknown task status {status!r}")
        sql = _SQL_STATUS[polled]
        return _count(await self._run(lambda conn: conn.execute(sql, status, progress, at, task_id), tx=False)) == 1

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
        """Settle ``task_id`` once, whichever process asks first, with its webhook in the same statement."""
        if outcome not in TERMINAL:
            raise ValueError(f"settlement outcome must be completed or failed, not {outcome!r}")
        params: tuple[Any, ...] = (outcome, to_fixed(seconds), to_fixed(usd), at, task_id, terminal_body)
        sql = _SQL_SETTLE
        if webhook is not None:
            sql = _SQL_SETTLE_WITH_WEBHOOK
            params += (*outbox_row(webhook.record), webhook.max_pending_per_key, webhook.max_pending_per_host)
        row = await self._run(lambda conn: conn.fetchrow(sql, *params), tx=False)
        return Settlement(first=bool(row[0]), webhook_queued=bool(row[1])) if row is not None else Settlement(False)

    async def mark_unknown(self, task_id: str, at: float) -> bool:
        """Settle ``task_id`` as ``unknown`` at its estimate; True only if this call settled it."""
        return bool(await self._run(lambda conn: conn.fetchval(_SQL_MARK_UNKNOWN, at, task_id), tx=False))

    async def tasks_for_key(
        self, key_name: str | None, limit: int = 50, before: str | None = None, *, status: str | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        """A page of tasks, newest first, and the cursor for the next page (None on the last page)."""
        params = page_params(key_name, status, limit, before)
        sql = _PAGE_SQL[(key_name is not None, status is not None, before is not None)]
        rows = await self._run(lambda conn: conn.fetch(sql, *params), tx=False)
        tasks = [task_record(row) for row in rows[:limit]]
        cursor = None
        if len(rows) > limit:
            cursor = encode_cursor(tasks[-1].submitted_at, tasks[-1].task_id)
        return tasks, cursor

    async def tasks_needing_settlement(self, idle_since: float, limit: int = 100) -> list[TaskRecord]:
        """Unsettled tasks neither polled nor checked since ``idle_since``, least recently checked first."""
        bound = limit if limit >= 0 else None  # a negative limit is no limit, as in SQLite
        rows = await self._run(lambda conn: conn.fetch(_SQL_NEEDING_SETTLEMENT, idle_since, bound), tx=False)
        return [task_record(row) for row in rows]

    async def outstanding_and_settled_usd(self, key_name: str, month_start: float, month_end: float) -> Decimal:
        """Settled amounts plus outstanding estimates of ``key_name``'s tasks submitted in [start, end)."""
        queries = _usage_queries(month_start, month_end, (), key_name)
        totals = await self._run(lambda conn: _aggregate(conn, queries, 0), tx=False)
        cost = totals.get((), [0] * len(_MEASURES))[_MEASURES.index("cost_nano")]
        return from_fixed(cost)

    async def usage(
        self, since: float | None = None, until: float | None = None, group_by: tuple[str, ...] = ()
    ) -> list[UsageRow]:
        """Totals of tasks submitted in [since, until), one row per group that has tasks, in group order."""
        check_group_by(group_by)
        queries = _usage_queries(since, until, group_by, None)
        totals = await self._run(lambda conn: _aggregate(conn, queries, len(group_by)), tx=False)
        return usage_rows(group_by, totals)

    async def rebuild_usage_rollup(self) -> None:
        """Recompute the per-day usage rollup from the ledger rows (after a bulk load, or as a repair).

        Writers of other processes wait on the table lock until the rebuild commits, so none is lost or counted
        twice.
        """

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute("LOCK TABLE usage_daily IN EXCLUSIVE MODE")
            await conn.execute("DELETE FROM usage_daily")
            await conn.execute(_SQL_REBUILD_ROLLUP)

        await self._run(op)

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
        if now - self._last_idem_purge >= _IDEM_PURGE_EVERY_S:
            self._last_idem_purge = now
            # A statement of its own: the claim's transaction then locks one row at most.
            sql = "DELETE FROM idempotency WHERE created_at <= $1"
            await self._run(lambda conn: conn.execute(sql, now - ttl_s), tx=False)
        ident = (key_name, idem_key)
        return await self._run(lambda conn: _claim(conn, ident, body_hash, now, ttl_s, in_flight_ttl_s))

    async def idempotency_finish(
        self, key_name: str, idem_key: str, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Store the response to replay for ``idem_key``."""
        sql = (
            "UPDATE idempotency SET state = 'done', status = $1, headers = $2, body = $3 "
            "WHERE key_name = $4 AND idem_key = $5"
        )
        params = (status, json.dumps([list(pair) for pair in headers]), body, key_name, idem_key)
        await self._run(lambda conn: conn.execute(sql, *params), tx=False)

    async def idempotency_abandon(self, key_name: str, idem_key: str) -> None:
        """Delete an in-flight record so a retry can proceed."""
        sql = "DELETE FROM idempotency WHERE key_name = $1 AND idem_key = $2 AND state = 'in_flight'"
        await self._run(lambda conn: conn.execute(sql, key_name, idem_key), tx=False)

    # -- webhook outbox ---------------------------------------------------------------------------------------

    async def outbox_add(self, record: OutboxRecord, max_pending_per_key: int, max_pending_per_host: int) -> bool:
        """Insert a delivery unless its key or host is at its pending cap (see :class:`gateway.store.base.Store`)."""
        params = (*outbox_row(record), max_pending_per_key, max_pending_per_host)
        status = await self._run(lambda conn: conn.execute(_SQL_OUTBOX_ADD, *params))
        return bool(status == "INSERT 0 1")

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
        """Lease due deliveries to ``owner``: rows locked by a concurrent claim are skipped, never waited for."""

        async def op(conn: asyncpg.Connection) -> list[Any]:
            ids = [
                row[0]
                for row in await conn.fetch(
                    _SQL_OUTBOX_CANDIDATES, now, list(busy_hosts), list(busy_keys), per_host, per_key, limit
                )
            ]
            if not ids:
                return []
            return list(await conn.fetch(_SQL_OUTBOX_LEASE, owner, lease_until, ids))

        rows = await self._run(op)
        return sorted((outbox_record(row) for row in rows), key=lambda r: (r.next_attempt_at, r.delivery_id))

    async def outbox_release(self, delivery_id: str, owner: str) -> bool:
        """Give back a leased delivery without an attempt."""
        sql = (
            "UPDATE webhook_outbox SET lease_owner = NULL, lease_until = 0 WHERE delivery_id = $1 AND lease_owner = $2"
        )
        return bool(await self._run(lambda conn: conn.execute(sql, delivery_id, owner), tx=False) == "UPDATE 1")

    async def outbox_retry(self, delivery_id: str, owner: str, next_attempt_at: float, error: str) -> bool:
        """Count a failed attempt and schedule the next one."""
        params = (next_attempt_at, error, delivery_id, owner)
        return bool(await self._run(lambda conn: conn.execute(_SQL_OUTBOX_RETRY, *params), tx=False) == "UPDATE 1")

    async def outbox_failed(self, delivery_id: str, owner: str, error: str) -> bool:
        """Count the final failed attempt and keep the row as ``failed``."""
        params = (error, delivery_id, owner)
        return bool(await self._run(lambda conn: conn.execute(_SQL_OUTBOX_FAILED, *params), tx=False) == "UPDATE 1")

    async def outbox_delivered(self, delivery_id: str, owner: str) -> bool:
        """Delete a delivered row."""
        sql = "DELETE FROM webhook_outbox WHERE delivery_id = $1 AND lease_owner = $2 AND state = 'pending'"
        return bool(await self._run(lambda conn: conn.execute(sql, delivery_id, owner), tx=False) == "DELETE 1")

    async def outbox_list(self, state: str, limit: int = 1000) -> list[OutboxRecord]:
        """Rows in ``state``, oldest first."""
        sql = (
            f"SELECT {OUTBOX_COLUMNS} FROM webhook_outbox WHERE state = $1 "  # noqa: S608 - constant columns
            "ORDER BY created_at, delivery_id LIMIT $2"
        )
        rows = await self._run(lambda conn: conn.fetch(sql, state, limit), tx=False)
        return [outbox_record(row) for row in rows]

    async def update_key_limits(self, record: KeyRecord) -> KeyRecord:
        """Set the key's models, rpm, monthly budget and webhook URL; KeyNotFound / KeyRevoked otherwise."""
        row = key_row(record)

        async def op(conn: asyncpg.Connection) -> KeyRecord:
            current = await conn.fetchrow(_SQL_SELECT_KEYS + " WHERE name = $1 FOR UPDATE", record.name)
            if current is None:
                raise KeyNotFound(f"no key named {record.name!r}")
            if current[7] is not None:
                raise KeyRevoked(f"key {record.name!r} is revoked")
            await conn.execute(
                "UPDATE client_keys SET models = $1, rpm = $2, monthly_budget_usd = $3, webhook_url = $4 "
                "WHERE name = $5",
                row[3],
                row[4],
                row[5],
                row[10],
                record.name,
            )
            await conn.execute(_SQL_BUMP_KEYS)
            return key_record(await conn.fetchrow(_SQL_SELECT_KEYS + " WHERE name = $1", record.name))

        return await self._run(op)

    # -- archive --------------------------------------------------------------------------------------------

    async def archive_candidates(self, completed_since: float, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Completed tasks never claimed, or whose claim ran out by ``now``."""
        sql = _ARCH_CANDIDATES
        rows = await self._run(lambda conn: conn.fetch(sql, completed_since, now, limit), tx=False)
        return [(str(row[0]), float(row[1])) for row in rows]

    async def archive_claim(self, task_id: str, now: float, until: float) -> bool:
        """Claim copying ``task_id`` until ``until``; True only for one process while the claim holds."""
        sql = _ARCH_CLAIM
        return _count(await self._run(lambda conn: conn.execute(sql, task_id, until, now), tx=False)) == 1

    async def archive_stored(self, task_id: str, key: str, size: int, sha256: str, at: float) -> None:
        """Record the verified copy."""
        sql = _ARCH_STORED
        await self._run(lambda conn: conn.execute(sql, key, size, sha256, at, task_id), tx=False)

    async def archive_retry(self, task_id: str, retry_at: float | None, error: str) -> None:
        """Count a failed attempt: claimable again after ``retry_at``, or given up when None."""
        sql = _ARCH_RETRY
        state = "failed" if retry_at is None else "claimed"
        await self._run(lambda conn: conn.execute(sql, state, retry_at, error[:500], task_id), tx=False)

    async def get_archive(self, task_id: str) -> ArchiveRecord | None:
        """The archive row of ``task_id``, or None."""
        sql = _ARCH_GET
        row = await self._run(lambda conn: conn.fetchrow(sql, task_id), tx=False)
        return None if row is None else arch.archive_record(row)

    async def archives_stored_before(self, before: float, limit: int = 100) -> list[ArchiveRecord]:
        """Stored copies archived before ``before``, oldest first."""
        sql = _ARCH_STORED_BEFORE
        rows = await self._run(lambda conn: conn.fetch(sql, before, limit), tx=False)
        return [arch.archive_record(row) for row in rows]

    async def archive_removed(self, task_id: str) -> None:
        """Mark a stored copy as deleted."""
        sql = _ARCH_REMOVED
        await self._run(lambda conn: conn.execute(sql, task_id), tx=False)

    async def archive_summary(self) -> dict[str, tuple[int, int]]:
        """``{state: (tasks, bytes)}`` plus ``unarchived`` completed tasks."""

        async def read(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
            rows = await conn.fetch(arch.SQL_SUMMARY)
            return arch.summary(rows, int(await conn.fetchval(arch.SQL_UNARCHIVED)))

        return await self._run(read)

    async def archive_records(self, after: str = "", limit: int = 1000) -> list[ArchiveRecord]:
        """A page of archive rows ordered by task id."""
        sql = _ARCH_PAGE
        rows = await self._run(lambda conn: conn.fetch(sql, after, limit), tx=False)
        return [arch.archive_record(row) for row in rows]

    async def restore_archive(self, record: ArchiveRecord) -> None:
        """Insert an archive row as it is; an existing row is left alone."""
        sql = _ARCH_RESTORE
        await self._run(lambda conn: conn.execute(sql, *arch.record_row(record)), tx=False)

    async def archive_retry_failed(self) -> int:
        """Make every given-up copy claimable again; how many."""
        return _count(await self._run(lambda conn: conn.execute(arch.SQL_RETRY_FAILED), tx=False))

    # -- audit trail --------------------------------------------------------------------------------------------

    async def audit_add(self, record: AuditRecord) -> None:
        """Append one admin action."""
        row = audit_row(record)
        await self._run(lambda conn: conn.execute(_SQL_AUDIT_ADD, *row), tx=False)

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
        rows = await self._run(lambda conn: conn.fetch(sql, *params), tx=False)
        records = [audit_record(row) for row in rows[:limit]]
        cursor = encode_cursor(records[-1].at, records[-1].audit_id) if len(rows) > limit else None
        return records, cursor

    # -- admin UI sessions --------------------------------------------------------------------------------------

    async def revoke_ui_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Record that admin UI session ``session_id`` signed out; revocations that expired by ``now`` go."""

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(_SQL_UI_SESSIONS_PURGE, now)
            await conn.execute(_SQL_UI_SESSION_REVOKE, session_id, expires_at)

        await self._run(op)

    async def ui_session_revoked(self, session_id: str) -> bool:
        """True when admin UI session ``session_id`` has signed out (its cookie no longer opens a page)."""
        found = await self._run(lambda conn: conn.fetchval(_SQL_UI_SESSION_REVOKED, session_id), tx=False)
        return found is not None


_SQL_UI_SESSIONS_PURGE = "DELETE FROM ui_session_revocations WHERE expires_at <= $1"
_SQL_UI_SESSION_REVOKE = (
    "INSERT INTO ui_session_revocations (session_id, expires_at) VALUES ($1, $2) ON CONFLICT (session_id) DO NOTHING"
)
_SQL_UI_SESSION_REVOKED = "SELECT 1 FROM ui_session_revocations WHERE session_id = $1"
_SQL_MARK_ASIDE = (
    "INSERT INTO account_marks (account, set_aside_until, unauthorized_key, updated_at) VALUES ($1, $2, NULL, $3) "
    "ON CONFLICT (account) DO UPDATE SET set_aside_until = excluded.set_aside_until, updated_at = excluded.updated_at"
)
_SQL_MARK_UNAUTHORIZED = (
    "INSERT INTO account_marks (account, set_aside_until, unauthorized_key, updated_at) VALUES ($1, 0, $2, $3) "
    "ON CONFLICT (account) DO UPDATE SET unauthorized_key = excluded.unauthorized_key, "
    "updated_at = excluded.updated_at"
)
_SQL_END_ASIDE = "UPDATE account_marks SET set_aside_until = 0 WHERE account = $1 AND set_aside_until <= $2"
_SQL_AUDIT_ADD = f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"  # noqa: S608
_AUDIT_PAGE_SQL = MappingProxyType(
    {
        (has_since, has_cursor): audit_page_sql(
            has_since=has_since, has_cursor=has_cursor, placeholder=lambda n: f"${n}"
        )
        for has_since in (False, True)
        for has_cursor in (False, True)
    }
)


_SQL_OUTBOX_ADD = (  # constant fragments only, values are bound parameters
    f"INSERT INTO webhook_outbox ({OUTBOX_COLUMNS}, lease_until) "  # noqa: S608
    "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0 "
    "WHERE (SELECT COUNT(*) FROM webhook_outbox WHERE key_name = $2 AND state = 'pending') < $11 "
    "AND (SELECT COUNT(*) FROM webhook_outbox WHERE host = $3 AND state = 'pending') < $12 "
    "ON CONFLICT (delivery_id) DO NOTHING"
)
# Window functions cannot take FOR UPDATE: pick fair candidates first, then lock those still due, skipping rows
# another claim holds (its lease is then set by the time anyone can lock them again).
_SQL_OUTBOX_CANDIDATES = (
    "SELECT delivery_id FROM webhook_outbox WHERE delivery_id IN ("
    " SELECT delivery_id FROM ("
    "  SELECT delivery_id, next_attempt_at,"
    "   ROW_NUMBER() OVER (PARTITION BY host ORDER BY next_attempt_at, delivery_id) AS by_host,"
    "   ROW_NUMBER() OVER (PARTITION BY key_name ORDER BY next_attempt_at, delivery_id) AS by_key"
    "  FROM webhook_outbox WHERE state = 'pending' AND next_attempt_at <= $1 AND lease_until <= $1"
    "  AND host <> ALL($2::text[]) AND key_name <> ALL($3::text[])"
    " ) candidates WHERE by_host <= $4 AND by_key <= $5 ORDER BY next_attempt_at, delivery_id LIMIT $6"
    ") AND state = 'pending' AND lease_until <= $1 FOR UPDATE SKIP LOCKED"
)
_SQL_OUTBOX_LEASE = (  # constant fragments only, values are bound parameters
    "UPDATE webhook_outbox SET lease_owner = $1, lease_until = $2 WHERE delivery_id = ANY($3::text[]) "  # noqa: S608
    f"RETURNING {OUTBOX_COLUMNS}"
)
_SQL_OUTBOX_RETRY = (
    "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, lease_owner = NULL, "
    "lease_until = 0 WHERE delivery_id = $3 AND lease_owner = $4 AND state = 'pending'"
)
_SQL_OUTBOX_FAILED = (
    "UPDATE webhook_outbox SET attempts = attempts + 1, state = 'failed', last_error = $1, lease_owner = NULL, "
    "lease_until = 0 WHERE delivery_id = $2 AND lease_owner = $3 AND state = 'pending'"
)


def _safe_cause(cause: BaseException, secrets: Sequence[str]) -> BaseException | None:
    """``cause`` to chain, or None if its own message would show the password."""
    return None if any(secret in str(cause) for secret in secrets) else cause
