"""The small tracing interface the gateway uses: request spans, child spans, ``traceparent`` in and out.

Spans carry only what the access log carries (route, key name, model, mode, task id, cache result, account,
statuses): never a header, a body, a secret or a query string.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from gateway import __version__

_CONTEXT_HEADERS: Final = frozenset({"traceparent", "tracestate"})
_CONTEXT_HEADER_BYTES: Final = frozenset(name.encode() for name in _CONTEXT_HEADERS)
REQUEST_ATTRIBUTES: Final = {
    # access-log field -> span attribute
    "key": "gateway.key",
    "model": "gateway.model",
    "mode": "gateway.mode",
    "task_id": "gateway.task_id",
    "cache": "gateway.cache",
    "account": "gateway.account",
    "upstream_status": "gateway.upstream_status",
}


def otlp_provider(service_name: str) -> TracerProvider:
    """A provider exporting in batches over OTLP/HTTP, configured by the ``OTEL_*`` variables."""
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    """Spans of one app (its own provider: no process-global tracer), W3C Trace Context in and out."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("kling-gateway", __version__)
        self._propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def server_span(self, name: str, headers: Iterable[tuple[bytes, bytes]]) -> Iterator[Span]:
        """The current span for one request, continuing the client's ``traceparent`` when it sent a valid one."""
        carrier = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in headers
            if name.lower() in _CONTEXT_HEADER_BYTES
        }
        parent = self._propagator.extract(carrier) if carrier else None
        with self._tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False
        ) as span:
            yield span

    @contextlib.contextmanager
    def span(
        self, name: str, attributes: Mapping[str, AttributeValue] | None = None, *, client: bool = False
    ) -> Iterator[Span]:
        """A child of the current span (``client``: a call to another service)."""
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        with self._tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span

    def with_context(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` with the current span's ``traceparent`` (any other trace context removed)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return [(k, v) for k, v in headers if k.lower() not in _CONTEXT_HEADERS] + list(carrier.items())

    async def shutdown(self) -> None:
        """Export what is still buffered, then stop (off the event loop: the SDK's flush blocks)."""
        await asyncio.to_thread(self._provider.shutdown)


def describe_request(span: Span, method: str, route: str | None, status: int, fields: Mapping[str, Any]) -> None:
    """Name the request span after its route and give it the access line's safe fields (in one call)."""
    attributes: dict[str, AttributeValue] = {"http.request.method": method}
    if route is not None:
        span.update_name(f"{method} {route}")
        attributes["http.route"] = route
    if status:
        attributes["http.response.status_code"] = status
    for field, attribute in REQUEST_ATTRIBUTES.items():
        value = fields.get(field)
        if isinstance(value, str | int | float | bool):
            attributes[attribute] = value
    span.set_attributes(attributes)
    if status >= 500 or not status:
        span.set_status(Status(StatusCode.ERROR))
