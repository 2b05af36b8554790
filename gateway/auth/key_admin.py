"""Key management shared by the CLI (``kling-gateway keys ...``) and the admin API (``/gateway/keys``).

Every change is recorded in the audit trail (``gateway.audit``) here, with the ``actor`` the caller names, so each
front end records the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.audit.trail import KEY_CREATED, KEY_REVOKED, KEY_ROTATED, Actor
from gateway.audit.trail import record as audit
from gateway.keys import KeyRecord, issue_key, new_secret
from gateway.store.base import KeyNotFound, Store
from gateway.url_secrets import redact_url
from gateway.webhooks.targets import check_webhook_url


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key and its secret, which is shown this once and never stored."""

    secret: str
    record: KeyRecord


def describe(record: KeyRecord, now: float) -> dict[str, Any]:
    """What ``keys list`` and ``GET /gateway/keys`` show: never the secret or its hash."""
    grace = record.previous_valid_until
    return {
        "name": record.name,
        "prefix": record.prefix,
        "models": list(record.models),
        "rpm": record.rpm,
        "monthly_budget_usd": str(record.monthly_budget_usd) if record.monthly_budget_usd is not None else None,
        "webhook_url": record.webhook_url,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "status": "revoked" if record.revoked else "active",
        "previous_secret_valid_until": grace if grace is not None and grace > now else None,
    }


async def create(
    store: Store,
    name: str,
    *,
    actor: Actor,
    now: float,
    models: tuple[str, ...] = (),
    rpm: int | None = None,
    monthly_budget_usd: Decimal | None = None,
    webhook_url: str | None = None,
    allow_private_webhooks: bool = False,
) -> IssuedKey:
    """Issue a key (ValueError for a bad name, limit or webhook URL; KeyExists for a taken name).

    ``allow_private_webhooks`` is ``[webhooks] allow_private_targets`` (development only).
    """
    if webhook_url is not None:
        problem = check_webhook_url(webhook_url, allow_private=allow_private_webhooks)
        if problem:
            raise ValueError(f"webhook URL: {problem}")
    secret, record = issue_key(
        name, now=now, models=models, rpm=rpm, monthly_budget_usd=monthly_budget_usd, webhook_url=webhook_url
    )
    await store.create_key(record)
    await audit(store, actor, KEY_CREATED, name, settings_of(record), now=now)
    return IssuedKey(secret, record)


async def rotate(store: Store, name: str, *, actor: Actor, now: float, grace_s: float) -> IssuedKey:
    """A new secret for ``name``; the old one keeps working for ``grace_s`` seconds."""
    fresh = new_secret()
    record = await store.rotate_key(name, fresh.key_hash, fresh.prefix, now + grace_s)
    await audit(store, actor, KEY_ROTATED, name, {"previous_secret_valid_until": now + grace_s}, now=now)
    return IssuedKey(fresh.secret, record)


async def revoke(store: Store, name: str, *, actor: Actor, now: float) -> KeyRecord:
    """Revoke ``name`` at once (KeyNotFound if there is no such key); revoking a revoked key changes nothing."""
    if not await store.revoke_key(name, now):
        record = await store.get_key(name)
        if record is None:
            raise KeyNotFound(name)
        return record
    await audit(store, actor, KEY_REVOKED, name, {"revoked_at": now}, now=now)
    record = await store.get_key(name)
    assert record is not None
    return record


def settings_of(record: KeyRecord) -> dict[str, Any]:
    """A key's settings as the audit trail keeps them (a webhook URL without its password; never the secret)."""
    return {
        "models": list(record.models),
        "rpm": record.rpm,
        "monthly_budget_usd": str(record.monthly_budget_usd) if record.monthly_budget_usd is not None else None,
        "webhook_url": redact_url(record.webhook_url) if record.webhook_url is not None else None,
    }
