"""Rows of the SQL backends: records to and from table rows, page cursors and usage rollup deltas.

``gateway.store.sqlite`` and ``gateway.store.postgres`` keep the same columns in the same order, so one set of
conversions serves both and a record reads back identical from either.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import date, timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

from gateway.catalog import TASK_STATUSES, TaskStatus
from gateway.keys import KeyRecord
from gateway.store.base import USAGE_GROUPS, AuditRecord, OutboxRecord, TaskRecord, UsageRow, from_fixed, to_fixed

#: The largest page ``tasks_for_key`` returns.
MAX_PAGE = 1000
_EPOCH = date(1970, 1, 1)


def key_row(record: KeyRecord) -> tuple[Any, ...]:
    budget = None if record.monthly_budget_usd is None else str(record.monthly_budget_usd)
    return (
        record.name,
        record.key_hash,
        record.prefix,
        json.dumps(list(record.models)),
        record.rpm,
        budget,
        record.created_at,
        record.revoked_at,
        record.previous_hash,
        record.previous_valid_until,
        record.webhook_url,
    )


def key_record(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        name=row[0],
        key_hash=row[1],
        prefix=row[2],
        models=tuple(json.loads(row[3])),
        rpm=row[4],
        monthly_budget_usd=None if row[5] is None else Decimal(row[5]),
        created_at=row[6],
        revoked_at=row[7],
        previous_hash=row[8],
        previous_valid_until=row[9],
        webhook_url=row[10],
    )


def _opt_fixed(value: Decimal | None) -> int | None:
    return None if value is None else to_fixed(value)


def _opt_decimal(units: int | None) -> Decimal | None:
    return None if units is None else from_fixed(units)


def task_row(task: TaskRecord) -> tuple[Any, ...]:
    if task.status not in TASK_STATUSES:
        raise ValueError(f"unknown task status {task.status!r}")
    return (
        task.task_id,
        task.key_name,
        task.model,
        task.mode,
        task.tier,
        task.audio,
        task.duration,
        task.duration_defaulted,
        task.estimate_seconds,
        to_fixed(task.estimate_usd),
        str(task.price_per_second_usd),
        str(task.mode_multiplier),
        task.request_id,
        task.submitted_at,
        int(task.submitted_at // 86400),
        task.status,
        task.progress,
        task.last_polled_at,
        task.last_checked_at,
        task.outcome,
        _opt_fixed(task.settled_seconds),
        _opt_fixed(task.settled_usd),
        task.settled_at,
        task.account,
    )


def task_record(row: Sequence[Any]) -> TaskRecord:
    # Records are kept in memory by the ledger (100k by default): the few distinct names and prices are shared
    # objects rather than one copy per task (about 40% of a record's memory).
    return TaskRecord(
        task_id=row[0],
        key_name=sys.intern(row[1]),
        model=sys.intern(row[2]),
        mode=sys.intern(row[3]),
        tier=sys.intern(row[4]),
        audio=bool(row[5]),
        duration=row[6],
        duration_defaulted=bool(row[7]),
        estimate_seconds=row[8],
        estimate_usd=_shared_fixed(row[9]),
        price_per_second_usd=_shared_decimal(row[10]),
        mode_multiplier=_shared_decimal(row[11]),
        request_id=row[12],
        submitted_at=row[13],
        status=sys.intern(row[14]),
        progress=row[15],
        last_polled_at=row[16],
        last_checked_at=row[17],
        outcome=None if row[18] is None else sys.intern(row[18]),
        settled_seconds=_opt_decimal(row[19]),
        settled_usd=_opt_decimal(row[20]),
        settled_at=row[21],
        terminal_body=None if row[22] is None else bytes(row[22]),
        account=sys.intern(row[23]),
    )


@functools.lru_cache(maxsize=4096)
def _shared_decimal(text: str) -> Decimal:
    """One Decimal per distinct price text (Decimals are immutable, so sharing is safe)."""
    return Decimal(text)


@functools.lru_cache(maxsize=4096)
def _shared_fixed(units: int) -> Decimal:
    """One Decimal per distinct fixed-point amount (estimates repeat: a few models x durations x modes)."""
    return from_fixed(units)


def insert_delta(task: TaskRecord) -> tuple[Any, ...]:
    """The rollup row a newly inserted task adds: exactly what the backends' usage aggregate counts for its row."""
    estimate = to_fixed(task.estimate_usd)
    settled_usd = 0 if task.settled_usd is None else to_fixed(task.settled_usd)
    settled = task.settled_at is not None
    return (
        int(task.submitted_at // 86400),
        task.key_name,
        task.model,
        task.mode,
        1,
        task.estimate_seconds,
        0 if task.settled_seconds is None else to_fixed(task.settled_seconds),
        estimate,
        settled_usd,
        settled_usd if settled else estimate,
        int(task.outcome == TaskStatus.COMPLETED),
        int(task.outcome == TaskStatus.FAILED),
        int(task.outcome == TaskStatus.UNKNOWN),
        int(not settled),
        int(task.duration_defaulted),
    )


def settle_delta(unsettled: Sequence[Any], outcome: str, seconds_nano: int, usd_nano: int) -> tuple[Any, ...]:
    """The rollup change when a task settles; ``unsettled`` is its (day, key, model, mode, seconds, estimate) row."""
    day, key_name, model, mode, _, estimate_nano = unsettled
    return (
        day,
        key_name,
        model,
        mode,
        0,
        0,
        seconds_nano,
        0,
        usd_nano,
        usd_nano - estimate_nano,
        int(outcome == TaskStatus.COMPLETED),
        int(outcome == TaskStatus.FAILED),
        int(outcome == TaskStatus.UNKNOWN),
        -1,
        0,
    )


def encode_cursor(submitted_at: float, task_id: str) -> str:
    """Opaque, URL-safe page cursor for the row ``(submitted_at, task_id)``."""
    raw = f"{submitted_at!r}\n{task_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Inverse of :func:`encode_cursor`; ValueError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, task_id = raw.split("\n", 1)
        return float(stamp), task_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid page cursor") from exc


def page_params(key_name: str | None, status: str | None, limit: int, before: str | None) -> list[Any]:
    """The bound parameters of a task page query, in order: key?, status?, cursor?, then ``limit + 1``.

    ValueError for a limit outside ``1..MAX_PAGE``, an unknown status or a cursor this module did not make.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    if status is not None and status not in TASK_STATUSES:
        raise ValueError(f"unknown task status {status!r}")
    params: list[Any] = []
    if key_name is not None:
        params.append(key_name)
    if status is not None:
        params.append(status)
    if before is not None:
        params.extend(decode_cursor(before))
    params.append(limit + 1)
    return params


def day_iso(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).isoformat()


# -- usage reports ------------------------------------------------------------------------------------------------

#: Report groups as columns of the tasks table and of the per-day rollup.
TASK_GROUP_COLUMNS: Final = MappingProxyType(
    {"key": "key_name", "model": "model", "mode": "mode", "day": "submitted_day", "account": "account"}
)
ROLLUP_GROUP_COLUMNS: Final = MappingProxyType({"key": "key_name", "model": "model", "mode": "mode", "day": "day"})
#: Template of a bound parameter's place in a backend's SQL: ``?`` for SQLite, ``$n`` (and a cast) for PostgreSQL.
Placeholder = Callable[[int, str], str]
UsageQuery = tuple[str, tuple[Any, ...]]


def check_group_by(group_by: tuple[str, ...]) -> None:
    """ValueError unless ``group_by`` names distinct groups among ``USAGE_GROUPS``."""
    unknown = [name for name in group_by if name not in USAGE_GROUPS]
    if unknown or len(set(group_by)) != len(group_by):
        raise ValueError(f"group_by must be distinct names among {', '.join(USAGE_GROUPS)}")


def usage_queries(
    since: float | None,
    until: float | None,
    group_by: tuple[str, ...],
    key_name: str | None,
    *,
    placeholder: Placeholder,
    task_sums: str,
    rollup_sums: str,
) -> list[UsageQuery]:
    """The grouped aggregates that together cover tasks submitted in [since, until).

    Whole UTC days come from ``usage_daily``; the partial days at either end of the window from ``tasks`` (an index
    range over at most two days of rows). Each query's measures are ``task_sums`` / ``rollup_sums`` (the backend's
    SQL for the same eleven figures); its rows start with the ``group_by`` columns.
    """

    def query(table: str, groups: Mapping[str, str], sums: str, conditions: list[tuple[str, str, Any]]) -> UsageQuery:
        if key_name is not None:
            conditions = [*conditions, ("key_name = ", "text", key_name)]
        columns = [groups[name] for name in group_by]
        where = [f"{column}{placeholder(n, kind)}" for n, (column, kind, _) in enumerate(conditions, 1)]
        # Only whitelisted column names and constant fragments are joined; values are bound parameters.
        sql = "SELECT " + "".join(f"{col}, " for col in columns) + sums + " FROM " + table  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        if columns:
            sql += " GROUP BY " + ", ".join(columns)
        return sql, tuple(value for _, _, value in conditions)

    def raw(start: float, end: float) -> UsageQuery:
        conditions = [("submitted_at >= ", "float", start), ("submitted_at < ", "float", end)]
        return query("tasks", TASK_GROUP_COLUMNS, task_sums, conditions)

    if "account" in group_by:  # the per-day rollup has no account: read the task rows themselves (admin reports)
        window: list[tuple[str, str, Any]] = []
        if since is not None:
            window.append(("submitted_at >= ", "float", since))
        if until is not None:
            window.append(("submitted_at < ", "float", until))
        return [query("tasks", TASK_GROUP_COLUMNS, task_sums, window)]
    lo_day = None if since is None else math.ceil(since / 86400)
    hi_day = None if until is None else math.floor(until / 86400)
    if since is not None and until is not None and lo_day is not None and hi_day is not None and lo_day >= hi_day:
        return [raw(since, until)] if since < until else []
    days: list[tuple[str, str, Any]] = []
    if lo_day is not None:
        days.append(("day >= ", "int", lo_day))
    if hi_day is not None:
        days.append(("day < ", "int", hi_day))
    queries = [query("usage_daily", ROLLUP_GROUP_COLUMNS, rollup_sums, days)]
    if since is not None and lo_day is not None and since < lo_day * 86400:
        queries.append(raw(since, lo_day * 86400.0))
    if until is not None and hi_day is not None and hi_day * 86400 < until:
        queries.append(raw(hi_day * 86400.0, until))
    return queries


def add_usage(totals: dict[tuple[Any, ...], list[int]], row: Sequence[Any], width: int) -> None:
    """Add one aggregate row (``width`` group columns, then the measures) to ``totals``; skip groups of no task.

    The measures are integers as both backends return them (PostgreSQL's sums are cast to BIGINT).
    """
    if row[width] == 0:
        return
    key = tuple(row[:width])
    known = totals.get(key)
    if known is None:
        totals[key] = list(row[width:])
    else:
        totals[key] = [a + b for a, b in zip(known, row[width:], strict=True)]


def usage_rows(group_by: tuple[str, ...], totals: Mapping[tuple[Any, ...], list[int]]) -> list[UsageRow]:
    """One ``UsageRow`` per group that has tasks, in group order."""
    rows = []
    # Where each dimension sits in a group's values (-1: not grouped by), found once rather than per row.
    at = {name: group_by.index(name) if name in group_by else -1 for name in USAGE_GROUPS}
    k, m, o, d, a = at["key"], at["model"], at["mode"], at["day"], at["account"]
    for values in sorted(totals):
        tasks, req_s, settled_s, est, settled, cost, completed, failed, unknown, pending, defaulted = totals[values]
        rows.append(
            UsageRow(
                key=None if k < 0 else values[k],
                model=None if m < 0 else values[m],
                mode=None if o < 0 else values[o],
                day=None if d < 0 else day_iso(int(values[d])),
                tasks=tasks,
                requested_seconds=req_s,
                settled_seconds=from_fixed(settled_s),
                estimated_usd=from_fixed(est),
                settled_usd=from_fixed(settled),
                cost_usd=from_fixed(cost),
                completed=completed,
                failed=failed,
                unknown=unknown,
                pending=pending,
                defaulted=defaulted,
                account=None if a < 0 else values[a],
            )
        )
    return rows


OUTBOX_COLUMNS: Final = (
    "delivery_id, key_name, host, url, body, created_at, state, attempts, next_attempt_at, last_error"
)


def outbox_row(record: OutboxRecord) -> tuple[Any, ...]:
    """The ``OUTBOX_COLUMNS`` values of ``record``."""
    return (
        record.delivery_id,
        record.key_name,
        record.host,
        record.url,
        record.body,
        record.created_at,
        record.state,
        record.attempts,
        record.next_attempt_at,
        record.last_error,
    )


def outbox_record(row: Any) -> OutboxRecord:
    """The record of a row selected as ``OUTBOX_COLUMNS``."""
    return OutboxRecord(
        delivery_id=row[0],
        key_name=row[1],
        host=row[2],
        url=row[3],
        body=bytes(row[4]),
        created_at=float(row[5]),
        state=row[6],
        attempts=int(row[7]),
        next_attempt_at=float(row[8]),
        last_error=row[9],
    )


AUDIT_COLUMNS: Final = "audit_id, at, actor, address, action, target, changes"


def audit_row(record: AuditRecord) -> tuple[Any, ...]:
    """The ``AUDIT_COLUMNS`` values of ``record`` (the changes as JSON text)."""
    changes = json.dumps(dict(record.changes), sort_keys=True, separators=(",", ":"))
    return (record.audit_id, record.at, record.actor, record.address, record.action, record.target, changes)


def audit_record(row: Any) -> AuditRecord:
    """The record of a row selected as ``AUDIT_COLUMNS``."""
    return AuditRecord(
        audit_id=row[0],
        at=float(row[1]),
        actor=row[2],
        address=row[3],
        action=row[4],
        target=row[5],
        changes=json.loads(row[6]),
    )


def audit_page_sql(*, has_since: bool, has_cursor: bool, placeholder: Callable[[int], str]) -> str:
    """The newest-first page query of ``audit_log`` (parameters: since?, cursor at and id?, limit)."""
    n = 0

    def next_placeholder() -> str:
        nonlocal n
        n += 1
        return placeholder(n)

    sql = f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1 = 1"  # noqa: S608 - constant columns
    if has_since:
        sql += f" AND at >= {next_placeholder()}"
    if has_cursor:
        sql += f" AND (at, audit_id) < ({next_placeholder()}, {next_placeholder()})"
    return sql + f" ORDER BY at DESC, audit_id DESC LIMIT {next_placeholder()}"
