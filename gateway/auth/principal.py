"""The authentication stage: turns a request's ``Authorization`` header into a ``Principal`` or a 401.

``OpenAuthenticator`` serves ``[auth] mode = "open"`` (single-user local use, never the default);
``KeyAuthenticator`` checks gateway-issued keys against an in-memory table that follows the store.
Both are one call on the hot path; a known key never touches the store (a new one is looked up once).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from gateway.errors import AuthenticationFailed

INVALID_KEY_MESSAGE = (
    "Invalid or missing API key. Send 'Authorization: Bearer gk_...' with a key issued by the gateway."
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's name (a metric label, never the secret) and what the key may do."""

    name: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    monthly_budget_usd: Decimal | None = None


OPEN_PRINCIPAL = Principal(name="open")


class Authenticator(Protocol):
    def authenticate(self, authorization: str | None) -> Principal: ...

    async def look_up(self, key_hash: str) -> Principal:
        """The key hashing to ``key_hash`` when ``authenticate`` did not know it yet (401 otherwise)."""
        ...


class OpenAuthenticator:
    """No client keys: every caller is the one local user."""

    def authenticate(self, authorization: str | None) -> Principal:
        return OPEN_PRINCIPAL

    async def look_up(self, key_hash: str) -> Principal:
        raise invalid_key()


def bearer_token(authorization: str | None) -> str | None:
    """The credential of ``Bearer <token>``, or None when the header is absent or of another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def invalid_key() -> AuthenticationFailed:
    """The one 401 body, the same for missing, malformed, unknown, revoked and rotated-out keys."""
    return AuthenticationFailed(INVALID_KEY_MESSAGE, code="invalid_api_key")
