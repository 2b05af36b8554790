"""Pure pricing: what a task is estimated to cost at submission and what it settles at.

Prices are USD per output second per model, times an optional per-mode multiplier; all money is ``Decimal``.
The shipped defaults (``config.LIST_PRICES_USD_PER_S``) are public list prices: replace them with contract prices.

>>> table = PriceTable.from_settings(PricingSettings())
>>> estimate(table, "kling-v3-std-silent", "text", 5).usd
Decimal('0.420')
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from gateway.catalog import TaskStatus
from gateway.config import PricingSettings

#: A reported number of seconds given as a string: plain decimal digits, no sign, exponent or separators.
_PLAIN_DECIMAL = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")
#: Why a reported number of seconds was not used (the label of ``settlement_anomalies_total``).
ANOMALY_REASONS = ("not_a_number", "not_finite", "below_minimum", "above_requested")
FOUR_PLACES = Decimal("0.0001")
CENTS = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class PriceTable:
    prices: Mapping[str, Decimal]
    mode_multipliers: Mapping[str, Decimal]
    default_duration_s: int

    @classmethod
    def from_settings(cls, settings: PricingSettings) -> PriceTable:
        return cls(dict(settings.prices), dict(settings.mode_multipliers), settings.default_duration_s)

    def price_per_second(self, model: str) -> Decimal:
        """USD per output second; a model without a configured price costs 0 (and ``priced`` says so)."""
        return self.prices.get(model, Decimal(0))

    def priced(self, model: str) -> bool:
        return model in self.prices

    def multiplier(self, mode: str) -> Decimal:
        return self.mode_multipliers.get(mode, Decimal(1))


@dataclass(frozen=True, slots=True)
class Estimate:
    seconds: int
    usd: Decimal
    price_per_second: Decimal
    mode_multiplier: Decimal
    #: True when the request named no duration and ``default_duration_s`` was assumed.
    duration_defaulted: bool


def estimate(table: PriceTable, model: str, mode: str, duration: int | None) -> Estimate:
    """Requested seconds x price x mode multiplier (a missing duration is estimated at the default)."""
    seconds = duration if duration is not None else table.default_duration_s
    price = table.price_per_second(model)
    multiplier = table.multiplier(mode)
    return Estimate(
        seconds=seconds,
        usd=cost(price, multiplier, Decimal(seconds)),
        price_per_second=price,
        mode_multiplier=multiplier,
        duration_defaulted=duration is None,
    )


def cost(price_per_second: Decimal, multiplier: Decimal, seconds: Decimal) -> Decimal:
    """Exact cost; no rounding here (reports round, the ledger keeps the exact amount)."""
    return price_per_second * multiplier * seconds


def bounded_seconds(value: Any, requested: int) -> tuple[Decimal | None, str | None]:
    """An upstream's reported output seconds, if usable, else why not.

    Usable: a finite JSON number (not a boolean) or a plain decimal string, within [1, ``requested``]. Returns
    ``(seconds, None)`` or ``(None, reason)`` with a reason of ``ANOMALY_REASONS``; never raises.

    >>> bounded_seconds("4.5", 5), bounded_seconds(1e308, 5)[1], bounded_seconds("1_000", 5)[1]
    ((Decimal('4.5'), None), 'above_requested', 'not_a_number')
    """
    if isinstance(value, bool):
        return None, "not_a_number"
    if isinstance(value, int):
        seconds = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None, "not_finite"
        seconds = Decimal(repr(value))
    elif isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value):
        seconds = Decimal(value)
    else:
        return None, "not_a_number"
    if seconds < 1:
        return None, "below_minimum"
    if seconds > requested:
        return None, "above_requested"
    return seconds, None


def settlement_seconds(outcome: str, reported: Decimal | None, requested: int) -> Decimal:
    """Seconds a terminal task is billed at: completed → reported (else requested); failed → 0."""
    if outcome == TaskStatus.FAILED:
        return Decimal(0)
    if outcome == TaskStatus.COMPLETED and reported is not None and 0 <= reported <= requested:
        return reported
    return Decimal(requested)


def to_report(amount: Decimal) -> str:
    """Money as reports carry it: 4 decimal places, half-up."""
    return str(amount.quantize(FOUR_PLACES, rounding=ROUND_HALF_UP))


def to_cents(amount: Decimal) -> str:
    return str(amount.quantize(CENTS, rounding=ROUND_HALF_UP))
