"""Pure usage reports: parse a period and a grouping, render ledger usage rows as a table, CSV or JSON.

No I/O here: the CLI (``kling-gateway usage``) and ``GET /gateway/usage`` query
:meth:`gateway.store.base.Store.usage` and hand the rows to :func:`render` / :func:`usage_json`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any, Final

import orjson

from gateway.ledger.pricing import CENTS, FOUR_PLACES, to_cents, to_report
from gateway.store.base import USAGE_GROUPS, UsageRow
from gateway.suggest import did_you_mean

FORMATS: Final = ("table", "csv", "json")
"""Output formats :func:`render` knows."""

COUNT_COLUMNS: Final = ("tasks", "requested_seconds", "completed", "failed", "unknown", "pending", "defaulted")
SECONDS_COLUMNS: Final = ("settled_seconds",)
MONEY_COLUMNS: Final = ("estimated_usd", "settled_usd", "cost_usd")
MEASURES: Final = (
    "tasks",
    "requested_seconds",
    "settled_seconds",
    "estimated_usd",
    "settled_usd",
    "cost_usd",
    "completed",
    "failed",
    "unknown",
    "pending",
    "defaulted",
)
"""Measure columns, in report order (after the grouped dimensions)."""

MILLIS: Final = Decimal("0.001")
_RELATIVE_UNITS: Final = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RELATIVE = re.compile(r"([0-9]{1,6}) *([mhdw])")
_SHOW_MAX = 40
_YEAR_10000: Final = 253_402_300_800.0  # 10000-01-01T00:00:00Z: datetime cannot show it


# ---- parsing ---------------------------------------------------------------------------------------------------


def parse_period(
    since: str | None,
    until: str | None,
    now: float,
    *,
    names: tuple[str, str] = ("--since", "--until"),
) -> tuple[float | None, float | None]:
    """``(since, until)`` as epoch seconds for a half-open window; None (or blank) leaves that side open.

    ``names`` is how errors call the two inputs (``("since", "until")`` for query parameters).

    >>> parse_period("2026-01-05", "2026-01-05", now=0)
    (1767571200.0, 1767657600.0)
    >>> parse_period("7d", None, now=1767657600.0)
    (1767052800.0, None)

    Periods (:func:`parse_period`), all in UTC, half-open ``[since, until)``:

    * ``YYYY-MM-DD`` -- midnight UTC starting that day for ``--since``; for ``--until`` the date is *inclusive*:
      the bound is the next midnight, so ``--since 2026-01-05 --until 2026-01-05`` is that whole day.
    * an ISO-8601 time, ``2026-01-05T12:00:00+01:00`` or ``...Z`` (no offset means UTC) -- that instant, either flag.
    * a relative age ``<N><unit>`` with Prometheus' units ``m`` (minutes), ``h``, ``d``, ``w`` -- ``now`` minus that,
      either flag: ``--since 7d``.
    """
    start = _parse_bound(since, now, names[0], inclusive_day=False)
    end = _parse_bound(until, now, names[1], inclusive_day=True)
    if start is not None and end is not None and start >= end:
        raise ValueError(f"{names[0]} ({iso_time(start)}) must be before {names[1]} ({iso_time(end)})")
    return start, end


def _parse_bound(text: str | None, now: float, name: str, *, inclusive_day: bool) -> float | None:
    if text is None or not text.strip():
        return None
    value = text.strip()
    moment = _parse_moment(value, now, name, inclusive_day=inclusive_day)
    if not 0 <= moment < _YEAR_10000:
        raise ValueError(f"{name}: {_show(value)} is out of range (years 1970 to 9999)")
    return moment


def _parse_moment(value: str, now: float, name: str, *, inclusive_day: bool) -> float:
    if _DATE.fullmatch(value):
        try:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(f"{name}: {_show(value)} is not a valid calendar date") from None
        return day.timestamp() + (86400 if inclusive_day else 0)
    relative = _RELATIVE.fullmatch(value.lower())
    if relative is not None:
        return now - int(relative.group(1)) * _RELATIVE_UNITS[relative.group(2)]
    if len(value) > 10 and value[10] in "Tt ":
        try:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
        except (ValueError, OverflowError):
            raise ValueError(f"{name}: {_show(value)} is not a valid ISO-8601 time") from None
    raise ValueError(
        f"{name}: {_show(value)} is not a date (YYYY-MM-DD), an ISO-8601 time (2026-01-05T12:00:00Z) "
        "or a relative age such as 30m, 24h, 7d, 2w"
    )


def parse_group_by(text: str | None, *, name: str = "--by") -> tuple[str, ...]:
    """Comma-separated dimensions among ``key,model,mode,day``; repeats dropped, order kept; blank -> ``()``.

    >>> parse_group_by("Model, key,model")
    ('model', 'key')
    """
    result: list[str] = []
    for part in (text or "").split(","):
        word = part.strip().lower()
        if not word or word in result:
            continue
        if word not in USAGE_GROUPS:
            hint = did_you_mean(word, USAGE_GROUPS, anagrams=True, cutoff=0.5)
            raise ValueError(
                f"{name}: unknown dimension {_show(part.strip())} (choose from {','.join(USAGE_GROUPS)}){hint}"
            )
        result.append(word)
    return tuple(result)


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 1] + "…")


def iso_time(ts: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with ``Z``: whole seconds when whole, else milliseconds."""
    moment = datetime.fromtimestamp(ts, UTC)
    spec = "seconds" if ts == int(ts) else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


# ---- aggregation and rounding ----------------------------------------------------------------------------------


def totals(rows: Iterable[UsageRow]) -> UsageRow:
    """The sum of ``rows`` as one row with every dimension None (exact, no rounding)."""
    return _sum_rows(list(rows), None, None, None, None)


def rollup(rows: Iterable[UsageRow], group_by: Sequence[str]) -> list[UsageRow]:
    """Re-group rows to a subset of their dimensions (e.g. to drop ``key`` after filtering by it), in first-seen order.

    Dimensions not in ``group_by`` become None.
    """
    _check_group_by(group_by)
    groups: dict[tuple[str | None, ...], list[UsageRow]] = {}
    for row in rows:
        groups.setdefault(tuple(getattr(row, dim) for dim in group_by), []).append(row)
    result = []
    for values, members in groups.items():
        dims = dict(zip(group_by, values, strict=True))
        result.append(_sum_rows(members, dims.get("key"), dims.get("model"), dims.get("mode"), dims.get("day")))
    return result


def _sum_rows(rows: list[UsageRow], key: str | None, model: str | None, mode: str | None, day: str | None) -> UsageRow:
    def total(name: str) -> Any:
        return sum((getattr(row, name) for row in rows), Decimal(0) if name in MONEY_COLUMNS + SECONDS_COLUMNS else 0)

    return UsageRow(key, model, mode, day, **{name: total(name) for name in MEASURES})


def apportion(values: Sequence[Decimal], quantum: Decimal) -> tuple[list[Decimal], Decimal]:
    """Round ``values`` to ``quantum`` so they add up to their rounded (half-up) sum: ``(rows, total)``.

    Largest remainder: every value is rounded down, then the units still missing go one each to the values with the
    largest remainders (earlier rows first on ties). Each result is the floor or ceiling of its value; values already
    multiples of ``quantum`` are never changed.

    >>> apportion([Decimal("0.00004")] * 3, Decimal("0.0001"))
    ([Decimal('0.0001'), Decimal('0.0000'), Decimal('0.0000')], Decimal('0.0001'))
    """
    total = sum(values, Decimal(0)).quantize(quantum, rounding=ROUND_HALF_UP)
    floors = [value.quantize(quantum, rounding=ROUND_FLOOR) for value in values]
    missing = int((total - sum(floors, Decimal(0))) / quantum)
    by_remainder = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for index in by_remainder[:missing]:
        floors[index] += quantum
    return floors, total


# ---- rendering -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cells:
    """Every measure of every row and of the total, as display strings (numbers for counts)."""

    rows: list[dict[str, Any]]
    totals: dict[str, Any]


def _cells(rows: Sequence[UsageRow], money: Callable[[Decimal], str], money_quantum: Decimal) -> _Cells:
    # Column by column (one list per measure), then one dict per row: a report can have thousands of rows.
    columns: list[list[Any]] = []
    out_totals: dict[str, Any] = {}
    for name in MEASURES:
        values = [getattr(row, name) for row in rows]
        if name in COUNT_COLUMNS:
            columns.append(values)
            out_totals[name] = sum(values)
            continue
        is_money = name in MONEY_COLUMNS
        shown, total = apportion(values, money_quantum if is_money else MILLIS)
        text: Callable[[Decimal], str] = money if is_money else _seconds
        columns.append([text(value) for value in shown])
        out_totals[name] = text(total)
    return _Cells([dict(zip(MEASURES, cells, strict=True)) for cells in zip(*columns, strict=True)], out_totals)


def table_cells(rows: Sequence[UsageRow]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each row's measures and the totals as the table shows them (money to cents, rows adding up to the total).

    What ``kling-gateway usage`` prints, for other views of the same report (the admin UI's usage page).
    """
    cells = _cells(rows, to_cents, CENTS)
    return cells.rows, cells.totals


def _seconds(value: Decimal) -> str:
    return str(value.quantize(MILLIS, rounding=ROUND_HALF_UP))


def usage_json(
    rows: Sequence[UsageRow], group_by: Sequence[str], since: float | None, until: float | None
) -> dict[str, Any]:
    """The JSON report: period, grouping, rows with their dimensions, and totals.

    Money is ``Decimal`` throughout. JSON and CSV carry it to 4 decimal places
    (:func:`gateway.ledger.pricing.to_report`), the table to cents; settled seconds go to 3 places (milliseconds).
    Rounding every row on its own can leave rows that do not add up to the rounded total, so each column is
    apportioned by largest remainder: the total is the exact sum rounded half-up, every row is its exact value
    rounded down or up (values already exact are never changed), and the rows add up to the total exactly.

    JSON shape (also the body of ``GET /gateway/usage``)::

        {"since": "2026-01-01T00:00:00Z" | null, "until": "2026-01-08T00:00:00Z" | null,  # until is exclusive
         "group_by": ["key", "model"],
         "rows": [{"key": "team-a", "model": "kling-v3-std-silent",   # only the grouped dimensions, in order
                   "tasks": 3, "requested_seconds": 15, "settled_seconds": "10.000",
                   "estimated_usd": "1.2600", "settled_usd": "0.8400", "cost_usd": "1.2600",
                   "completed": 2, "failed": 0, "unknown": 0, "pending": 1, "defaulted": 1}],
         "totals": {"tasks": 3, "requested_seconds": 15, ...same measures...}}

    CSV: a header row, then one row per group; no totals row (machine readers sum what they need), ``\\n`` line ends.
    Table: aligned columns and a ``TOTAL`` line.
    """
    _check_group_by(group_by)
    cells = _cells(rows, to_report, FOUR_PLACES)
    return {
        "since": None if since is None else iso_time(since),
        "until": None if until is None else iso_time(until),
        "group_by": list(group_by),
        "rows": [
            {**{dim: getattr(row, dim) for dim in group_by}, **measures}
            for row, measures in zip(rows, cells.rows, strict=True)
        ],
        "totals": cells.totals,
    }


def render(
    rows: Sequence[UsageRow],
    group_by: Sequence[str],
    fmt: str,
    *,
    since: float | None = None,
    until: float | None = None,
) -> str:
    """The report as text in ``fmt`` (one of :data:`FORMATS`), ending in a newline; ``since``/``until`` go in JSON."""
    _check_group_by(group_by)
    if fmt == "json":
        return orjson.dumps(usage_json(rows, group_by, since, until), option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        return _render_csv(rows, group_by)
    if fmt == "table":
        return _render_table(rows, group_by)
    raise ValueError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")


def _render_csv(rows: Sequence[UsageRow], group_by: Sequence[str]) -> str:
    cells = _cells(rows, to_report, FOUR_PLACES)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*group_by, *MEASURES])
    for row, measures in zip(rows, cells.rows, strict=True):
        dims = ["" if getattr(row, dim) is None else getattr(row, dim) for dim in group_by]
        writer.writerow([*dims, *(measures[name] for name in MEASURES)])
    return buffer.getvalue()


def _render_table(rows: Sequence[UsageRow], group_by: Sequence[str]) -> str:
    cells = _cells(rows, to_cents, CENTS)
    labels = list(group_by) if group_by else [""]
    header = [*labels, *MEASURES]
    body = [
        [*(("-" if getattr(row, dim) is None else str(getattr(row, dim))) for dim in group_by), *_measures(measures)]
        for row, measures in zip(rows, cells.rows, strict=True)
    ]
    if not group_by:
        body = []  # with no grouping the one row *is* the total
    total_line = ["TOTAL", *([""] * (len(labels) - 1)), *_measures(cells.totals)]
    widths = [max(len(line[i]) for line in [header, *body, total_line]) for i in range(len(header))]
    numeric = [False] * len(labels) + [True] * len(MEASURES)

    def line(cells_: list[str]) -> str:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells_, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = ["  ".join("-" * width for width in widths)] if body else []
    return "\n".join([line(header), *(line(cells_) for cells_ in body), *rule, line(total_line)]) + "\n"


def _measures(measures: dict[str, Any]) -> list[str]:
    return [str(measures[name]) for name in MEASURES]


def _check_group_by(group_by: Sequence[str]) -> None:
    unknown = [dim for dim in group_by if dim not in USAGE_GROUPS]
    if unknown or len(set(group_by)) != len(group_by):
        raise ValueError(f"group_by must be distinct names among {', '.join(USAGE_GROUPS)}, got {list(group_by)!r}")
