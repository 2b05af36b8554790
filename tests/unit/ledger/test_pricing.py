"""Pricing: estimates for every model and mode, defaults, multipliers, settlement seconds, report rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.config import PricingSettings
from gateway.ledger.pricing import (
    ANOMALY_REASONS,
    PriceTable,
    bounded_seconds,
    cost,
    estimate,
    settlement_seconds,
    to_cents,
    to_report,
)
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
            ("completed", Decimal("4.5"), 5, Decimal("4.5")),
            ("completed", Decimal("5.5"), 5, Decimal(5)),  # over the request: the request
            ("completed", None, 8, Decimal(8)),
            ("failed", Decimal(5), 5, Decimal(0)),
            ("failed", None, 5, Decimal(0)),
            ("unknown", None, 7, Decimal(7)),
        ],
    )
    def test_settlement_seconds(self, outcome: str, reported: Decimal | None, requested: int, seconds: Decimal) -> None:
        """Completed: reported seconds (never over the request), else requested; failed: zero; unknown: estimate."""
        assert settlement_seconds(outcome, reported, requested) == seconds

    @pytest.mark.parametrize(
        ("body", "seconds", "reason"),
        [
            ({"seconds": 9}, Decimal(9), None),
            ({"seconds": "7"}, Decimal(7), None),
            ({"seconds": "7.25"}, Decimal("7.25"), None),
            ({"duration": 6.5}, Decimal("6.5"), None),
            ({"seconds": 1}, Decimal(1), None),
            ({"seconds": 10}, Decimal(10), None),
            ({"video_duration": 4, "seconds": 9}, Decimal(4), None),
            ({"usage": {"output_seconds": 3}, "seconds": 9}, Decimal(3), None),
            ({"status": "completed"}, None, None),
            ({"usage": "lots", "seconds": 2}, Decimal(2), None),
            # unusable: settled at the requested seconds, counted under the reason
            ({"seconds": True}, None, "not_a_number"),
            ({"seconds": "abc"}, None, "not_a_number"),
            ({"seconds": "1_000"}, None, "not_a_number"),
            ({"seconds": "1e3"}, None, "not_a_number"),
            ({"seconds": " 5"}, None, "not_a_number"),
            ({"seconds": "+5"}, None, "not_a_number"),
            ({"seconds": "NaN"}, None, "not_a_number"),
            ({"seconds": "Infinity"}, None, "not_a_number"),
            ({"seconds": "9" * 400}, None, "not_a_number"),
            ({"seconds": [5]}, None, "not_a_number"),
            ({"seconds": {"value": 5}}, None, "not_a_number"),
            ({"seconds": float("nan")}, None, "not_finite"),
            ({"seconds": float("inf")}, None, "not_finite"),
            ({"seconds": -1}, None, "below_minimum"),
            ({"seconds": 0}, None, "below_minimum"),
            ({"seconds": 0.5}, None, "below_minimum"),
            ({"seconds": 11}, None, "above_requested"),
            ({"seconds": 1e308}, None, "above_requested"),
            ({"seconds": 10**400}, None, "above_requested"),
            ({"usage": {"output_seconds": 10**30}, "seconds": 4}, None, "above_requested"),
            ({"seconds": "10.000000001"}, None, "above_requested"),
        ],
    )
    def test_reported_seconds(self, body: dict[str, object], seconds: Decimal | None, reason: str | None) -> None:
        """Reported seconds count only as a finite number or plain decimal string in [1, requested] (here 10)."""
        assert reported_seconds(body, 10) == (seconds, reason)

    @pytest.mark.parametrize("reason", ANOMALY_REASONS)
    def test_every_reason_is_reachable(self, reason: str) -> None:
        """Each anomaly reason (a metric label) has a value that produces it."""
        samples = {"not_a_number": "x", "not_finite": float("inf"), "below_minimum": 0, "above_requested": 99}
        assert bounded_seconds(samples[reason], 5) == (None, reason)


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
