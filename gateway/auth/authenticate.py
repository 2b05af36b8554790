"""Authentication of a request: a client's bearer token to a ``Principal`` (then its rate limit), or the admin token.

``ClientAuthentication`` is what every client route runs first: 401 ``invalid_api_key`` for a bad key, then 429
``rate_limited`` past the key's requests per minute. ``AdminToken`` guards the admin API, which does not exist
(404) unless ``KLING_GATEWAY_ADMIN_TOKEN`` is set.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from gateway.auth.guard import GuessLimiter
from gateway.auth.keyring import UnknownKey
from gateway.auth.principal import Authenticator, Principal, bearer_token
from gateway.auth.rate_limits import KeyRateLimits, rate_limited
from gateway.errors import AuthenticationFailed, NotFound, TooManyRequests


class ClientAuthentication:
    """Who is calling (401 otherwise), then their requests-per-minute limit (429)."""

    def __init__(self, keys: Authenticator, rate_limits: KeyRateLimits) -> None:
        self._keys = keys
        self._local_limits = rate_limits.local
        self._shared_limits = rate_limits.shared

    async def authenticate(self, authorization: str | None, log_fields: dict[str, Any]) -> Principal:
        """The caller of a request with this ``Authorization`` header; its key name goes in ``log_fields``."""
        try:
            principal = self._keys.authenticate(authorization)
        except UnknownKey as miss:  # well-formed but not in the table yet: perhaps created a moment ago
            principal = await self._keys.look_up(miss.key_hash)
        log_fields["key"] = principal.name  # before the rate limit: a 429's access line names the key
        # The token is taken inline: this runs on every request, so no further call layer.
        shared = self._shared_limits
        if shared is not None:
            wait = await shared.check(principal.name, principal.rpm)
        else:
            wait = self._local_limits.check(principal.name, principal.rpm)
        if wait is not None:
            raise rate_limited(principal, wait)
        return principal


class AdminToken:
    """The admin token check (compared in constant time); an empty token means there is no admin API.

    With a ``guard`` (``gateway.auth.guard.GuessLimiter``), an address that sent too many wrong tokens lately gets
    429 ``too_many_auth_failures`` without its token being compared; ``on_lockout(address, path)`` is told when
    an address is locked out (to log and count it).
    """

    def __init__(
        self,
        token: str,
        *,
        guard: GuessLimiter | None = None,
        on_lockout: Callable[[str, str], None] | None = None,
    ) -> None:
        self._token = token.encode()
        self._guard = guard
        self._on_lockout = on_lockout

    def matches(self, authorization: str | None) -> bool:
        """True when the header carries the admin token."""
        given = bearer_token(authorization)
        return bool(self._token) and given is not None and hmac.compare_digest(given.encode(), self._token)

    def require(self, authorization: str | None, path: str, address: str = "") -> None:
        """404 for ``path`` when there is no admin API; 429 while ``address`` is locked out; 401
        ``invalid_admin_token`` unless the header has the token."""
        if not self._token:
            raise NotFound(f"No route {path}.", code="not_found")
        guard = self._guard
        if guard is not None:
            wait = guard.retry_after(address)
            if wait is not None:
                raise TooManyRequests(
                    f"Too many wrong admin tokens from this address; retry in {wait} s.",
                    code="too_many_auth_failures",
                    headers={"Retry-After": str(wait)},
                )
        if not self.matches(authorization):
            if guard is not None and guard.failed(address) and self._on_lockout is not None:
                self._on_lockout(address, path)
            raise AuthenticationFailed(
                "The admin API needs 'Authorization: Bearer <admin token>'.", code="invalid_admin_token"
            )
        if guard is not None:
            guard.succeeded(address)
