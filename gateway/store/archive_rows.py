"""The archive ledger's rows: one per completed task whose video is (being) copied to the archive.

Shared by both backends: the schema (SQLite and PostgreSQL types), the SQL (written with ``?``; PostgreSQL's
``$n`` come from :func:`numbered`) and the row-to-record mapping. States: ``claimed`` (one process copies it until
``claim_until``; a claim that has run out, after a crash or a failed attempt's back-off, is taken again),
``stored`` (copied and verified: key, size, SHA-256, time), ``failed`` (given up after the last attempt) and
``removed`` (deleted after ``[archive] keep_days``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from gateway.store.base import ArchiveRecord

ARCHIVE_STATES: Final = ("claimed", "stored", "failed", "removed")


def archive_schema(real: str, bigint: str, text_key: str) -> tuple[str, ...]:
    """The migration's statements, in one backend's types."""
    return (
        f"""CREATE TABLE archives (
            task_id {text_key} PRIMARY KEY,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            claim_until {real},
            archive_key TEXT,
            size {bigint},
            sha256 TEXT,
            archived_at {real},
            error TEXT
        )""",
        "CREATE INDEX archives_stored ON archives (archived_at) WHERE state = 'stored'",
        # The archiver's queue: completed tasks by settlement time.
        "CREATE INDEX tasks_completed ON tasks (settled_at) WHERE outcome = 'completed'",
    )


# The f-strings below only ever splice in this constant column list (ruff S608 cannot know that).
_COLUMNS: Final = "task_id, state, attempts, claim_until, archive_key, size, sha256, archived_at, error"

SQL_CANDIDATES: Final = (
    "SELECT t.task_id, t.settled_at FROM tasks t LEFT JOIN archives a ON a.task_id = t.task_id "
    "WHERE t.outcome = 'completed' AND t.settled_at >= ? "
    "AND (a.task_id IS NULL OR (a.state = 'claimed' AND a.claim_until < ?)) "
    "ORDER BY t.settled_at, t.task_id LIMIT ?"
)
SQL_CLAIM: Final = (
    "INSERT INTO archives (task_id, state, attempts, claim_until) VALUES (?, 'claimed', 0, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET claim_until = excluded.claim_until "
    "WHERE archives.state = 'claimed' AND archives.claim_until < ?"
)
SQL_STORED: Final = (
    "UPDATE archives SET state = 'stored', archive_key = ?, size = ?, sha256 = ?, archived_at = ?, "
    "claim_until = NULL, error = NULL WHERE task_id = ?"
)
SQL_RETRY: Final = (
    "UPDATE archives SET attempts = attempts + 1, state = ?, claim_until = ?, error = ? WHERE task_id = ?"
)
SQL_GET: Final = f"SELECT {_COLUMNS} FROM archives WHERE task_id = ?"  # noqa: S608
SQL_STORED_BEFORE: Final = (
    f"SELECT {_COLUMNS} FROM archives WHERE state = 'stored' AND archived_at < ? ORDER BY archived_at LIMIT ?"  # noqa: S608
)
SQL_REMOVED: Final = "UPDATE archives SET state = 'removed' WHERE task_id = ? AND state = 'stored'"
SQL_SUMMARY: Final = "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM archives GROUP BY state"
SQL_UNARCHIVED: Final = (
    "SELECT COUNT(*) FROM tasks t LEFT JOIN archives a ON a.task_id = t.task_id "
    "WHERE t.outcome = 'completed' AND a.task_id IS NULL"
)
SQL_RETRY_FAILED: Final = "UPDATE archives SET state = 'claimed', claim_until = 0, attempts = 0 WHERE state = 'failed'"
SQL_PAGE: Final = f"SELECT {_COLUMNS} FROM archives WHERE task_id > ? ORDER BY task_id LIMIT ?"  # noqa: S608
SQL_RESTORE: Final = (
    f"INSERT INTO archives ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO NOTHING"  # noqa: S608
)


def numbered(sql: str) -> str:
    """The same statement with PostgreSQL's ``$1, $2, ...`` for each ``?`` in order."""
    count = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _match: f"${next(count)}", sql)


def archive_record(row: Sequence[Any]) -> ArchiveRecord:
    return ArchiveRecord(
        task_id=row[0],
        state=row[1],
        attempts=int(row[2]),
        claim_until=row[3],
        key=row[4],
        size=None if row[5] is None else int(row[5]),
        sha256=row[6],
        archived_at=row[7],
        error=row[8],
    )


def record_row(record: ArchiveRecord) -> tuple[Any, ...]:
    return (
        record.task_id,
        record.state,
        record.attempts,
        record.claim_until,
        record.key,
        record.size,
        record.sha256,
        record.archived_at,
        record.error,
    )


def summary(rows: Sequence[Sequence[Any]], unarchived: int) -> dict[str, tuple[int, int]]:
    """``{state: (tasks, bytes)}`` for every state, plus ``unarchived`` (completed tasks never claimed)."""
    result = dict.fromkeys(ARCHIVE_STATES, (0, 0))
    for state, count, size in rows:
        result[str(state)] = (int(count), int(size))
    result["unarchived"] = (unarchived, 0)
    return result
