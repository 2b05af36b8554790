"""The validation stage of a submission (and of ``POST /gateway/validate``): the rules, then the media-host check.

The rules (``checks.validate``) are pure; the bounded DNS check of media hosts runs only for a request the rules
accept and only when ``[validation]`` asks for it. A refused request counts each problem in
``kling_gateway_validation_problems_total`` and answers 400 with every problem found.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest
from gateway.metrics import Metrics
from gateway.validation.checks import ValidationOptions, ValidationResult, ValidRequest, validate
from gateway.validation.media_guard import MediaGuard


class RequestChecks:
    """Validates request bodies with the app's options and media guard (None: no DNS check)."""

    def __init__(self, options: ValidationOptions, media_guard: MediaGuard | None, metrics: Metrics) -> None:
        self._options = options
        self._media_guard = media_guard
        self._problems = metrics.validation_problems

    async def validated(self, body: dict[str, Any]) -> ValidationResult:
        """Pure validation, then (for names only) the bounded DNS check of media hosts."""
        result = validate(body, self._options)
        if result.request is not None and result.request.media_hosts and self._media_guard is not None:
            problems = await self._media_guard.check(result.request)
            if problems:
                return ValidationResult(request=None, problems=problems, warnings=result.warnings)
        return result

    def require_valid(self, result: ValidationResult) -> ValidRequest:
        """The valid request, or 400 with every problem (each counted)."""
        if result.request is None:
            for problem in result.problems:
                self._problems.labels(problem.code).inc()
            raise InvalidRequest.from_problems(result.problems)
        return result.request
