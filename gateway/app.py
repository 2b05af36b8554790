"""The app factory: builds every service from settings and wires them into one Starlette app. No logic here.

``create_app`` builds what needs no event loop (metrics, logs, request bookkeeping, the overload bound) and the
app with its loop-free routes. The lifespan builds the rest, one small builder per family (store, upstream, auth,
webhooks, ledger, shared state, status), then the handlers with exactly the services each uses, and mounts them
before the server accepts the first request; everything is closed in reverse order on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from gateway.auth.authenticate import AdminToken, ClientAuthentication
from gateway.auth.keyring import KeyAuthenticator
from gateway.auth.principal import Authenticator, OpenAuthenticator
from gateway.auth.rate_limits import KeyRateLimits
from gateway.config import Settings, UpstreamSettings, missing_scale_extra
from gateway.errors import GatewayError
from gateway.keys import RateLimiter
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import Ledger
from gateway.ledger.settler import Settler
from gateway.logs import Logger, make_logs
from gateway.metrics import Metrics, create_metrics
from gateway.services import Services
from gateway.shutdown import shutdown_hook
from gateway.status.fetch import upstream_status_fetch
from gateway.status.ledger_link import record_in_ledger
from gateway.status.poller import Coalescer, MemoryStatusCache, StatusPoller
from gateway.store import open_store
from gateway.store.base import Store, StoreError, TaskRecord
from gateway.upstream.client import AiohttpTransport, Transport, UpstreamClient
from gateway.upstream.lean import LeanTransport
from gateway.validation.checks import ValidationOptions
from gateway.validation.media_guard import MediaGuard, Resolver
from gateway.validation.request_checks import RequestChecks
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
from gateway.webhooks.sender import WebhookSender

if TYPE_CHECKING:
    from gateway.shared.fail_open import SharedState


@dataclass(frozen=True)
class _Injected:
    """What tests put in place of the real thing (None: build the real one)."""

    transport: Transport | None
    resolver: Resolver | None
    store: Store | None
    clock: Callable[[], float]
    webhook_transport: Transport | None


def create_app(
    settings: Settings,
    *,
    transport: Transport | None = None,
    registry: CollectorRegistry | None = None,
    log_stream: TextIO | None = None,
    resolver: Resolver | None = None,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    webhook_transport: Transport | None = None,
) -> Starlette:
    """Build the gateway. Tests inject a transport, registry, log sink, resolver, store and clock; production none."""
    injected = _Injected(transport, resolver, store, clock, webhook_transport)
    metrics = create_metrics(registry)
    logs = make_logs(
        level=settings.logging.level,
        secrets=(settings.upstream_api_key, settings.admin_token, settings.metrics.token, settings.webhook_secret),
        stream=log_stream,
    )
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
            services = await _build_services(settings, metrics, log, stack, injected)
            app.state.services = services
            stack.enter_context(_mounted(app, _handlers(services, injected.resolver), book, overload, errors))
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

    return GatewayApp(
        # The routes that need no services; the rest are mounted by the lifespan (``_mounted``).
        routes=[metrics_endpoint(metrics, settings.metrics.token), openapi_route(openapi_document(settings))],
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


# -- services, one builder per family -----------------------------------------------------------------------------


async def _build_services(
    settings: Settings, metrics: Metrics, log: Logger, stack: contextlib.AsyncExitStack, injected: _Injected
) -> Services:
    upstream = _upstream(settings, metrics, log, stack, injected.transport)
    store = await _store(settings, stack, injected.store)
    auth = await _authenticator(settings, store, log, injected.clock)
    webhooks = _webhooks(settings, log, stack, injected)
    ledger = await _ledger(settings, store, metrics, log, injected.clock, auth, webhooks)
    shared = await _shared_state(settings, metrics, log, stack)
    return Services(
        settings=settings,
        metrics=metrics,
        log=log,
        store=store,
        upstream=upstream,
        auth=auth,
        rate_limits=KeyRateLimits(RateLimiter(), shared.limiter if shared is not None else None),
        ledger=ledger,
        status=_status_poller(settings, upstream, ledger, metrics, log, shared),
        clock=injected.clock,
        ready_checks=[_store_ready(store)],
    )


def _upstream(
    settings: Settings, metrics: Metrics, log: Logger, stack: contextlib.AsyncExitStack, transport: Transport | None
) -> UpstreamClient:
    """The client for UniAll (the transport chosen by ``[upstream] transport`` unless one is injected)."""
    upstream = UpstreamClient(
        settings.upstream,
        settings.upstream_api_key,
        transport if transport is not None else _upstream_transport(settings.upstream),
        metrics,
        log=log,
    )
    stack.push_async_callback(upstream.aclose)
    return upstream


def _upstream_transport(settings: UpstreamSettings) -> Transport:
    if settings.transport == "aiohttp":
        return AiohttpTransport(settings)
    return LeanTransport(settings)


async def _store(settings: Settings, stack: contextlib.AsyncExitStack, store: Store | None) -> Store:
    """The store named by ``store_url`` (an injected store is the caller's to close)."""
    if store is not None:
        return store
    opened = await open_store(settings.store_url)
    stack.push_async_callback(opened.close)
    return opened


def _store_ready(store: Store) -> Callable[[], Coroutine[None, None, str | None]]:
    async def store_ready() -> str | None:
        return None if await store.ping() else "store unavailable"

    return store_ready


async def _authenticator(settings: Settings, store: Store, log: Logger, clock: Callable[[], float]) -> Authenticator:
    """Gateway keys from the store (``[auth] mode = "keys"``), or the one open user."""
    if settings.auth.mode != "keys":
        return OpenAuthenticator()
    keys = KeyAuthenticator(store, log=log, refresh_interval_s=settings.auth.refresh_interval_s, clock=clock)
    await keys.load()
    return keys


def _webhooks(
    settings: Settings, log: Logger, stack: contextlib.AsyncExitStack, injected: _Injected
) -> WebhookSender | None:
    """Completion webhooks, when ``KLING_GATEWAY_WEBHOOK_SECRET`` is set."""
    if not settings.webhook_secret:
        return None
    webhooks = WebhookSender(
        settings.webhook_secret.encode(),
        injected.webhook_transport if injected.webhook_transport is not None else AiohttpTransport(settings.upstream),
        log=log,
        # Callback hosts get the same DNS half of the private-host rule as media URLs, at delivery time.
        guard=MediaGuard(injected.resolver, timeout_s=settings.validation.resolve_timeout_s),
    )
    stack.push_async_callback(webhooks.aclose, 5.0)
    return webhooks


async def _ledger(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    log: Logger,
    clock: Callable[[], float],
    auth: Authenticator,
    webhooks: WebhookSender | None,
) -> Ledger:
    """The ledger, with the tasks still in flight loaded (and webhooks on terminal statuses, when configured)."""
    ledger = Ledger(
        store,
        PriceTable.from_settings(settings.pricing),
        metrics,
        log,
        clock=clock,
        on_terminal=_webhook_hook(auth, webhooks) if webhooks is not None else None,
        recent_tasks=min(settings.cache.max_entries, 20_000),
    )
    await ledger.load_in_flight()
    return ledger


def _webhook_hook(auth: Authenticator, webhooks: WebhookSender) -> Callable[[TaskRecord, bytes], None]:
    """On a task's first terminal status, POST it to the owning key's webhook URL, if the key has one."""

    def deliver(task: TaskRecord, body: bytes) -> None:
        url = auth.webhook_url(task.key_name) if isinstance(auth, KeyAuthenticator) else None
        if url:
            webhooks.deliver(url, body)

    return deliver


async def _shared_state(
    settings: Settings, metrics: Metrics, log: Logger, stack: contextlib.AsyncExitStack
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


def _status_poller(
    settings: Settings,
    upstream: UpstreamClient,
    ledger: Ledger,
    metrics: Metrics,
    log: Logger,
    shared: SharedState | None,
) -> StatusPoller:
    """Status polls: the in-process cache (and the shared one), upstream calls on a miss, the ledger told."""
    cache = MemoryStatusCache(
        pending_ttl_s=settings.cache.pending_ttl_s,
        terminal_ttl_s=settings.cache.terminal_ttl_s,
        max_entries=settings.cache.max_entries,
        max_bytes=settings.cache.max_bytes,
    )
    return StatusPoller(
        cache,
        Coalescer(),
        metrics,
        fetch=upstream_status_fetch(upstream),
        on_fresh=record_in_ledger(ledger),
        shared=shared.status if shared is not None else None,
        log=log,
    )


def _loops(services: Services) -> dict[str, Callable[[], Coroutine[None, None, None]]]:
    """Background loops that live as long as the app: gauges, key refresh and the settler."""
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


# -- handlers ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Handlers:
    gateway: GatewayRoutes
    admin: AdminRoutes
    health: HealthRoutes


def _handlers(services: Services, resolver: Resolver | None) -> _Handlers:
    """Every handler, given exactly the services it uses."""
    settings = services.settings
    clients = ClientAuthentication(services.auth, services.rate_limits)
    validation = settings.validation
    media_guard = None
    if validation.block_private_media and validation.resolve_media_hosts:
        media_guard = MediaGuard(resolver, timeout_s=validation.resolve_timeout_s)
    options = ValidationOptions(
        allow_unknown_fields=validation.allow_unknown_fields,
        block_private_media=validation.block_private_media,
        passthrough_models=frozenset(validation.passthrough_models),
    )
    gateway = GatewayRoutes(
        clients=clients,
        checks=RequestChecks(options, media_guard, services.metrics),
        idempotency=IdempotencyRecords(services.store, clock=services.clock, log=services.log),
        ledger=services.ledger,
        upstream=services.upstream,
        statuses=services.status,
        prices=PriceTable.from_settings(settings.pricing),
        log=services.log,
        max_body_bytes=settings.server.max_body_bytes,
        passthrough_enabled=settings.proxy.passthrough,
    )
    admin = AdminRoutes(
        clients=clients,
        admin_token=AdminToken(settings.admin_token),
        store=services.store,
        keys_changed=services.keys_changed,
        clock=services.clock,
        max_body_bytes=settings.server.max_body_bytes,
        rotation_grace_s=settings.auth.rotation_grace_s,
    )
    return _Handlers(gateway=gateway, admin=admin, health=HealthRoutes(services.readiness))


@contextlib.contextmanager
def _mounted(
    app: GatewayApp, handlers: _Handlers, book: RequestBook, overload: Overload, errors: ErrorResponder
) -> Iterator[None]:
    """The handlers' routes and the fast lane in the app while the block runs (the routes built without them stay)."""
    own: list[BaseRoute] = [*handlers.gateway.routes(), *handlers.admin.routes(), *handlers.health.routes()]
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
