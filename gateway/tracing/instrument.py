"""The traced variants the app factory builds instead of the plain ones when tracing is on.

* ``TracedGatewayApp``: a server span around every HTTP request (fast lane and general stack alike), named after
  the matched route, with the access line's safe fields as attributes;
* ``TracedRequestChecks``: a ``validate`` span;
* ``TracedLedger``: ``ledger.intent`` / ``ledger.task`` / ``ledger.refused`` spans around the store writes of a
  submission;
* ``TracedTransport``: an ``upstream`` client span around every upstream exchange, whose context goes upstream
  as ``traceparent`` (so the upstream's parent is this span).

Chosen once at build time: with tracing off none of this is imported and the plain classes run unchanged.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from opentelemetry.trace import Status, StatusCode
from starlette.types import Message, Receive, Scope, Send

from gateway.auth.principal import Principal
from gateway.catalog import DEFAULT_ACCOUNT
from gateway.ledger.pricing import Estimate
from gateway.ledger.service import BudgetHold, Ledger, Submission
from gateway.store.base import TaskRecord
from gateway.tracing.spans import Tracing, describe_request
from gateway.upstream.client import Headers, Transport, UpstreamResponse
from gateway.validation.checks import ValidationResult, ValidRequest
from gateway.validation.request_checks import RequestChecks
from gateway.web.fast_lane import GatewayApp
from gateway.web.middleware import LOG_FIELDS_KEY


class TracedGatewayApp(GatewayApp):
    """The gateway app with a server span around each HTTP request."""

    def __init__(self, *args: Any, tracing: Tracing, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"]
        with self.tracing.server_span(method, scope["headers"]) as span:
            try:
                await super().__call__(scope, receive, send_noting_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                describe_request(span, method, route, status, scope.get(LOG_FIELDS_KEY) or {})


class TracedRequestChecks(RequestChecks):
    def __init__(self, *args: Any, tracing: Tracing, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tracing = tracing

    async def validated(self, body: dict[str, Any]) -> ValidationResult:
        with self._tracing.span("validate") as span:
            result = await super().validated(body)
            span.set_attribute("gateway.valid", result.request is not None)
            if result.request is not None:
                span.set_attribute("gateway.model", result.request.model)
                span.set_attribute("gateway.mode", result.request.mode)
            return result


class TracedLedger(Ledger):
    def __init__(self, *args: Any, tracing: Tracing, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tracing = tracing

    async def begin(
        self,
        principal: Principal,
        request: ValidRequest,
        est: Estimate,
        request_id: str,
        account: str = DEFAULT_ACCOUNT,
        max_in_flight: int = 0,
        hold_since: float = 0.0,
        budget: BudgetHold | None = None,
    ) -> Submission | None:
        with self._tracing.span("ledger.intent", {"gateway.key": principal.name, "gateway.account": account}) as span:
            submission = await super().begin(
                principal, request, est, request_id, account, max_in_flight, hold_since, budget
            )
            span.set_attribute("gateway.admitted", submission is not None)
            return submission

    async def accepted(self, sub: Submission, task_id: str) -> TaskRecord:
        with self._tracing.span(
            "ledger.task",
            {"gateway.key": sub.principal.name, "gateway.task_id": task_id, "gateway.account": sub.account},
        ):
            return await super().accepted(sub, task_id)

    async def refused(self, sub: Submission) -> None:
        with self._tracing.span("ledger.refused", {"gateway.key": sub.principal.name}):
            await super().refused(sub)


class TracedTransport:
    """``inner`` with a client span per exchange and that span's ``traceparent`` sent upstream."""

    def __init__(self, inner: Transport, tracing: Tracing) -> None:
        self._inner = inner
        self._tracing = tracing

    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse:
        parts = urlsplit(url)
        attributes = {
            "http.request.method": method,
            "server.address": parts.hostname or "",
            "url.path": parts.path,  # no query string, no userinfo
        }
        with self._tracing.span(f"upstream {method}", attributes, client=True) as span:
            response = await self._inner.send(method, url, self._tracing.with_context(headers), body)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def aclose(self) -> None:
        await self._inner.aclose()
