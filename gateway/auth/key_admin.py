"""Key management shared by the CLI (``kling-gateway keys ...``) and the admin API (``/gateway/keys``).

Each administrative action is one function here (``create``, ``update_limits``, ``rotate``, ``revoke``), so
both front ends behave alike; each records itself in the audit trail (``gateway.audit``) with the ``actor`` the
caller names, so every front end records the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from gateway.audit.trail import KEY_CREATED, KEY_REVOKED, KEY_ROTATED, KEY_UPDATED, Actor
from gateway.audit.trail import record as audit
from gateway.catalog import MODELS
from gateway.keys import KeyRecord, check_limits, issue_key, model_allowed, new_secret
from gateway.store.base import KeyExists, KeyNotFound, Store
from gateway.url_secrets import redact_url
from gateway.webhooks.targets import check_webhook_url

UPDATABLE: Final = ("models", "rpm", "monthly_budget_usd", "webhook_url")
"""What ``update_limits`` may change (a key's name and secret stay; rotate changes the secret)."""


class NameRevoked(KeyExists):
    """The name belongs to a revoked key: names stay reserved, since tasks and usage are recorded by name."""


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
    known_models: Collection[str] = MODELS,
) -> IssuedKey:
    """Issue a key (ValueError for a bad name, limit, model glob or webhook URL; KeyExists for a taken name,
    :class:`NameRevoked` when it is a revoked key's).

    ``allow_private_webhooks`` is ``[webhooks] allow_private_targets`` (development only); ``known_models``
    are the models a glob must match at least one of (the Kling models plus any passthrough models).
    """
    _check_webhook(webhook_url, allow_private_webhooks)
    check_models(models, known_models)
    secret, record = issue_key(
        name, now=now, models=models, rpm=rpm, monthly_budget_usd=monthly_budget_usd, webhook_url=webhook_url
    )
    try:
        await store.create_key(record)
    except KeyExists:
        existing = await store.get_key(name)
        if existing is not None and existing.revoked:
            raise NameRevoked(name) from None
        raise
    await audit(store, actor, KEY_CREATED, name, settings_of(record), now=now)
    return IssuedKey(secret, record)


async def update_limits(
    store: Store,
    name: str,
    changes: Mapping[str, Any],
    *,
    actor: Actor,
    now: float,
    allow_private_webhooks: bool = False,
    known_models: Collection[str] = MODELS,
) -> KeyRecord:
    """Change a key's ``UPDATABLE`` fields (``changes`` holds only the given ones; None removes a limit).

    ValueError for a bad value, KeyNotFound / KeyRevoked otherwise. Every process applies it within a second.
    """
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise ValueError(f"cannot change {unknown[0]!r} (changeable: {', '.join(UPDATABLE)})")
    record = await store.get_key(name)
    if record is None:
        raise KeyNotFound(name)
    updated = dataclasses.replace(record, **changes)
    check_limits(updated.rpm, updated.monthly_budget_usd)
    check_models(updated.models, known_models)
    if "webhook_url" in changes:
        _check_webhook(updated.webhook_url, allow_private_webhooks)
    stored = await store.update_key_limits(updated)
    changed = {field: value for field, value in settings_of(stored).items() if field in changes}
    await audit(store, actor, KEY_UPDATED, name, changed, now=now)
    return stored


def check_models(globs: tuple[str, ...], known_models: Collection[str] = MODELS) -> None:
    """ValueError naming the first glob that matches none of ``known_models`` (a typo would allow nothing)."""
    for glob in globs:
        if not any(model_allowed((glob,), model) for model in known_models):
            raise ValueError(f"models: {glob!r} matches no model (models: {', '.join(sorted(known_models))})")


def _check_webhook(webhook_url: str | None, allow_private: bool) -> None:
    if webhook_url is not None:
        problem = check_webhook_url(webhook_url, allow_private=allow_private)
        if problem:
            raise ValueError(f"webhook URL: {problem}")


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
