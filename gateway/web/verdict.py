"""The validation answer shared by ``POST /gateway/validate`` and ``kling-gateway validate``."""

from __future__ import annotations

from typing import Any

from gateway.errors import Problem
from gateway.ledger.pricing import PriceTable, estimate, to_report
from gateway.validation.checks import ValidationResult


def verdict(result: ValidationResult, prices: PriceTable) -> dict[str, Any]:
    """``{"valid", "errors", "warnings", "normalized", "estimate"}`` for one validated body."""
    valid = result.request
    answer: dict[str, Any] = {
        "valid": result.valid,
        "errors": [p.as_dict() for p in result.problems],
        "warnings": [p.as_dict() for p in result.warnings],
        "normalized": valid.body if valid else None,
        "estimate": None,
    }
    if valid is not None:
        est = estimate(prices, valid.model, valid.mode, valid.duration)
        answer["estimate"] = {
            "seconds": est.seconds,
            "usd": to_report(est.usd),
            "duration_defaulted": est.duration_defaulted,
            "priced": prices.priced(valid.model),
            "mode": valid.mode,
            "tier": valid.tier,
            "audio": valid.audio,
        }
    return answer


def unparseable(message: str) -> dict[str, Any]:
    """The answer for a body that is not JSON at all."""
    problem = Problem(param="body", code="invalid_json", message=message)
    return {
        "valid": False,
        "errors": [problem.as_dict()],
        "warnings": [],
        "normalized": None,
        "estimate": None,
    }
