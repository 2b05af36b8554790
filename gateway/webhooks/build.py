"""The webhook outbox built from the settings (the one call the app factory makes), or None when webhooks are off."""

from __future__ import annotations

from typing import Any

from gateway.config import ConfigError, Settings
from gateway.metrics import Metrics
from gateway.store.base import Store
from gateway.validation.media_guard import Resolver, system_resolver
from gateway.webhooks.outbox import OutboxOptions, WebhookOutbox
from gateway.webhooks.signing import secret_key
from gateway.webhooks.transport import AiohttpWebhookTransport, WebhookTransport


def build_outbox(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    log: Any,
    resolver: Resolver | None = None,
    transport: WebhookTransport | None = None,
) -> WebhookOutbox | None:
    """A started ``WebhookOutbox`` when ``KLING_GATEWAY_WEBHOOK_SECRET`` is set; the caller ``aclose``s it.

    ConfigError when the secret is not a Standard Webhooks ``whsec_`` secret.
    """
    if not settings.webhook_secret:
        return None
    try:
        key = secret_key(settings.webhook_secret)
    except ValueError as exc:
        raise ConfigError(f"KLING_GATEWAY_WEBHOOK_SECRET: {str(exc).removeprefix('webhook secret: ')}") from None
    hooks = settings.webhooks
    outbox = WebhookOutbox(
        store,
        key,
        transport if transport is not None else AiohttpWebhookTransport(timeout_s=hooks.timeout_s),
        resolver if resolver is not None else system_resolver,
        log=log,
        deliveries=metrics.webhook_deliveries,
        attempts=metrics.webhook_attempts,
        options=OutboxOptions(
            allow_private_targets=hooks.allow_private_targets,
            concurrency=hooks.concurrency,
            per_target_concurrency=hooks.per_target_concurrency,
            max_pending_per_target=hooks.max_pending_per_target,
            max_attempts=hooks.max_attempts,
            timeout_s=hooks.timeout_s,
            poll_interval_s=hooks.poll_interval_s,
        ),
    )
    outbox.start()
    return outbox
