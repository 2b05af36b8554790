"""Standard Webhooks signatures (https://www.standardwebhooks.com): the headers every delivery carries.

Each attempt is signed anew (a fresh ``webhook-timestamp``) over ``"{webhook-id}.{webhook-timestamp}.{body}"`` with
HMAC-SHA256, keyed with the bytes of the secret ``whsec_<base64>``; ``webhook-signature`` is ``v1,<base64 MAC>``.
Receivers verify with any Standard Webhooks library (``standardwebhooks`` on PyPI, ``standardwebhooks`` on npm)
given the same ``whsec_`` secret. Pure: no I/O, no clock (the caller passes the timestamp).

Each client key has its own signing secret, derived from the gateway's one secret (``KLING_GATEWAY_WEBHOOK_SECRET``,
from the environment only): ``key_secret(master, key_name)`` = ``whsec_`` + base64 HMAC-SHA256(master,
``"kling-gateway/webhook/" + key_name``). Nothing secret is stored, yet one tenant's receiver cannot forge
deliveries to another's; ``kling-gateway keys webhook-secret NAME`` prints a key's secret for its receiver.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the format's prefix, not a secret
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
ID_HEADER: Final = "webhook-id"
TIMESTAMP_HEADER: Final = "webhook-timestamp"
SIGNATURE_HEADER: Final = "webhook-signature"


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` is not a usable ``whsec_`` secret, or None (never repeats the secret itself)."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX!r} followed by base64 (Standard Webhooks)"
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return f"the part after {SECRET_PREFIX!r} is not valid base64"
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        return f"must encode {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes, got {len(key)}"
    return None


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (ValueError naming the problem when it is not one)."""
    problem = secret_problem(secret)
    if problem is not None:
        raise ValueError(f"webhook secret: {problem}")
    return base64.b64decode(secret[len(SECRET_PREFIX) :])


def new_secret() -> str:
    """A fresh ``whsec_`` secret of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def key_signing_key(master: bytes, key_name: str) -> bytes:
    """The HMAC key that signs ``key_name``'s deliveries (derived from the gateway's secret)."""
    return hmac.new(master, b"kling-gateway/webhook/" + key_name.encode(), hashlib.sha256).digest()


def key_secret(master: bytes, key_name: str) -> str:
    """The ``whsec_`` secret a receiver of ``key_name``'s deliveries verifies with."""
    return SECRET_PREFIX + base64.b64encode(key_signing_key(master, key_name)).decode()


def signature(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``"{id}.{timestamp}.{body}"``.

    >>> signature(b"k" * 24, "msg_1", 1700000000, b"{}")[:3]
    'v1,'
    """
    mac = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> list[tuple[str, str]]:
    """The three Standard Webhooks headers for one attempt."""
    return [
        (ID_HEADER, delivery_id),
        (TIMESTAMP_HEADER, str(timestamp)),
        (SIGNATURE_HEADER, signature(key, delivery_id, timestamp, body)),
    ]
