"""Gateway-made errors and their one JSON rendering (the OpenAI-style body of SPEC section 4).

Every error the gateway itself produces is a ``GatewayError`` subclass carrying status, type and ``code``; one
handler renders them. Upstream errors are not ``GatewayError``s: they pass through with the upstream's status and
body. Every code, with its status and meaning, is catalogued in ``gateway.catalog.CODES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong (or worth warning about) in a request: where, which rule, and what to do."""

    param: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"param": self.param, "code": self.code, "message": self.message}


class GatewayError(Exception):
    """An error answered by the gateway itself, rendered as SPEC section 4 JSON."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        errors: Sequence[Problem] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.errors = tuple(errors)
        self.headers = dict(headers or {})

    def body(self, request_id: str | None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
            "request_id": request_id,
        }
        if self.errors:
            error["errors"] = [problem.as_dict() for problem in self.errors]
        return {"error": error}

    def render(self, request_id: str | None) -> bytes:
        return orjson.dumps(self.body(request_id))


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"

    @classmethod
    def from_problems(cls, problems: Sequence[Problem]) -> InvalidRequest:
        """All problems at once; the first one names ``param`` as OpenAI SDKs expect a single one."""
        count = len(problems)
        summary = "; ".join(f"{p.param}: {p.message}" for p in problems)
        noun = "problem" if count == 1 else "problems"
        return cls(
            f"{count} {noun}: {summary}",
            code="invalid_request",
            param=problems[0].param if problems else None,
            errors=problems,
        )


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    default_code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "conflict_error"
    default_code = "idempotency_in_progress"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    default_code = "headers_too_large"


class Unprocessable(GatewayError):
    status = 422
    type = "invalid_request_error"
    default_code = "idempotency_conflict"


class TooManyRequests(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limited"


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_unavailable"
    #: False only when the request certainly never left (connection refused): nothing can have been created.
    request_sent = True


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    default_code = "overloaded"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"
