"""The upstream boundary's pure parts: secrets masked, response headers allowlisted, request headers minimal."""

from __future__ import annotations

import pytest

from gateway.upstream.hygiene import (
    MASK,
    RETRY_AFTER_MAX_S,
    capped_retry_after,
    mask_secrets,
    request_headers,
    response_headers,
    scoped_idempotency_key,
)

KEYS = ("sk-account-one-0123456789", "sk-account-two/with/slashes")


class TestMaskSecrets:
    @pytest.mark.parametrize(
        ("data", "masked"),
        [
            (b'{"auth": "Bearer sk-account-one-0123456789"}', b'{"auth": "Bearer sk-***"}'),
            (b"sk-account-two/with/slashes", b"sk-***"),
            (b'"sk-account-two\\/with\\/slashes"', b'"sk-***"'),  # JSON's escaped solidus
            (b"one sk-account-one-0123456789 two sk-account-two/with/slashes", b"one sk-*** two sk-***"),
            (b"sk-account-one-0123456789sk-account-one-0123456789", b"sk-***sk-***"),
            (b"nothing to see", b"nothing to see"),
        ],
    )
    def test_every_configured_key_is_masked(self, data: bytes, masked: bytes) -> None:
        """Each of several upstream keys is masked wherever it appears, in plain and JSON-escaped forms."""
        assert mask_secrets(data, KEYS) == masked

    def test_empty_secret_masks_nothing(self) -> None:
        """An unset key never turns every position of the body into a mask."""
        assert mask_secrets(b"abc", ("",)) == b"abc"


class TestResponseHeaders:
    @pytest.mark.parametrize(
        ("header", "passed"),
        [
            (("Content-Type", "application/json"), ("Content-Type", "application/json")),
            (("Retry-After", "7"), ("Retry-After", "7")),
            (("Retry-After", "999999999"), ("Retry-After", str(RETRY_AFTER_MAX_S))),
            (("Retry-After", "Wed, 21 Oct 2099 07:28:00 GMT"), None),
            (("Retry-After", "-1"), None),
            (("X-RateLimit-Remaining", "3"), ("X-RateLimit-Remaining", "3")),
            (("RateLimit-Policy", "100;w=60"), ("RateLimit-Policy", "100;w=60")),
            (("X-Request-ID", "up-1"), ("x-upstream-request-id", "up-1")),
            (("X-RateLimit-Note", "Bearer " + KEYS[0]), ("X-RateLimit-Note", "Bearer " + MASK)),
            (("X-RateLimit-Policy", "p" * 5000), None),
            (("Set-Cookie", "a=b"), None),
            (("Location", "https://evil.example/"), None),
            (("Strict-Transport-Security", "max-age=1"), None),
            (("Connection", "close"), None),
            (("Content-Length", "5"), None),
            (("Server", "nginx"), None),
        ],
    )
    def test_allowlist(self, header: tuple[str, str], passed: tuple[str, str] | None) -> None:
        """Only the headers a client needs pass, bounded, with keys masked and Retry-After capped."""
        assert response_headers([header], KEYS) == ([] if passed is None else [passed])

    def test_count_is_bounded(self) -> None:
        """However many allowlisted headers come, at most 16 pass."""
        assert len(response_headers([(f"X-RateLimit-H{n}", "1") for n in range(1000)])) == 16

    @pytest.mark.parametrize(("value", "capped"), [("0", "0"), ("3600", "3600"), ("3601", "3600"), ("1" * 13, None)])
    def test_retry_after_cap(self, value: str, capped: str | None) -> None:
        assert capped_retry_after(value) == capped


class TestRequestHeaders:
    def test_only_what_the_upstream_needs(self) -> None:
        """Content type and trace context pass; everything else the client sent stays behind."""
        client = [
            ("Content-Type", "application/json"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("Idempotency-Key", "mine"),
            ("User-Agent", "evil/1.0"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Authorization", "Bearer gk_client"),
        ]
        headers = dict(request_headers(client, "sk-team", "rid", "gw-abc"))
        assert headers == {
            "Content-Type": "application/json",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "Authorization": "Bearer sk-team",
            "Accept-Encoding": "identity",
            "X-Request-ID": "rid",
            "User-Agent": "kling-gateway",
            "Idempotency-Key": "gw-abc",
        }

    def test_scoped_idempotency_key(self) -> None:
        """The same client key under two gateway keys (or two secrets) gives different upstream keys, stably."""
        a = scoped_idempotency_key("secret", "alice", "order-1")
        assert a == scoped_idempotency_key("secret", "alice", "order-1")
        assert a != scoped_idempotency_key("secret", "bob", "order-1")
        assert a != scoped_idempotency_key("other", "alice", "order-1")
        assert a != scoped_idempotency_key("secret", "alice\x00order", "-1")
        assert "order-1" not in a and len(a) <= 255
