"""Recording admin actions: the actor (admin token and client address, or the CLI and its OS user) and the change.

``changes`` holds the changed settings of a key as plain JSON values; callers pass only what is safe to keep
(never a secret, its hash, or a URL's password), and :func:`record` refuses a field name that looks like one.
"""

from __future__ import annotations

import getpass
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from gateway.store.base import AuditRecord, Store

KEY_CREATED: Final = "key.created"
KEY_UPDATED: Final = "key.updated"
KEY_REVOKED: Final = "key.revoked"
KEY_ROTATED: Final = "key.rotated"
_SECRET_FIELDS: Final = frozenset({"key", "secret", "key_hash", "previous_hash", "token", "password"})


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: ``admin-token`` (the admin API) or ``admin-ui`` (the web UI, signed in with the admin token), each
    with the client's ``address``, or ``cli:<OS user>``."""

    name: str
    address: str | None = None

    @classmethod
    def admin_api(cls, address: str | None) -> Actor:
        return cls("admin-token", address)

    @classmethod
    def admin_ui(cls, address: str | None) -> Actor:
        return cls("admin-ui", address)

    @classmethod
    def cli(cls) -> Actor:
        """The CLI run by the current OS user (``cli:unknown`` when the system cannot say who that is)."""
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = "unknown"
        return cls(f"cli:{user}")


async def record(
    store: Store, actor: Actor, action: str, target: str, changes: dict[str, Any], *, now: float
) -> AuditRecord:
    """Append ``action`` on ``target`` by ``actor`` to the store's audit trail and return the row."""
    leaked = _SECRET_FIELDS.intersection(changes)
    if leaked:
        raise ValueError(f"audit changes may not hold secrets: {sorted(leaked)}")
    entry = AuditRecord(
        audit_id=_ordered_id(),
        at=now,
        actor=actor.name,
        address=actor.address,
        action=action,
        target=target,
        changes=changes,
    )
    await store.audit_add(entry)
    return entry


def audit_view(entry: AuditRecord) -> dict[str, Any]:
    """An audit row as ``GET /gateway/audit`` and ``kling-gateway audit --format json`` show it."""
    return {
        "id": entry.audit_id,
        "at": entry.at,
        "actor": entry.actor,
        "address": entry.address,
        "action": entry.action,
        "target": entry.target,
        "changes": dict(entry.changes),
    }


def _ordered_id() -> str:
    """A unique id that sorts in the order of recording, so entries with the same ``at`` page newest first.

    ``at`` comes from the caller's clock (tests fix it); the id leads with this machine's nanosecond clock instead.
    """
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"
