"""Turning exceptions into the gateway's JSON error responses (shared by Starlette's handlers and the fast lane).

``GatewayError`` renders as itself (its ``code`` goes on the access line; counted in
``kling_gateway_rejections_total`` when it is the caller's fault or a deliberate 503); a ``StoreError`` becomes
503 ``store_unavailable`` (nothing was forwarded); Starlette's own ``HTTPException`` (404 no route, 405 wrong
method) gets the same error shape with a stable code.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, ServiceUnavailable
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.store.base import StoreError
from gateway.web.middleware import log_fields, request_id_of

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_JSON = "application/json"


class ErrorResponder:
    """The app's exception handlers, bound to its metrics and logger."""

    def __init__(self, metrics: Metrics, log: Logger) -> None:
        self._metrics = metrics
        self._log = log

    def respond(self, request: Request, exc: Exception) -> Response | None:
        """The error response for ``exc``, or None when it is not one the gateway answers itself."""
        if isinstance(exc, GatewayError):
            return self.gateway_error_response(request, exc)
        if isinstance(exc, StoreError):
            return self.store_error_response(request, exc)
        if isinstance(exc, HTTPException):
            return self.http_error_response(request, exc)
        return None

    def gateway_error_response(self, request: Request, exc: GatewayError) -> Response:
        log_fields(request.scope)["code"] = exc.code  # the access line tells a budget refusal from a rate limit
        if exc.status < 500 or exc.status == 503:
            self._metrics.rejections.labels(exc.code).inc()
        return Response(
            exc.render(request_id_of(request.scope)), status_code=exc.status, headers=exc.headers, media_type=_JSON
        )

    def store_error_response(self, request: Request, exc: StoreError) -> Response:
        self._log.error("store_error", error=str(exc), path=request.url.path)
        return self.gateway_error_response(
            request,
            ServiceUnavailable(
                "The gateway's store is unavailable; nothing was forwarded. Retry shortly.",
                code="store_unavailable",
                headers={"Retry-After": "1"},
            ),
        )

    def http_error_response(self, request: Request, exc: HTTPException) -> Response:
        error = GatewayError(
            f"{request.method} {request.url.path}: {exc.detail}",
            code=_HTTP_CODES.get(exc.status_code, "http_error"),
            headers=dict(exc.headers or {}),
        )
        log_fields(request.scope)["code"] = error.code
        body = error.body(request_id_of(request.scope))
        body["error"]["type"] = "invalid_request_error"
        return Response(orjson.dumps(body), status_code=exc.status_code, headers=error.headers, media_type=_JSON)

    # Starlette's exception-handler signature: (request, exc) -> response.

    async def gateway_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return self.gateway_error_response(request, exc)

    async def store_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StoreError)
        return self.store_error_response(request, exc)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.http_error_response(request, exc)
