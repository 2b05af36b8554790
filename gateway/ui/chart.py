"""The usage page's bar chart, laid out on the server: one bar per row, heights scaled to the largest value.

Pure geometry; the template draws the bars as inline SVG (no script, no external request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

WIDTH = 600
HEIGHT = 160
_LABEL_BAND = 20
_MAX_BAR_WIDTH = 60.0
MAX_BARS = 40


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: its box in the SVG's coordinates, the label under it and the value it stands for."""

    x: float
    y: float
    width: float
    height: float
    label: str
    value: str


def bars(points: Sequence[tuple[str, Decimal, str]]) -> list[Bar]:
    """Bars for ``(label, value, shown value)`` points (the first :data:`MAX_BARS`); negative values count as 0.

    >>> [round(b.height) for b in bars([("a", Decimal(1), "1"), ("b", Decimal(2), "2")])]
    [70, 140]
    """
    shown = list(points)[:MAX_BARS]
    if not shown:
        return []
    top = max((max(value, Decimal(0)) for _, value, _ in shown), default=Decimal(0))
    plot = HEIGHT - _LABEL_BAND
    slot = WIDTH / len(shown)
    result = []
    for index, (label, value, text) in enumerate(shown):
        height = 0.0 if top <= 0 else float(max(value, Decimal(0)) / top) * plot
        width = min(slot * 0.8, _MAX_BAR_WIDTH)
        result.append(Bar(index * slot + (slot - width) / 2, plot - height, width, height, label, text))
    return result
