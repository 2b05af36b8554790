"""Usage reports: period and grouping parsing, largest-remainder rounding, and the three output formats."""

from __future__ import annotations

import csv
import io
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.ledger.pricing import CENTS, FOUR_PLACES, to_cents, to_report
from gateway.ledger.reports import (
    MEASURES,
    MILLIS,
    apportion,
    iso_time,
    parse_group_by,
    parse_period,
    render,
    rollup,
    totals,
    usage_json,
)
from gateway.store import open_store
from gateway.store.base import TaskRecord, UsageRow

DAY = 86400.0
JAN5 = 1_767_571_200.0  # 2026-01-05T00:00:00Z
NOW = JAN5 + 12 * 3600  # 2026-01-05T12:00:00Z
MONEY = ("estimated_usd", "settled_usd", "cost_usd")
COUNTS = ("tasks", "requested_seconds", "completed", "failed", "unknown", "pending", "defaulted")


def row(
    key: str | None = None,
    model: str | None = None,
    mode: str | None = None,
    day: str | None = None,
    *,
    tasks: int = 1,
    seconds: int = 5,
    settled_seconds: str = "5",
    estimated: str = "0.42",
    settled: str = "0.42",
    cost: str = "0.42",
    completed: int = 1,
    failed: int = 0,
    unknown: int = 0,
    pending: int = 0,
    defaulted: int = 0,
) -> UsageRow:
    return UsageRow(
        key,
        model,
        mode,
        day,
        tasks,
        seconds,
        Decimal(settled_seconds),
        Decimal(estimated),
        Decimal(settled),
        Decimal(cost),
        completed,
        failed,
        unknown,
        pending,
        defaulted,
    )


def awkward_rows(count: int, seed: int) -> list[UsageRow]:
    """Rows whose amounts have 9 decimal places, so naive per-row rounding would not add up."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        fraction = Decimal(rng.randrange(0, 10**9)).scaleb(-9)
        settled_s = Decimal(rng.randrange(0, 15_000_000_000)).scaleb(-9)
        rows.append(
            row(
                f"key-{i:02d}",
                "kling-v3-pro-audio",
                tasks=rng.randrange(1, 50),
                seconds=rng.randrange(3, 500),
                settled_seconds=str(settled_s),
                estimated=str(Decimal(rng.randrange(0, 100)) + fraction),
                settled=str(fraction),
                cost=str(Decimal(rng.randrange(0, 100)) + fraction / 3),
                completed=rng.randrange(0, 5),
                failed=rng.randrange(0, 5),
                unknown=rng.randrange(0, 2),
                pending=rng.randrange(0, 3),
                defaulted=rng.randrange(0, 3),
            )
        )
    return rows


def exact_total(rows: list[UsageRow], name: str) -> Decimal:
    return sum((getattr(r, name) for r in rows), Decimal(0))


class TestParsePeriod:
    @pytest.mark.parametrize(
        ("since", "until", "expected"),
        [
            (None, None, (None, None)),
            ("", "  ", (None, None)),
            ("2026-01-05", None, (JAN5, None)),
            (None, "2026-01-05", (None, JAN5 + DAY)),  # --until DATE includes that whole day
            ("2026-01-05", "2026-01-05", (JAN5, JAN5 + DAY)),
            ("2026-01-05", "2026-01-06", (JAN5, JAN5 + 2 * DAY)),
            (" 2026-01-05 ", None, (JAN5, None)),
            ("2026-01-05T06:00:00Z", None, (JAN5 + 6 * 3600, None)),
            ("2026-01-05T06:00:00+01:00", None, (JAN5 + 5 * 3600, None)),
            ("2026-01-05T06:00:00-02:30", None, (JAN5 + 8.5 * 3600, None)),
            ("2026-01-05T06:00:00", None, (JAN5 + 6 * 3600, None)),  # no offset: UTC
            ("2026-01-05 06:00", None, (JAN5 + 6 * 3600, None)),
            ("2026-01-05T06:00:00.250Z", None, (JAN5 + 6 * 3600 + 0.25, None)),
            (None, "2026-01-05T06:00:00Z", (None, JAN5 + 6 * 3600)),  # an instant is exclusive as given
            ("30m", None, (NOW - 1800, None)),
            ("24h", None, (NOW - DAY, None)),
            ("7d", None, (NOW - 7 * DAY, None)),
            ("2w", None, (NOW - 14 * DAY, None)),
            ("7D", None, (NOW - 7 * DAY, None)),
            ("0h", None, (NOW, None)),
            ("7d", "1d", (NOW - 7 * DAY, NOW - DAY)),
            ("2026-01-01", "6h", (JAN5 - 4 * DAY, NOW - 6 * 3600)),
        ],
    )
    def test_accepted_forms(
        self, since: str | None, until: str | None, expected: tuple[float | None, float | None]
    ) -> None:
        """Dates, ISO-8601 times with or without an offset, and relative ages parse to UTC epoch bounds."""
        assert parse_period(since, until, NOW) == expected

    @pytest.mark.parametrize(
        ("since", "until", "message"),
        [
            ("yesterday", None, "--since: 'yesterday' is not a date (YYYY-MM-DD)"),
            (None, "2026-13-01", "--until: '2026-13-01' is not a valid calendar date"),
            ("2026-02-30", None, "--since: '2026-02-30' is not a valid calendar date"),
            ("2026-01-05T25:00", None, "--since: '2026-01-05T25:00' is not a valid ISO-8601 time"),
            ("7 days", None, "relative age such as 30m, 24h, 7d, 2w"),
            ("-7d", None, "--since: '-7d' is not a date"),
            ("7y", None, "--since: '7y'"),
            ("1.5d", None, "--since: '1.5d'"),
            ("1969-12-31", None, "--since: '1969-12-31' is out of range"),
            (None, "9999-12-31", "--until: '9999-12-31' is out of range"),
            ("99999w", None, "--since: '99999w' is out of range"),
            (
                "2026-01-06",
                "2026-01-05",
                "--since (2026-01-06T00:00:00Z) must be before --until (2026-01-06T00:00:00Z)",
            ),
            ("2026-01-05T12:00:00Z", "0h", "must be before --until"),
            ("x" * 500, None, "'" + "x" * 39 + "…'"),
        ],
    )
    def test_rejected_with_flag_named(self, since: str | None, until: str | None, message: str) -> None:
        """Every unusable bound is a ValueError naming the flag and echoing (at most 40 characters of) the input."""
        with pytest.raises(ValueError) as info:
            parse_period(since, until, NOW)
        assert message in str(info.value)
        assert len(str(info.value)) < 200

    def test_query_parameter_names(self) -> None:
        """The HTTP endpoint can have errors name its query parameters instead of the CLI flags."""
        with pytest.raises(ValueError, match=r"^until: 'soon'"):
            parse_period(None, "soon", NOW, names=("since", "until"))


class TestParseGroupBy:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (None, ()),
            ("", ()),
            ("key", ("key",)),
            ("key,model", ("key", "model")),
            ("model,key", ("model", "key")),
            ("day, mode ,key,model", ("day", "mode", "key", "model")),
            ("KEY,Model", ("key", "model")),
            ("key,key,model,key", ("key", "model")),
            ("key,,model,", ("key", "model")),
        ],
    )
    def test_accepted(self, text: str | None, expected: tuple[str, ...]) -> None:
        """A comma list of known dimensions, case-insensitive, repeats and blanks dropped, order kept."""
        assert parse_group_by(text) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (
                "modle",
                "--by: unknown dimension 'modle' (choose from key,model,mode,day,account); did you mean 'model'?",
            ),
            ("key,keys", "unknown dimension 'keys' (choose from key,model,mode,day,account); did you mean 'key'?"),
            ("days", "did you mean 'day'?"),
            ("tier", "--by: unknown dimension 'tier' (choose from key,model,mode,day,account)"),
        ],
    )
    def test_unknown_dimension(self, text: str, message: str) -> None:
        """An unknown dimension is a ValueError listing the choices, with a hint when one is close."""
        with pytest.raises(ValueError) as info:
            parse_group_by(text)
        assert message in str(info.value)

    def test_no_hint_when_nothing_is_close(self) -> None:
        """No misleading hint for a word unlike every dimension."""
        with pytest.raises(ValueError) as info:
            parse_group_by("status", name="by")
        assert str(info.value) == "by: unknown dimension 'status' (choose from key,model,mode,day,account)"


class TestApportion:
    @pytest.mark.parametrize(
        ("values", "quantum", "rows", "total"),
        [
            ([], FOUR_PLACES, [], "0.0000"),
            (["0.42", "0.84"], FOUR_PLACES, ["0.4200", "0.8400"], "1.2600"),
            (["0.00004", "0.00004", "0.00004"], FOUR_PLACES, ["0.0001", "0.0000", "0.0000"], "0.0001"),
            (["0.00004", "0.00006", "0.00004"], FOUR_PLACES, ["0.0000", "0.0001", "0.0000"], "0.0001"),
            (["0.005", "0.005", "0.005"], CENTS, ["0.01", "0.01", "0.00"], "0.02"),
            (["1.004", "2.004", "3"], CENTS, ["1.01", "2.00", "3.00"], "6.01"),
            (["0.00005"], FOUR_PLACES, ["0.0001"], "0.0001"),  # one row: plain half-up
            (["1.23456789", "0"], FOUR_PLACES, ["1.2346", "0.0000"], "1.2346"),
        ],
    )
    def test_table(self, values: list[str], quantum: Decimal, rows: list[str], total: str) -> None:
        """Rows add up to the half-up rounded total; exact values stay as they are."""
        got_rows, got_total = apportion([Decimal(v) for v in values], quantum)
        assert [str(v) for v in got_rows] == rows
        assert str(got_total) == total

    @pytest.mark.parametrize("seed", range(20))
    def test_random_rows_add_up_and_stay_within_one_unit(self, seed: int) -> None:
        """For any values, rows sum to the rounded total and each is its value's floor or ceiling."""
        rng = random.Random(seed)
        values = [Decimal(rng.randrange(0, 10**12)).scaleb(-9) for _ in range(rng.randrange(1, 60))]
        for quantum in (FOUR_PLACES, CENTS, MILLIS):
            shown, total = apportion(values, quantum)
            assert sum(shown, Decimal(0)) == total == sum(values, Decimal(0)).quantize(quantum, ROUND_HALF_UP)
            for exact, got in zip(values, shown, strict=True):
                assert abs(got - exact) < quantum
                assert got == exact or exact % quantum != 0


class TestTotalsAndRollup:
    def test_totals_sum_every_measure(self) -> None:
        """totals() is the exact column sum with every dimension None."""
        rows = awkward_rows(7, seed=1)
        total = totals(rows)
        assert (total.key, total.model, total.mode, total.day) == (None, None, None, None)
        for name in MEASURES:
            assert getattr(total, name) == sum((getattr(r, name) for r in rows), type(getattr(total, name))(0))

    def test_rollup_drops_dimensions(self) -> None:
        """Rolling key,model rows up to model sums the keys of each model, in first-seen order."""
        rows = [
            row("a", "kling-v3-std-silent", estimated="1.1"),
            row("a", "kling-v3-pro-audio", estimated="2"),
            row("b", "kling-v3-std-silent", estimated="0.0000001"),
        ]
        got = rollup(rows, ("model",))
        assert [(r.key, r.model, r.estimated_usd, r.tasks) for r in got] == [
            (None, "kling-v3-std-silent", Decimal("1.1000001"), 2),
            (None, "kling-v3-pro-audio", Decimal("2"), 1),
        ]
        assert rollup(rows, ()) == [totals(rows)]

    def test_rollup_rejects_unknown_dimension(self) -> None:
        """Only the store's dimensions can be grouped by."""
        with pytest.raises(ValueError, match="group_by"):
            rollup([], ("tier",))


def parse_table(text: str) -> tuple[list[str], list[list[str]], list[str]]:
    lines = text.rstrip("\n").split("\n")
    header = lines[0].split()
    body = [line.split() for line in lines[1:] if not line.startswith("-")]
    return header, body[:-1], body[-1]


class TestTotalsEqualRows:
    @pytest.mark.parametrize("seed", range(5))
    def test_json(self, seed: int) -> None:
        """JSON totals are the sum of the JSON rows and the exact ledger total rounded to 4 places."""
        rows = awkward_rows(25, seed)
        report = orjson.loads(render(rows, ("key", "model"), "json"))
        for name in MONEY:
            shown = [Decimal(r[name]) for r in report["rows"]]
            assert all(r[name] == to_report(Decimal(r[name])) for r in report["rows"])  # exactly 4 places
            assert sum(shown, Decimal(0)) == Decimal(report["totals"][name])
            assert report["totals"][name] == to_report(exact_total(rows, name))
        assert sum(Decimal(r["settled_seconds"]) for r in report["rows"]) == Decimal(
            report["totals"]["settled_seconds"]
        )
        for name in COUNTS:
            assert sum(r[name] for r in report["rows"]) == report["totals"][name] == exact_total(rows, name)

    @pytest.mark.parametrize("seed", range(5))
    def test_csv(self, seed: int) -> None:
        """CSV rows (no totals row) sum to the JSON totals, column by column, as Decimals."""
        rows = awkward_rows(25, seed)
        parsed = list(csv.DictReader(io.StringIO(render(rows, ("key", "model"), "csv"))))
        expected = usage_json(rows, ("key", "model"), None, None)["totals"]
        assert len(parsed) == len(rows)
        for name in MEASURES:
            assert str(sum(Decimal(r[name]) for r in parsed)) == str(expected[name])
        for name in MONEY:
            assert sum(Decimal(r[name]) for r in parsed) == Decimal(to_report(exact_total(rows, name)))

    @pytest.mark.parametrize("seed", range(5))
    def test_table(self, seed: int) -> None:
        """Table rows (in cents) sum to its TOTAL line, which is the exact total rounded to cents."""
        rows = awkward_rows(25, seed)
        header, body, total = parse_table(render(rows, ("key", "model"), "table"))
        assert header == ["key", "model", *MEASURES]
        assert total[0] == "TOTAL" and len(body) == len(rows)
        for index, name in enumerate(MEASURES):
            column = 2 + index
            shown = [Decimal(line[column]) for line in body]
            assert sum(shown, Decimal(0)) == Decimal(total[column - 1])  # TOTAL line has no blank model cell
            if name in MONEY:
                assert total[column - 1] == to_cents(exact_total(rows, name))

    @pytest.mark.parametrize("fmt", ["table", "csv", "json"])
    async def test_against_a_real_ledger(self, tmp_path: Path, fmt: str) -> None:
        """Tasks recorded and settled in the SQLite ledger report totals equal to the sum of their rows."""
        store = await open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
        try:
            expected = Decimal(0)
            rng = random.Random(7)
            for i in range(40):
                model = rng.choice(["kling-v3-std-silent", "kling-v3-pro-audio"])
                price = Decimal("0.084") if model.endswith("silent") else Decimal("0.168")
                task = TaskRecord(
                    task_id=f"t{i}",
                    key_name=rng.choice(["team-a", "team-b", "team-c"]),
                    model=model,
                    mode=rng.choice(["text", "image", "first_last"]),
                    tier=model.split("-")[2],
                    audio=model.endswith("audio"),
                    duration=5,
                    duration_defaulted=False,
                    estimate_seconds=5,
                    estimate_usd=price * 5,
                    price_per_second_usd=price,
                    mode_multiplier=Decimal(1),
                    request_id=f"r{i}",
                    submitted_at=JAN5 + i * 3600,
                )
                await store.record_intent(f"i{i}", task.key_name, task.request_id, model, task.mode, task.submitted_at)
                await store.resolve_intent(f"i{i}", task)
                if i % 3 == 0:
                    seconds = Decimal(rng.randrange(3000, 6000)) / 1000  # fractional output seconds
                    await store.settle(task.task_id, "completed", seconds, price * seconds, None, JAN5 + DAY * 3)
                    expected += price * seconds
                elif i % 3 == 1:
                    await store.settle(task.task_id, "failed", Decimal(0), Decimal(0), None, JAN5 + DAY * 3)
                else:
                    expected += task.estimate_usd
            rows = await store.usage(group_by=("key", "model", "mode", "day"))
        finally:
            await store.close()
        text = render(rows, ("key", "model", "mode", "day"), fmt)
        if fmt == "json":
            report = orjson.loads(text)
            shown, total = [Decimal(r["cost_usd"]) for r in report["rows"]], report["totals"]["cost_usd"]
            assert total == to_report(expected)
        elif fmt == "csv":
            shown = [Decimal(r["cost_usd"]) for r in csv.DictReader(io.StringIO(text))]
            total = to_report(expected)
        else:
            _, body, total_line = parse_table(text)
            column = 4 + MEASURES.index("cost_usd")
            shown, total = [Decimal(line[column]) for line in body], total_line[column - 3]
            assert total == to_cents(expected)
        assert sum(shown, Decimal(0)) == Decimal(total)


class TestShape:
    def test_json_shape(self) -> None:
        """The JSON report has exactly the documented keys; rows carry only the grouped dimensions, in order."""
        rows = [row("team-a", "kling-v3-std-silent", "text", "2026-01-05", settled_seconds="5.0415")]
        report: dict[str, Any] = usage_json(rows, ("model", "key"), JAN5, JAN5 + DAY)
        assert list(report) == ["since", "until", "group_by", "rows", "totals"]
        assert report["since"] == "2026-01-05T00:00:00Z" and report["until"] == "2026-01-06T00:00:00Z"
        assert report["group_by"] == ["model", "key"]
        assert list(report["rows"][0]) == ["model", "key", *MEASURES]
        assert report["rows"][0]["settled_seconds"] == "5.042"
        assert report["rows"][0]["estimated_usd"] == "0.4200"
        assert report["rows"][0]["tasks"] == 1
        assert list(report["totals"]) == list(MEASURES)
        assert orjson.loads(render(rows, ("model", "key"), "json", since=JAN5, until=JAN5 + DAY)) == report

    def test_open_period_is_null(self) -> None:
        """An open side of the period is null, and an ungrouped report has one row without dimensions."""
        report = usage_json([row()], (), None, None)
        assert (report["since"], report["until"], report["group_by"]) == (None, None, [])
        assert list(report["rows"][0]) == list(MEASURES)

    @pytest.mark.parametrize(
        ("ts", "text"),
        [(JAN5, "2026-01-05T00:00:00Z"), (JAN5 + 0.25, "2026-01-05T00:00:00.250Z"), (0.0, "1970-01-01T00:00:00Z")],
    )
    def test_iso_time(self, ts: float, text: str) -> None:
        """Bounds print as UTC with Z, with milliseconds only when not whole seconds."""
        assert iso_time(ts) == text

    def test_empty_report(self) -> None:
        """No rows: CSV is the header alone, JSON totals are zero, the table shows a zero TOTAL."""
        assert render([], ("key",), "csv") == "key," + ",".join(MEASURES) + "\n"
        assert usage_json([], ("key",), None, None)["totals"]["cost_usd"] == "0.0000"
        lines = render([], ("key",), "table").splitlines()
        assert len(lines) == 2 and lines[1].split()[0] == "TOTAL"

    def test_ungrouped_table_is_just_the_total(self) -> None:
        """With no grouping the table is a header and one TOTAL line with money in cents."""
        lines = render([row(estimated="0.425")], (), "table").splitlines()
        assert len(lines) == 2
        assert lines[1].split()[:5] == ["TOTAL", "1", "5", "5.000", "0.43"]

    def test_table_columns_align(self) -> None:
        """Every table line is as wide as the header, numbers right-aligned under their headings."""
        rows = [row("a", estimated="1234.5"), row("a-much-longer-key-name", estimated="0.1")]
        lines = render(rows, ("key",), "table").splitlines()
        assert len({len(line) for line in lines}) == 1
        assert lines[1].endswith(" 0") and lines[-1].startswith("TOTAL ")

    def test_csv_blank_for_missing_dimension(self) -> None:
        """A grouped dimension without a value is an empty CSV cell and null in JSON."""
        assert render([row()], ("key",), "csv").splitlines()[1].startswith(",1,5,")
        assert usage_json([row()], ("key",), None, None)["rows"][0]["key"] is None

    @pytest.mark.parametrize(("fmt", "group_by"), [("xml", ()), ("json", ("tier",)), ("csv", ("key", "key"))])
    def test_bad_arguments(self, fmt: str, group_by: tuple[str, ...]) -> None:
        """An unknown format or grouping is a ValueError, never a half-rendered report."""
        with pytest.raises(ValueError):
            render([], group_by, fmt)
