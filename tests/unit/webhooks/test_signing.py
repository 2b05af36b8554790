"""Standard Webhooks signatures: checked against the reference ``standardwebhooks`` library."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from gateway.webhooks.signing import key_secret, new_secret, secret_key, secret_problem, signature, signed_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()
BODY = b'{"id":"task_1","status":"completed"}'


def now() -> int:
    """The current time: the reference verifier rejects timestamps more than 5 minutes off its clock."""
    return int(datetime.now(UTC).timestamp())


def test_reference_library_verifies_our_headers() -> None:
    """The standardwebhooks library accepts the headers for the exact body, and returns the payload."""
    headers = dict(signed_headers(secret_key(SECRET), "msg_1", now(), BODY))
    assert Webhook(SECRET).verify(BODY, headers) == {"id": "task_1", "status": "completed"}


def test_signature_equals_the_reference_signature() -> None:
    """Byte for byte the value the reference library computes for id, timestamp and body."""
    at = now()
    expected = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(at, UTC), BODY.decode())
    assert signature(secret_key(SECRET), "msg_1", at, BODY) == expected


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("body", BODY.replace(b"completed", b"failed")),
        ("webhook-id", "msg_2"),
        ("webhook-timestamp", "a second earlier"),
    ],
)
def test_reference_library_rejects_tampering(change: str, value: object) -> None:
    """Another body, id or timestamp than the signed ones fails verification."""
    at = now()
    headers = dict(signed_headers(secret_key(SECRET), "msg_1", at, BODY))
    body = BODY
    if change == "body":
        body = value  # type: ignore[assignment]
    else:
        headers[change] = str(at - 1) if change == "webhook-timestamp" else str(value)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)


def test_other_secret_fails() -> None:
    """A receiver holding another secret rejects the delivery."""
    headers = dict(signed_headers(secret_key(SECRET), "msg_1", now(), BODY))
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_new_secret_is_usable() -> None:
    """new_secret gives whsec_ + base64 of 32 random bytes."""
    secret = new_secret()
    assert secret.startswith("whsec_") and secret_problem(secret) is None and len(secret_key(secret)) == 32


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ("", "whsec_"),
        ("my-plain-secret", "whsec_"),
        ("whsec_not base64!", "base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24 to 64"),
    ],
)
def test_bad_secrets_are_refused(secret: str, words: str) -> None:
    """Anything but whsec_ + base64 of 24-64 bytes is refused, with a reason that never repeats it."""
    problem = secret_problem(secret)
    assert problem is not None and words in problem
    with pytest.raises(ValueError, match="webhook secret"):
        secret_key(secret)


def test_each_key_has_its_own_derived_secret() -> None:
    """Per-key secrets: stable, distinct per key and per gateway secret, and valid whsec_ secrets themselves."""
    master = secret_key(SECRET)
    assert key_secret(master, "team-a") == key_secret(master, "team-a")
    assert key_secret(master, "team-a") != key_secret(master, "team-b")
    assert key_secret(secret_key(new_secret()), "team-a") != key_secret(master, "team-a")
    assert secret_problem(key_secret(master, "team-a")) is None
