"""Signed, short-lived UI sessions and the CSRF tokens bound to them; pure, no I/O.

A session cookie is ``<expiry>.<id>.<mac>``: the HMAC-SHA256 of expiry and a random id under a key derived from the
admin token, so every worker and replica that shares the token accepts the others' sessions, and changing the token
ends every session. Signing out records the id as revoked in the store (the UI checks it; this module does no I/O).
The CSRF token of a session is another HMAC of its id, so a form post carries a value only a signed-in page could
have shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

COOKIE = "kg_ui_session"
_LABEL = b"kling-gateway ui session v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session: its random id and when it ends (epoch seconds)."""

    session_id: str
    expires_at: int


class SessionSigner:
    """Issues and verifies session cookies and CSRF tokens for sessions ``ttl_s`` seconds long.

    >>> signer = SessionSigner("admin-token", ttl_s=60)
    >>> cookie = signer.issue(now=1000.0)
    >>> session = signer.verify(cookie, now=1059.0)
    >>> session is not None and signer.csrf_ok(session, signer.csrf_token(session))
    True
    >>> signer.verify(cookie, now=1060.0) is None
    True
    """

    def __init__(self, admin_token: str, *, ttl_s: int) -> None:
        self._key = hmac.new(admin_token.encode(), _LABEL, hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _mac(self, message: str) -> str:
        return _b64(hmac.new(self._key, message.encode(), hashlib.sha256).digest())

    def issue(self, now: float) -> str:
        """A new session cookie value, valid for ``ttl_s`` seconds from ``now``."""
        body = f"{int(now) + self.ttl_s}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._mac('session.' + body)}"

    def verify(self, cookie: str | None, now: float) -> Session | None:
        """The session in ``cookie``, or None when it is absent, malformed, tampered with or expired."""
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()):
            return None
        expiry, session_id, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac(f"session.{expiry}.{session_id}").encode()):
            return None
        expires_at = int(expiry)
        if not now < expires_at <= now + self.ttl_s:
            return None
        return Session(session_id, expires_at)

    def csrf_token(self, session: Session) -> str:
        """The CSRF token every form of ``session`` carries."""
        return self._mac(f"csrf.{session.session_id}")

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        """True when ``token`` is ``session``'s CSRF token (compared in constant time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.csrf_token(session).encode())
