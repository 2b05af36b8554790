"""One small builder per family of services (upstream, store, auth, webhooks, ledger, shared state, status,
validation), called by the app factory's lifespan (``gateway.app``). Each builds one thing from settings, registers
its closing on the lifespan's exit stack, and returns it; none decides anything the settings do not say.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.accounts.board import AccountBoard, StoreBoard
from gateway.accounts.pool import AccountPool
from gateway.auth.keyring import KeyAuthenticator
from gateway.auth.principal import Authenticator, OpenAuthenticator
from gateway.auth.rate_limits import KeyRateLimits, RateLimiter
from gateway.config import Settings, UpstreamSettings, missing_scale_extra
from gateway.content.archiver import Archiver
from gateway.content.metrics import ContentMetrics
from gateway.content.origin import account_keys
from gateway.content.service import ContentService
from gateway.content.wiring import build_content
from gateway.known_secrets import KnownSecrets
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import Ledger
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.services import Services
from gateway.status.fetch import upstream_status_fetch
from gateway.status.ledger_link import record_in_ledger
from gateway.status.poller import Coalescer, MemoryStatusCache, StatusPoller
from gateway.store import open_store
from gateway.store.base import Store, TaskRecord
from gateway.upstream.client import AiohttpTransport, Transport, UpstreamClient
from gateway.upstream.lean import LeanTransport
from gateway.validation.checks import ValidationOptions
from gateway.validation.media_guard import MediaGuard, Resolver
from gateway.validation.request_checks import RequestChecks
from gateway.webhooks.build import build_outbox
from gateway.webhooks.outbox import WebhookOutbox
from gateway.webhooks.transport import WebhookTransport

if TYPE_CHECKING:
    from gateway.shared.fail_open import SharedState
    from gateway.tracing.spans import Tracing


@dataclass(frozen=True)
class Injected:
    """What tests put in place of the real thing (None: build the real one)."""

    transport: Transport | None
    resolver: Resolver | None
    store: Store | None
    clock: Callable[[], float]
    webhook_transport: WebhookTransport | None


async def build_services(
    settings: Settings,
    metrics: Metrics,
    log: Logger,
    stack: contextlib.AsyncExitStack,
    injected: Injected,
    *,
    content_metrics: ContentMetrics,
    tracing: Tracing | None = None,
    secrets: KnownSecrets | None = None,
) -> Services:
    """Every service the app runs on, each built by its family's builder in dependency order (traced variants of the
    upstream transport and the ledger when ``tracing`` is on). ``secrets``: what the app's logs mask; upstream keys
    loaded later join it."""
    secrets = secrets if secrets is not None else KnownSecrets()
    store = await open_or_injected_store(settings, stack, injected.store)
    shared = await shared_state(settings, metrics, log, stack)
    board = shared.accounts if shared is not None else StoreBoard(store, log, injected.clock)
    accounts = account_pool(settings, metrics, log, injected.clock, secrets, board)
    upstream = upstream_client(settings, metrics, log, stack, injected.transport, accounts, secrets, tracing)
    auth = await authenticator(settings, store, log, injected.clock)
    webhooks = webhook_outbox(settings, store, metrics, log, stack, injected)
    ledger = await build_ledger(settings, store, metrics, log, injected.clock, auth, webhooks, accounts, tracing)
    await accounts.check_removed(store)
    await accounts.sync()
    status = status_poller(settings, upstream, ledger, metrics, log, shared)
    content, archiver = content_services(
        settings, content_metrics, store, status, accounts, upstream, log, stack, injected
    )
    return Services(
        settings=settings,
        metrics=metrics,
        log=log,
        store=store,
        upstream=upstream,
        auth=auth,
        rate_limits=KeyRateLimits(RateLimiter(), shared.limiter if shared is not None else None),
        ledger=ledger,
        status=status,
        clock=injected.clock,
        accounts=accounts,
        ready_checks=[store_ready(store)],
        content=content,
        archiver=archiver,
    )


def account_pool(
    settings: Settings,
    metrics: Metrics,
    log: Logger,
    clock: Callable[[], float],
    secrets: KnownSecrets,
    board: AccountBoard | None = None,
) -> AccountPool:
    """The upstream accounts (SPEC section 9): their keys from the environment, settings from ``[upstream]``, the
    set-aside marks shared on ``board`` (Redis when configured, else the store)."""
    return AccountPool(
        settings.account_keys,
        settings.accounts,
        metrics,
        log,
        keys_file=settings.upstream_keys_file,
        capacity_wait_s=settings.upstream.capacity_wait_s,
        capacity_retry_after_s=settings.upstream.capacity_retry_after_s,
        clock=clock,
        secrets=secrets,
        board=board,
    )


def upstream_client(
    settings: Settings,
    metrics: Metrics,
    log: Logger,
    stack: contextlib.AsyncExitStack,
    transport: Transport | None,
    accounts: AccountPool,
    secrets: KnownSecrets,
    tracing: Tracing | None = None,
) -> UpstreamClient:
    """The client for UniAll with each account's key (the transport chosen by ``[upstream] transport`` unless one
    is injected)."""
    chosen = transport if transport is not None else upstream_transport(settings.upstream)
    if tracing is not None:
        from gateway.tracing.instrument import TracedTransport

        chosen = TracedTransport(chosen, tracing)
    upstream = UpstreamClient(
        settings.upstream,
        accounts.key,
        chosen,
        metrics,
        log=log,
        secrets=secrets,
    )
    stack.push_async_callback(upstream.aclose)
    return upstream


def upstream_transport(settings: UpstreamSettings) -> Transport:
    if settings.transport == "aiohttp":
        return AiohttpTransport(settings)
    return LeanTransport(settings)


async def open_or_injected_store(settings: Settings, stack: contextlib.AsyncExitStack, store: Store | None) -> Store:
    """The store named by ``store_url`` (an injected store is the caller's to close)."""
    if store is not None:
        return store
    opened = await open_store(settings.store_url)
    stack.push_async_callback(opened.close)
    return opened


def store_ready(store: Store) -> Callable[[], Coroutine[None, None, str | None]]:
    async def store_ready() -> str | None:
        return None if await store.ping() else "store unavailable"

    return store_ready


async def authenticator(settings: Settings, store: Store, log: Logger, clock: Callable[[], float]) -> Authenticator:
    """Gateway keys from the store (``[auth] mode = "keys"``), or the one open user."""
    if settings.auth.mode != "keys":
        return OpenAuthenticator()
    keys = KeyAuthenticator(store, log=log, refresh_interval_s=settings.auth.refresh_interval_s, clock=clock)
    await keys.load()
    return keys


def webhook_outbox(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    log: Logger,
    stack: contextlib.AsyncExitStack,
    injected: Injected,
) -> WebhookOutbox | None:
    """Completion webhooks from the store's outbox, when ``KLING_GATEWAY_WEBHOOK_SECRET`` is set."""
    webhooks = build_outbox(settings, store, metrics, log, injected.resolver, injected.webhook_transport)
    if webhooks is not None:
        stack.push_async_callback(webhooks.aclose, 5.0)
    return webhooks


async def build_ledger(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    log: Logger,
    clock: Callable[[], float],
    auth: Authenticator,
    webhooks: WebhookOutbox | None,
    accounts: AccountPool,
    tracing: Tracing | None = None,
) -> Ledger:
    """The ledger, with the tasks still in flight loaded (and webhooks on terminal statuses, when configured)."""
    options: dict[str, Any] = {
        "clock": clock,
        "webhooks": (
            webhooks.for_keys(auth.webhook_url) if webhooks is not None and isinstance(auth, KeyAuthenticator) else None
        ),
        "recent_tasks": min(settings.cache.max_entries, 20_000),
        "on_release": accounts.released,
    }
    prices = PriceTable.from_settings(settings.pricing)
    if tracing is None:
        ledger = Ledger(store, prices, metrics, log, **options)
    else:
        from gateway.tracing.instrument import TracedLedger

        ledger = TracedLedger(store, prices, metrics, log, tracing=tracing, **options)
    await ledger.load_in_flight()
    return ledger


async def shared_state(
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


def status_poller(
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
        fetch=upstream_status_fetch(upstream, ledger),
        on_fresh=record_in_ledger(ledger),
        shared=shared.status if shared is not None else None,
        log=log,
    )


def content_services(
    settings: Settings,
    metrics: ContentMetrics,
    store: Store,
    status: StatusPoller,
    accounts: AccountPool,
    upstream: UpstreamClient,
    log: Logger,
    stack: contextlib.AsyncExitStack,
    injected: Injected,
) -> tuple[ContentService, Archiver | None]:
    """``/v1/videos/{id}/content`` (answers through the status cache, videos fetched with the key of the task's
    account) and, with ``[archive] url``, the copier."""

    async def poll(task: TaskRecord) -> tuple[int, bytes]:
        outcome = await status.poll(task.task_id, terminal_body=task.terminal_body)
        return outcome.status_code, outcome.body

    return build_content(
        settings,
        metrics=metrics,
        store=store,
        poll=poll,
        log=log,
        clock=injected.clock,
        stack=stack,
        resolver=injected.resolver,
        key_for=account_keys(accounts.key),
        auth_failed=upstream.auth_failed,
    )


def request_checks(
    settings: Settings, metrics: Metrics, resolver: Resolver | None, tracing: Tracing | None = None
) -> RequestChecks:
    """Validation with ``[validation]``'s options, and the media-host DNS check when it asks for one."""
    validation = settings.validation
    media_guard = None
    if validation.block_private_media and validation.resolve_media_hosts:
        media_guard = MediaGuard(resolver, timeout_s=validation.resolve_timeout_s)
    options = ValidationOptions(
        allow_unknown_fields=validation.allow_unknown_fields,
        block_private_media=validation.block_private_media,
        passthrough_models=frozenset(validation.passthrough_models),
    )
    if tracing is not None:
        from gateway.tracing.instrument import TracedRequestChecks

        return TracedRequestChecks(options, media_guard, metrics, tracing=tracing)
    return RequestChecks(options, media_guard, metrics)
