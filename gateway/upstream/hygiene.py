"""What crosses the upstream boundary: the headers that go up, the headers that come back, and secrets masked.

Pure functions, no I/O. Requests carry only what the upstream needs (never the client's credentials, cookies or
an unscoped ``Idempotency-Key``); answers pass only an allowlist of headers, each bounded in size, ``Retry-After``
capped; every configured upstream key the upstream echoes is masked in bodies and headers. ``mask_secrets`` takes
the set of secrets, so several upstream accounts mask alike.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

Headers = list[tuple[str, str]]

#: Client request headers the upstream needs (the gateway adds Authorization, X-Request-ID, User-Agent).
REQUEST_ALLOW = frozenset({"content-type", "accept", "traceparent", "tracestate"})
#: Upstream response headers a client needs: the body's type and language, retry hints and rate-limit state.
RESPONSE_ALLOW = frozenset(
    {"content-type", "content-language", "retry-after", "x-upstream-request-id", "cache-control", "etag"}
)
RESPONSE_ALLOW_PREFIXES = ("x-ratelimit-", "ratelimit")
#: Upstream request ids are passed under this name (the gateway's own ``X-Request-ID`` is the client's).
UPSTREAM_REQUEST_ID = "x-upstream-request-id"
MAX_HEADER_VALUE = 256
MAX_RESPONSE_HEADERS = 16
RETRY_AFTER_MAX_S = 3600
MASK = "sk-***"
USER_AGENT = "kling-gateway"


def mask_secrets(data: bytes, secrets: Iterable[str]) -> bytes:
    """``data`` with every non-empty secret replaced by ``MASK`` (also JSON-escaped forms of it)."""
    for secret in secrets:
        if not secret:
            continue
        raw = secret.encode("utf-8", "replace")
        if raw in data:
            data = data.replace(raw, MASK.encode())
        escaped = secret.replace("/", "\\/").encode("utf-8", "replace")  # JSON may escape the solidus
        if escaped != raw and escaped in data:
            data = data.replace(escaped, MASK.encode())
    return data


def mask_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def capped_retry_after(value: str) -> str | None:
    """A delay in seconds at most ``RETRY_AFTER_MAX_S``; an HTTP date or garbage is dropped."""
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        return None
    return str(min(int(value), RETRY_AFTER_MAX_S))


def response_headers(upstream_headers: Iterable[tuple[str, str]], secrets: Iterable[str] = ()) -> Headers:
    """The allowlisted upstream response headers, bounded in count and size, secrets masked."""
    secrets = tuple(secrets)
    kept: Headers = []
    for name, value in upstream_headers:
        lower = name.lower()
        if lower == "x-request-id":
            lower = UPSTREAM_REQUEST_ID
        elif lower not in RESPONSE_ALLOW and not lower.startswith(RESPONSE_ALLOW_PREFIXES):
            continue
        if lower == "retry-after":
            capped = capped_retry_after(value)
            if capped is None:
                continue
            value = capped
        if len(value) > MAX_HEADER_VALUE or len(name) > 64:
            continue
        kept.append((lower if lower == UPSTREAM_REQUEST_ID else name, mask_text(value, secrets)))
        if len(kept) >= MAX_RESPONSE_HEADERS:
            break
    return kept


def scoped_idempotency_key(secret: str, key_name: str, client_key: str) -> str:
    """The upstream ``Idempotency-Key`` for a client's: an HMAC of key name and client key, so two keys'
    identical idempotency keys never meet upstream (and the client's value is not disclosed)."""
    message = f"{key_name}\x00{client_key}".encode()
    return "gw-" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:48]


def request_headers(
    client_headers: Iterable[tuple[str, str]], api_key: str, request_id: str, idempotency_key: str | None = None
) -> Headers:
    """What goes upstream: the allowlisted client headers, the team key, the request id, the scoped
    idempotency key (if any) and the gateway's User-Agent."""
    headers = [(k, v) for k, v in client_headers if k.lower() in REQUEST_ALLOW]
    headers.append(("Authorization", f"Bearer {api_key}"))
    headers.append(("Accept-Encoding", "identity"))
    headers.append(("X-Request-ID", request_id))
    headers.append(("User-Agent", USER_AGENT))
    if idempotency_key is not None:
        headers.append(("Idempotency-Key", idempotency_key))
    return headers
