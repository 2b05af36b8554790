"""The CLI's shared table renderer: aligned columns, no trailing spaces."""

from __future__ import annotations

from gateway.cli.common import aligned, table


def test_columns_are_aligned_and_lines_end_without_spaces() -> None:
    text = aligned(("name", "rpm", "models"), [["team-a", "60", "*"], ["b", "-", "kling-v3-std-*"]])

    assert text.splitlines() == [
        "name    rpm  models",
        "team-a  60   *",
        "b       -    kling-v3-std-*",
    ]


def test_a_row_of_short_last_cells_is_not_padded() -> None:
    text = table([{"name": "a-long-name", "note": None}, {"name": "b", "note": None}], ("name", "note"))

    assert text.splitlines() == ["name         note", "a-long-name  -", "b            -"]
    assert table([], ("name",)) == "no keys"
