"""The app factory: builds every service from settings and wires them into one Starlette app. No logic here.

Services that need the event loop (the store, background loops) are built in the lifespan; handlers are bound to
them before the server accepts the first request, and everything is closed in reverse order on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from gateway.auth.guard import GuessLimiter
from gateway.auth.keyring import KeyAuthenticator
from gateway.auth.principal import Authenticator, OpenAuthenticator
from gateway.config import Settings, UpstreamSettings, missing_scale_extra
from gateway.errors import GatewayError
from gateway.keys import RateLimiter
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import Ledger
from gateway.ledger.settler import Settler
from gateway.logs import make_logs
from gateway.metrics import Metrics, create_metrics
from gateway.services import Services
from gateway.shutdown import shutdown_hook
from gateway.status.poller import Coalescer, FetchResult, MemoryStatusCache, StatusPoller
from gateway.store import open_store
from gateway.store.base import Store, StoreError
from gateway.upstream.client import AiohttpTransport, Transport, UpstreamClient
from gateway.upstream.lean import LeanTransport
from gateway.validation.checks import ValidationOptions
from gateway.validation.media_guard import MediaGuard, Resolver
from gateway.web.admin import AdminRoutes
from gateway.web.error_responses import ErrorResponder
from gateway.web.fast_lane import FastLane, GatewayApp
from gateway.web.metrics_route import metrics_endpoint
from gateway.web.middleware import RequestBook, RequestContextMiddleware, current_request_id
from gateway.web.openapi import openapi_document, openapi_route
from gateway.web.overload import Overload, OverloadMiddleware
from gateway.web.routes import STATUS_ROUTE, SUBMIT_ROUTE, GatewayRoutes
from gateway.webhooks.build import build_outbox
from gateway.webhooks.transport import WebhookTransport

if TYPE_CHECKING:
    from gateway.shared.fail_open import SharedState


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
    """Build the gateway. Tests inject a transport, registry, log sink, resolver, store and clock; production none."""
    metrics = create_metrics(registry)
    logs = make_logs(
        level=settings.logging.level,
        secrets=(settings.upstream_api_key, settings.admin_token, settings.metrics.token, settings.webhook_secret),
        stream=log_stream,
    )
    log = logs.log
    handlers = GatewayRoutes()
    admin = AdminRoutes(handlers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            services = await _build_services(
                settings, metrics, log, stack, transport, resolver, store, clock, webhook_transport
            )
            handlers.bind(services)
            app.state.services = services
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

    upstream_routes = handlers.routes()
    by_path = {route.path: route for route in upstream_routes if isinstance(route, Route)}
    app = GatewayApp(
        routes=[
            *upstream_routes,
            *admin.routes(),
            metrics_endpoint(metrics, settings.metrics.token),
            openapi_route(openapi_document(settings)),
            *handlers.passthrough_routes(),
        ],
        middleware=[
            Middleware(RequestContextMiddleware, book=book),
            Middleware(OverloadMiddleware, overload=overload),
        ],
        exception_handlers={
            GatewayError: errors.gateway_error,
            HTTPException: errors.http_error,
            StoreError: errors.store_error,
        },
        lifespan=lifespan,
    )
    app.fast_lane = FastLane(
        submit=by_path[SUBMIT_ROUTE], status=by_path[STATUS_ROUTE], book=book, overload=overload, errors=errors
    )
    return app


async def _build_services(
    settings: Settings,
    metrics: Metrics,
    log: object,
    stack: contextlib.AsyncExitStack,
    transport: Transport | None,
    resolver: Resolver | None,
    store: Store | None,
    clock: Callable[[], float],
    webhook_transport: WebhookTransport | None,
) -> Services:
    upstream = UpstreamClient(
        settings.upstream,
        settings.upstream_api_key,
        transport if transport is not None else _upstream_transport(settings.upstream),
        metrics,
        log=log,
    )
    stack.push_async_callback(upstream.aclose)
    if store is None:
        store = await open_store(settings.store_url)
        stack.push_async_callback(store.close)
    auth: Authenticator
    if settings.auth.mode == "keys":
        auth = KeyAuthenticator(store, log=log, refresh_interval_s=settings.auth.refresh_interval_s, clock=clock)
        await auth.load()
    else:
        auth = OpenAuthenticator()
    webhooks = build_outbox(settings, store, metrics, log, resolver, webhook_transport)
    if webhooks is not None:
        stack.push_async_callback(webhooks.aclose, 5.0)
    ledger = Ledger(
        store,
        PriceTable.from_settings(settings.pricing),
        metrics,
        log,
        clock=clock,
        on_terminal=(
            webhooks.terminal_hook(auth.webhook_url)
            if webhooks is not None and isinstance(auth, KeyAuthenticator)
            else None
        ),
        recent_tasks=min(settings.cache.max_entries, 20_000),
    )
    await ledger.load_in_flight()

    async def fetch(task_id: str) -> FetchResult:
        answer = await upstream.request(
            "GET", f"/v1/videos/{quote(task_id, safe='')}", route=STATUS_ROUTE, request_id=current_request_id()
        )
        result = FetchResult.from_upstream(answer)
        if 200 <= answer.status < 300 and result.parsed is None:
            raise upstream.invalid_response()
        return result

    async def on_fresh(task_id: str, result: FetchResult) -> None:
        if result.parsed is None:
            return
        task = await ledger.find(task_id)
        if task is not None:
            await ledger.observe(task, result.parsed, result.body, polled=True)

    cache = MemoryStatusCache(
        pending_ttl_s=settings.cache.pending_ttl_s,
        terminal_ttl_s=settings.cache.terminal_ttl_s,
        max_entries=settings.cache.max_entries,
        max_bytes=settings.cache.max_bytes,
    )
    shared = await _shared_state(settings, metrics, log, stack)
    poller = StatusPoller(
        cache,
        Coalescer(),
        metrics,
        fetch=fetch,
        on_fresh=on_fresh,
        shared=shared.status if shared is not None else None,
        log=log,
    )
    guard = None
    if settings.validation.block_private_media and settings.validation.resolve_media_hosts:
        guard = MediaGuard(resolver, timeout_s=settings.validation.resolve_timeout_s)

    async def store_ready() -> str | None:
        return None if await store.ping() else "store unavailable"

    return Services(
        settings=settings,
        metrics=metrics,
        log=log,
        upstream=upstream,
        auth=auth,
        validation=ValidationOptions(
            allow_unknown_fields=settings.validation.allow_unknown_fields,
            block_private_media=settings.validation.block_private_media,
            passthrough_models=frozenset(settings.validation.passthrough_models),
        ),
        media_guard=guard,
        prices=PriceTable.from_settings(settings.pricing),
        store=store,
        ledger=ledger,
        limiter=RateLimiter(),
        shared_limiter=shared.limiter if shared is not None else None,
        status=poller,
        clock=clock,
        ready_checks=[store_ready],
        admin_guard=GuessLimiter(),
    )


async def _shared_state(
    settings: Settings, metrics: Metrics, log: object, stack: contextlib.AsyncExitStack
) -> SharedState | None:
    """The Redis-backed state shared by every replica, when ``[cache] url`` names Redis (else None)."""
    if settings.cache.url.startswith("memory:"):
        return None
    try:
        from gateway.shared.fail_open import SharedState  # on demand: needs the [scale] extra
    except ImportError as exc:
        raise missing_scale_extra("cache.url", exc) from exc
    shared = await SharedState.connect(
        settings.cache, call_timeout_s=settings.upstream.timeout_s, log=log, failures=metrics.shared_state_failures
    )
    stack.push_async_callback(shared.close)
    return shared


def _loops(services: Services) -> dict[str, Callable[[], Coroutine[None, None, None]]]:
    """Background loops that live as long as the app: key refresh and the settler."""
    loops: dict[str, Callable[[], Coroutine[None, None, None]]] = {
        "in-flight-gauge": services.ledger.follow_in_flight,
        "budget-gauges": services.ledger.follow_budgets,
    }
    if isinstance(services.auth, KeyAuthenticator):
        loops["key-refresh"] = services.auth.run
    settler = services.settings.settler
    if settler.enabled:
        loops["settler"] = Settler.from_settings(
            settler, services.store, services.ledger, services.status.poll, services.log, clock=services.clock
        ).run
    return loops


def _upstream_transport(settings: UpstreamSettings) -> Transport:
    """The client for UniAll chosen by ``[upstream] transport``."""
    if settings.transport == "aiohttp":
        return AiohttpTransport(settings)
    return LeanTransport(settings)
