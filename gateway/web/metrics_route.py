"""``GET /metrics``: Prometheus text exposition, optionally behind ``[metrics] token``.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``serve --workers N``), samples are collected from every worker's files.
"""

from __future__ import annotations

import hmac
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth.principal import bearer_token
from gateway.errors import AuthenticationFailed
from gateway.metrics import Metrics


def metrics_endpoint(metrics: Metrics, token: str) -> Route:
    async def scrape(request: Request) -> Response:
        if token:
            given = bearer_token(request.headers.get("authorization")) or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise AuthenticationFailed(
                    "GET /metrics needs 'Authorization: Bearer <metrics token>'.", code="invalid_metrics_token"
                )
        registry = metrics.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", scrape, methods=["GET"])
