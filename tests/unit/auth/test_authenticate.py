"""Tables for gateway.auth.authenticate and gateway.auth.rate_limits: the admin token, the client key, the 429."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth.authenticate import AdminToken, ClientAuthentication
from gateway.auth.guard import GuessLimiter
from gateway.auth.principal import OPEN_PRINCIPAL, OpenAuthenticator, Principal, invalid_key
from gateway.auth.rate_limits import KeyRateLimits, RateLimiter, rate_limited
from gateway.errors import AuthenticationFailed, NotFound, TooManyRequests


class OneKey:
    """An ``Authenticator`` knowing one bearer token."""

    def __init__(self, token: str, principal: Principal) -> None:
        self.token, self.principal = token, principal

    def authenticate(self, authorization: str | None) -> Principal:
        if authorization != f"Bearer {self.token}":
            raise invalid_key()
        return self.principal

    async def look_up(self, key_hash: str) -> Principal:
        raise invalid_key()


class CountingShared:
    """A ``SharedRateLimiter`` that allows ``allowed`` requests, then answers ``wait_s``; records each call."""

    def __init__(self, allowed: int, wait_s: float) -> None:
        self.allowed, self.wait_s = allowed, wait_s
        self.calls: list[tuple[str, int | None]] = []

    async def check(self, key_name: str, rpm: int | None) -> float | None:
        self.calls.append((key_name, rpm))
        return None if len(self.calls) <= self.allowed else self.wait_s

    def allowance(self, key_name: str) -> tuple[int, int] | None:
        return None


class TestAdminToken:
    @pytest.mark.parametrize(
        ("token", "header", "expected"),
        [
            ("adm", "Bearer adm", True),
            ("adm", "bearer adm", True),
            ("adm", "Bearer  adm ", True),
            ("adm", "Bearer adm2", False),
            ("adm", "Basic adm", False),
            ("adm", None, False),
            ("", "Bearer ", False),
            ("", None, False),
        ],
    )
    def test_matches(self, token: str, header: str | None, expected: bool) -> None:
        assert AdminToken(token).matches(header) is expected

    def test_no_token_means_no_admin_api(self) -> None:
        """Without an admin token every admin path is 404, whatever the caller sends."""
        with pytest.raises(NotFound) as caught:
            AdminToken("").require("Bearer anything", "/gateway/keys")
        assert (caught.value.status, caught.value.code) == (404, "not_found")
        assert "/gateway/keys" in str(caught.value)

    @pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic adm"])
    def test_wrong_token_is_401(self, header: str | None) -> None:
        with pytest.raises(AuthenticationFailed) as caught:
            AdminToken("adm").require(header, "/gateway/keys")
        assert (caught.value.status, caught.value.code) == (401, "invalid_admin_token")

    def test_right_token_passes(self) -> None:
        AdminToken("adm").require("Bearer adm", "/gateway/keys")

    def test_guessing_is_locked_out(self) -> None:
        """With a guard, the third wrong token from an address locks it out (reported once): then even the right
        token is 429 too_many_auth_failures with Retry-After; other addresses are unaffected."""
        locked: list[tuple[str, str]] = []
        guard = GuessLimiter(max_failures=3, window_s=60, lockout_s=300, clock=lambda: 0.0)
        token = AdminToken("adm", guard=guard, on_lockout=lambda address, path: locked.append((address, path)))
        for _ in range(3):
            with pytest.raises(AuthenticationFailed):
                token.require("Bearer wrong", "/gateway/keys", "10.0.0.9")
        with pytest.raises(TooManyRequests) as caught:
            token.require("Bearer adm", "/gateway/keys", "10.0.0.9")
        assert (caught.value.status, caught.value.code) == (429, "too_many_auth_failures")
        assert caught.value.headers["Retry-After"] == "300"
        assert locked == [("10.0.0.9", "/gateway/keys")]
        token.require("Bearer adm", "/gateway/keys", "10.0.0.10")


class TestClientAuthentication:
    async def test_bad_key_is_401_and_names_no_key(self) -> None:
        clients = ClientAuthentication(OneKey("k", Principal("team")), KeyRateLimits(RateLimiter()))
        fields: dict[str, Any] = {}
        with pytest.raises(AuthenticationFailed) as caught:
            await clients.authenticate("Bearer other", fields)
        assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
        assert fields == {}

    async def test_open_mode_is_the_open_principal(self) -> None:
        clients = ClientAuthentication(OpenAuthenticator(), KeyRateLimits(RateLimiter()))
        fields: dict[str, Any] = {}
        assert await clients.authenticate(None, fields) is OPEN_PRINCIPAL
        assert fields == {"key": "open"}

    async def test_local_limit_then_429_with_retry_after(self) -> None:
        """rpm 2 on a frozen clock: two requests pass, the third is 429 after the key is noted for the log."""
        now = [0.0]
        clients = ClientAuthentication(
            OneKey("k", Principal("team", rpm=2)), KeyRateLimits(RateLimiter(lambda: now[0]))
        )
        fields: dict[str, Any] = {}
        assert (await clients.authenticate("Bearer k", fields)).name == "team"
        assert (await clients.authenticate("Bearer k", fields)).name == "team"
        fields.clear()
        with pytest.raises(TooManyRequests) as caught:
            await clients.authenticate("Bearer k", fields)
        assert (caught.value.status, caught.value.code) == (429, "rate_limited")
        assert caught.value.headers["Retry-After"] == "30"
        assert fields == {"key": "team"}

    async def test_shared_limits_count_instead_of_local(self) -> None:
        """With a shared limiter the local buckets are never asked; its answer decides."""
        local = RateLimiter(lambda: 0.0)
        shared = CountingShared(allowed=1, wait_s=0.2)
        clients = ClientAuthentication(OneKey("k", Principal("team", rpm=5)), KeyRateLimits(local, shared))
        await clients.authenticate("Bearer k", {})
        with pytest.raises(TooManyRequests) as caught:
            await clients.authenticate("Bearer k", {})
        assert caught.value.headers["Retry-After"] == "1"  # at least one second
        assert shared.calls == [("team", 5), ("team", 5)]
        assert len(local) == 0

    async def test_no_rpm_is_never_limited(self) -> None:
        clients = ClientAuthentication(OneKey("k", Principal("team")), KeyRateLimits(RateLimiter(lambda: 0.0)))
        for _ in range(100):
            await clients.authenticate("Bearer k", {})


@pytest.mark.parametrize(
    ("wait_s", "retry_after", "message_seconds"),
    [(0.01, "1", "1"), (1.0, "1", "1"), (1.2, "2", "2"), (30.0, "30", "30")],
)
def test_rate_limited_rounds_up(wait_s: float, retry_after: str, message_seconds: str) -> None:
    error = rate_limited(Principal("team", rpm=2), wait_s)
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "rate_limited", retry_after)
    assert f"retry in {message_seconds} s" in str(error)
    assert "2 requests per minute for key 'team'" in str(error)
