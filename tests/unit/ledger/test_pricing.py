"""Pricing: estimates for every model and mode, defaults, multipliers, settlement seconds, report rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.config import PricingSettings
from gateway.ledger.pricing import PriceTable, cost, estimate, settlement_seconds, to_cents, to_report
from gateway.ledger.service import month_bounds, reported_seconds

LIST = PriceTable.from_settings(PricingSettings())
MODELS = {
    "kling-v3-std-silent": Decimal("0.084"),
    "kling-v3-std-audio": Decimal("0.126"),
    "kling-v3-pro-silent": Decimal("0.112"),
    "kling-v3-pro-audio": Decimal("0.168"),
}


class TestEstimates:
    @pytest.mark.parametrize("model", list(MODELS))
    @pytest.mark.parametrize("mode", ["text", "image", "first_last"])
    @pytest.mark.parametrize("duration", [3, 5, 15])
    def test_list_prices_every_model_and_mode(self, model: str, mode: str, duration: int) -> None:
        """Requested seconds x list price x multiplier 1, exactly, for every model and mode."""
        est = estimate(LIST, model, mode, duration)
        assert est.usd == MODELS[model] * duration
        assert (est.seconds, est.price_per_second, est.mode_multiplier, est.duration_defaulted) == (
            duration,
            MODELS[model],
            Decimal(1),
            False,
        )

    @pytest.mark.parametrize(("default", "expected"), [(5, Decimal("0.560")), (10, Decimal("1.120"))])
    def test_missing_duration_uses_default_and_is_flagged(self, default: int, expected: Decimal) -> None:
        """No duration: estimated at default_duration_s and flagged as defaulted."""
        table = PriceTable.from_settings(PricingSettings(default_duration_s=default))
        est = estimate(table, "kling-v3-pro-silent", "text", None)
        assert (est.seconds, est.usd, est.duration_defaulted) == (default, expected, True)

    @pytest.mark.parametrize(
        ("mode", "expected"),
        [("text", Decimal("0.420")), ("image", Decimal("0.504")), ("first_last", Decimal("0.630"))],
    )
    def test_mode_multipliers(self, mode: str, expected: Decimal) -> None:
        """A per-mode multiplier scales the estimate for that mode only."""
        table = PriceTable.from_settings(
            PricingSettings(
                mode_multipliers={"text": Decimal(1), "image": Decimal("1.2"), "first_last": Decimal("1.5")}
            )
        )
        assert estimate(table, "kling-v3-std-silent", mode, 5).usd == expected

    def test_unpriced_model_costs_zero_and_says_so(self) -> None:
        """A pass-through model without a price is estimated at 0 and reported as unpriced."""
        assert estimate(LIST, "other-model", "text", 5).usd == 0
        assert not LIST.priced("other-model") and LIST.priced("kling-v3-std-silent")

    def test_money_is_decimal_never_float(self) -> None:
        """0.084 x 3 is exactly 0.252 (float would say 0.25200000000000006)."""
        assert cost(Decimal("0.084"), Decimal(1), Decimal(3)) == Decimal("0.252")


class TestSettlement:
    @pytest.mark.parametrize(
        ("outcome", "reported", "requested", "seconds"),
        [
            ("completed", Decimal(9), 10, Decimal(9)),
            ("completed", Decimal("5.5"), 5, Decimal("5.5")),
            ("completed", None, 8, Decimal(8)),
            ("failed", Decimal(5), 5, Decimal(0)),
            ("failed", None, 5, Decimal(0)),
            ("unknown", None, 7, Decimal(7)),
        ],
    )
    def test_settlement_seconds(self, outcome: str, reported: Decimal | None, requested: int, seconds: Decimal) -> None:
        """Completed: reported seconds, else requested; failed: zero; unknown: the estimate's seconds."""
        assert settlement_seconds(outcome, reported, requested) == seconds

    @pytest.mark.parametrize(
        ("body", "seconds"),
        [
            ({"seconds": 9}, Decimal(9)),
            ({"seconds": "7"}, Decimal(7)),
            ({"duration": 6.5}, Decimal("6.5")),
            ({"video_duration": 4, "seconds": 9}, Decimal(4)),
            ({"usage": {"output_seconds": 3}, "seconds": 9}, Decimal(3)),
            ({"seconds": True}, None),
            ({"seconds": "abc"}, None),
            ({"seconds": -1}, None),
            ({"status": "completed"}, None),
        ],
    )
    def test_reported_seconds(self, body: dict[str, object], seconds: Decimal | None) -> None:
        """Output seconds are read from the fields an upstream may use; junk is ignored."""
        assert reported_seconds(body) == seconds


class TestReporting:
    @pytest.mark.parametrize(
        ("amount", "four", "two"),
        [
            (Decimal("0.252"), "0.2520", "0.25"),
            (Decimal("1.00005"), "1.0001", "1.00"),
            (Decimal("0.125"), "0.1250", "0.13"),
        ],
    )
    def test_rounding(self, amount: Decimal, four: str, two: str) -> None:
        """Reports carry 4 decimal places (half-up); tables may round to cents."""
        assert (to_report(amount), to_cents(amount)) == (four, two)

    @pytest.mark.parametrize(
        ("now", "start", "end"),
        [
            (1769904000.0, 1769904000.0, 1772323200.0),  # 2026-02-01 00:00 UTC: February
            (1772323199.0, 1769904000.0, 1772323200.0),  # last second of February
            (1767225599.0, 1764547200.0, 1767225600.0),  # 2025-12-31 23:59:59: December
        ],
    )
    def test_budget_month_is_the_utc_calendar_month(self, now: float, start: float, end: float) -> None:
        """Budgets run per UTC calendar month."""
        assert month_bounds(now) == (start, end)
