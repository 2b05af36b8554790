"""The app factory: builds every service from settings and wires them into one Starlette app. No logic here.

``create_app`` builds what needs no event loop (metrics, logs, request bookkeeping, the overload bound) and the
app with its loop-free routes. The lifespan builds the rest (``gateway.builders``: one small builder per family),
then the handlers with exactly the services each uses, and mounts them before the server accepts the first request;
everything is closed in reverse order on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from gateway.auth.authenticate import AdminToken, ClientAuthentication
from gateway.auth.guard import GuessLimiter
from gateway.auth.keyring import KeyAuthenticator
from gateway.auth.rate_limits import RateLimitHeaders
from gateway.builders import Injected, build_services, request_checks
from gateway.config import Settings
from gateway.content.metrics import create_content_metrics
from gateway.errors import GatewayError
from gateway.known_secrets import KnownSecrets
from gateway.ledger.pricing import PriceTable
from gateway.ledger.settler import Settler
from gateway.logs import Logger, make_logs
from gateway.metrics import Metrics, create_metrics
from gateway.services import Services
from gateway.shutdown import shutdown_hook
from gateway.store.base import Store, StoreError
from gateway.tracing.setup import tracing_from_env
from gateway.ui.routes import UiRoutes
from gateway.upstream.client import Transport
from gateway.validation.media_guard import Resolver
from gateway.web.admin import AdminRoutes
from gateway.web.error_responses import ErrorResponder
from gateway.web.fast_lane import FastLane, GatewayApp
from gateway.web.health import HealthRoutes
from gateway.web.idempotency import IdempotencyRecords
from gateway.web.metrics_route import metrics_endpoint
from gateway.web.middleware import RequestBook, RequestContextMiddleware
from gateway.web.openapi import openapi_document, openapi_route
from gateway.web.overload import Overload, OverloadMiddleware
from gateway.web.routes import STATUS_ROUTE, SUBMIT_ROUTE, GatewayRoutes
from gateway.webhooks.transport import WebhookTransport

if TYPE_CHECKING:
    from gateway.tracing.spans import Tracing


def create_app(
    settings: Settings,
    *,
    transport: Transport | None = None,
    registry: CollectorRegistry | None = None,
    log_stream: TextIO | None = None,
    resolver: Resolver | None = None,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    webhook_transport: WebhookTransport | None = None,
) -> Starlette:
    """Build the gateway. Tests inject a transport, registry, log sink, resolver, store and clock; production none.

    Tracing is on when the environment configures an OTLP endpoint (``gateway.tracing.setup``); the app and the
    services that make spans are then their traced variants, chosen here once.
    """
    injected = Injected(transport, resolver, store, clock, webhook_transport)
    tracing = tracing_from_env(os.environ)
    metrics = create_metrics(registry)
    content_metrics = create_content_metrics(metrics.registry)
    secrets = KnownSecrets(
        (
            settings.upstream_api_key,
            *settings.upstream_keys.values(),
            settings.admin_token,
            settings.metrics.token,
            settings.webhook_secret,
        )
    )
    logs = make_logs(level=settings.logging.level, secrets=secrets, stream=log_stream)
    log = logs.log
    errors = ErrorResponder(metrics, log)
    book = RequestBook(
        metrics=metrics,
        logger=log,
        access=logs.access if settings.logging.access_log else None,
        max_header_bytes=settings.server.max_header_bytes,
    )
    overload = Overload(
        metrics,
        max_in_flight=settings.server.max_in_flight,
        max_queued=settings.server.max_queued,
        queue_timeout_s=settings.server.queue_timeout_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: GatewayApp) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if tracing is not None:
                stack.push_async_callback(tracing.shutdown)  # last out: exports the spans of the shutdown too
            services = await build_services(
                settings,
                metrics,
                log,
                stack,
                injected,
                content_metrics=content_metrics,
                tracing=tracing,
                secrets=secrets,
            )
            app.state.services = services
            book.rate_headers = RateLimitHeaders(services.rate_limits).for_key
            handlers = _handlers(services, injected.resolver, tracing)
            stack.enter_context(_mounted(app, handlers, book, overload, errors))
            await stack.enter_async_context(
                shutdown_hook(
                    lambda: setattr(services, "shutting_down", True), grace_s=settings.server.shutdown_grace_s, log=log
                )
            )
            background = [asyncio.create_task(loop(), name=name) for name, loop in _loops(services).items()]
            background.append(asyncio.create_task(logs.access.keep_flushed(), name="log-flush"))
            log.info("startup", upstream=settings.upstream.base_url, auth_mode=settings.auth.mode)
            logs.access.flush()
            try:
                yield
            finally:
                services.shutting_down = True
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await services.ledger.flush()
                log.info("shutdown")
                logs.access.flush()

    options: dict[str, Any] = {
        # The routes that need no services; the rest are mounted by the lifespan (``_mounted``).
        "routes": [metrics_endpoint(metrics, settings.metrics.token), openapi_route(openapi_document(settings))],
        "middleware": [
            Middleware(RequestContextMiddleware, book=book),
            Middleware(OverloadMiddleware, overload=overload),
        ],
        "exception_handlers": {
            GatewayError: errors.gateway_error,
            HTTPException: errors.http_error,
            StoreError: errors.store_error,
        },
        "lifespan": lifespan,
    }
    if tracing is None:
        return GatewayApp(**options)
    from gateway.tracing.instrument import TracedGatewayApp

    return TracedGatewayApp(tracing=tracing, **options)


def _loops(services: Services) -> dict[str, Callable[[], Coroutine[None, None, None]]]:
    """Background loops that live as long as the app: gauges, key refresh and the settler."""
    loops: dict[str, Callable[[], Coroutine[None, None, None]]] = {
        "in-flight-gauge": services.ledger.follow_in_flight,
        "budget-gauges": services.ledger.follow_budgets,
        "accounts": lambda: services.accounts.follow(services.store),
        "account-marks": services.accounts.follow_marks,
    }
    if isinstance(services.auth, KeyAuthenticator):
        loops["key-refresh"] = services.auth.run
    if services.archiver is not None:
        loops["archiver"] = services.archiver.run
    settler = services.settings.settler
    if settler.enabled:
        loops["settler"] = Settler.from_settings(
            settler,
            services.store,
            services.ledger,
            services.status.poll,
            services.log,
            clock=services.clock,
            has_account=lambda account: services.accounts.key(account) is not None,
        ).run
    return loops


# -- handlers ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Handlers:
    gateway: GatewayRoutes
    admin: AdminRoutes
    health: HealthRoutes
    ui: UiRoutes


def _handlers(services: Services, resolver: Resolver | None, tracing: Tracing | None) -> _Handlers:
    """Every handler, given exactly the services it uses."""
    settings = services.settings
    clients = ClientAuthentication(services.auth, services.rate_limits)
    gateway = GatewayRoutes(
        clients=clients,
        checks=request_checks(settings, services.metrics, resolver, tracing),
        idempotency=IdempotencyRecords(services.store, clock=services.clock, log=services.log),
        ledger=services.ledger,
        upstream=services.upstream,
        statuses=services.status,
        prices=PriceTable.from_settings(settings.pricing),
        log=services.log,
        max_body_bytes=settings.server.max_body_bytes,
        passthrough_enabled=settings.proxy.passthrough,
        content=services.content,
        video_url_base=settings.server.public_url if settings.archive.rewrite_video_url else None,
        accounts=services.accounts,
    )
    # One admin token check for the admin API and the UI's sign-in: one guessing limiter for both.
    admin_token = AdminToken(
        settings.admin_token, guard=GuessLimiter(), on_lockout=_lockout_reporter(services.metrics, services.log)
    )
    admin = AdminRoutes(
        clients=clients,
        admin_token=admin_token,
        store=services.store,
        keys_changed=services.keys_changed,
        clock=services.clock,
        max_body_bytes=settings.server.max_body_bytes,
        rotation_grace_s=settings.auth.rotation_grace_s,
        allow_private_webhooks=settings.webhooks.allow_private_targets,
        accounts=services.accounts,
        known_models=settings.known_models,
    )
    return _Handlers(
        gateway=gateway, admin=admin, health=HealthRoutes(services.readiness), ui=UiRoutes.build(services, admin_token)
    )


def _lockout_reporter(metrics: Metrics, log: Logger) -> Callable[[str, str], None]:
    """Log and count an address locked out of the admin API after repeated wrong tokens."""

    def report(address: str, path: str) -> None:
        metrics.admin_auth_lockouts.labels("admin_api").inc()
        log.warning("admin_auth_locked_out", client=address, path=path)

    return report


@contextlib.contextmanager
def _mounted(
    app: GatewayApp, handlers: _Handlers, book: RequestBook, overload: Overload, errors: ErrorResponder
) -> Iterator[None]:
    """The handlers' routes and the fast lane in the app while the block runs (the routes built without them stay)."""
    own: list[BaseRoute] = [
        *handlers.gateway.routes(),
        *handlers.admin.routes(),
        *handlers.health.routes(),
        *handlers.ui.routes(),
    ]
    by_path = {route.path: route for route in own if isinstance(route, Route)}
    built = list(app.router.routes)
    # Passthrough last, so it never shadows the gateway's own routes.
    app.router.routes[:] = [*own, *built, *handlers.gateway.passthrough_routes()]
    app.fast_lane = FastLane(
        submit=by_path[SUBMIT_ROUTE], status=by_path[STATUS_ROUTE], book=book, overload=overload, errors=errors
    )
    try:
        yield
    finally:
        app.fast_lane = None
        app.router.routes[:] = built
