"""The Range header, parsed and resolved (pure, one row per rule and edge)."""

from __future__ import annotations

import pytest

from gateway.content.ranges import UNSATISFIABLE, ByteSpan, RangeSpec, parse_content_range, parse_range, resolve


@pytest.mark.parametrize(
    ("header", "spec"),
    [
        (None, None),
        ("bytes=0-99", RangeSpec(0, 99)),
        ("bytes=5-", RangeSpec(5)),
        ("bytes=-20", RangeSpec(None, suffix=20)),
        ("BYTES = 1-2 ", RangeSpec(1, 2)),
        ("bytes=9-3", None),  # last before first: invalid, ignored
        ("bytes=-", None),
        ("bytes=0-1,4-5", None),  # several ranges: served whole
        ("items=0-1", None),
        ("bytes=a-b", None),
        ("bytes=" + "9" * 20 + "-", None),  # absurdly long numbers
        ("", None),
    ],
)
def test_parse_range(header: str | None, spec: RangeSpec | None) -> None:
    assert parse_range(header) == spec


@pytest.mark.parametrize(
    ("spec", "size", "expected"),
    [
        (None, 100, None),
        (RangeSpec(0, 9), 100, ByteSpan(0, 9)),
        (RangeSpec(90, 200), 100, ByteSpan(90, 99)),  # clipped to the end
        (RangeSpec(99), 100, ByteSpan(99, 99)),
        (RangeSpec(100), 100, UNSATISFIABLE),
        (RangeSpec(None, suffix=10), 100, ByteSpan(90, 99)),
        (RangeSpec(None, suffix=500), 100, ByteSpan(0, 99)),
        (RangeSpec(None, suffix=0), 100, UNSATISFIABLE),
        (RangeSpec(0), 0, UNSATISFIABLE),
        (RangeSpec(None, suffix=5), 0, UNSATISFIABLE),
    ],
)
def test_resolve(spec: RangeSpec | None, size: int, expected: object) -> None:
    assert resolve(spec, size) == expected


@pytest.mark.parametrize(
    ("spec", "header"),
    [(RangeSpec(0, 9), "bytes=0-9"), (RangeSpec(7), "bytes=7-"), (RangeSpec(None, suffix=3), "bytes=-3")],
)
def test_spec_round_trips_to_a_header(spec: RangeSpec, header: str) -> None:
    assert spec.header() == header
    assert parse_range(header) == spec


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-9/100", (ByteSpan(0, 9), 100)),
        ("bytes 90-99/100", (ByteSpan(90, 99), 100)),
        ("bytes 90-100/100", None),  # past the end
        ("bytes 9-0/100", None),
        ("bytes */100", None),
        ("bytes 0-9/*", None),
        (None, None),
    ],
)
def test_parse_content_range(value: str | None, expected: object) -> None:
    assert parse_content_range(value) == expected


def test_span_length_and_header() -> None:
    assert ByteSpan(10, 19).length == 10
    assert ByteSpan(10, 19).content_range(50) == "bytes 10-19/50"
