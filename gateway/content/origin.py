"""Which video URL may be fetched, and with which credentials (pure).

The upstream account's key goes only to the upstream's own origin: scheme, host and port exactly as in
``[upstream] base_url``. A URL on any other origin is fetched without credentials, and only if its host passes the
public-address rules of media URLs (``gateway.validation.media_urls``): no private or special-use literal, no local
name, no credentials in the URL. Names still have to resolve to public addresses only, which ``fetch`` checks at
connect time, on every redirect hop.

>>> upstream = origin_of("https://api.uniall.ai")
>>> plan_hop("https://api.uniall.ai/files/v.mp4", upstream).credentials
True
>>> plan_hop("http://169.254.169.254/latest", upstream)
'169.254.169.254 is a private, loopback, link-local or reserved address'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urljoin, urlsplit

from gateway.store.base import TaskRecord
from gateway.validation.media_urls import IPAddress, private_host_reason, split_media_url

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

KeyForTask = Callable[[TaskRecord], str]
"""The upstream key that may fetch a task's video (the account that created it)."""


def team_key(api_key: str) -> KeyForTask:
    """One upstream key for every task (``UNIALL_API_KEY``)."""

    def key_for(task: TaskRecord) -> str:
        return api_key

    return key_for


def account_keys(key_of: Callable[[str], str | None]) -> KeyForTask:
    """The key of the account that created the task (SPEC section 9), e.g. ``account_keys(pool.key)``; a task whose
    account is no longer configured gets no key (its video is then fetched without one)."""

    def key_for(task: TaskRecord) -> str:
        return key_of(task.account) or ""

    return key_for


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Hop:
    """One URL to fetch: send the account's key (``credentials``) or not; ``ip`` set for an address literal."""

    url: str
    origin: Origin
    credentials: bool
    ip: IPAddress | None


def origin_of(url: str) -> Origin | None:
    """The (scheme, normalized host, port) of an http(s) URL, or None if it is not a usable one."""
    parsed = split_media_url(url)
    if isinstance(parsed, str):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    return Origin(scheme, parsed[0], port if port is not None else _DEFAULT_PORTS[scheme])


def plan_hop(url: str, upstream: Origin | None) -> Hop | str:
    """How to fetch ``url``, or why it may not be fetched at all."""
    parsed = split_media_url(url)
    if isinstance(parsed, str):
        return f"the video URL is unusable: {parsed}"
    host, ip, has_credentials = parsed
    if has_credentials:
        return "the video URL carries credentials"
    origin = origin_of(url)
    if origin is None:
        return "the video URL is unusable"
    if origin == upstream:
        return Hop(url, origin, credentials=True, ip=ip)
    reason = private_host_reason(host, ip)
    if reason is not None:
        return reason
    return Hop(url, origin, credentials=False, ip=ip)


def redirect_target(current: str, location: str | None) -> str | None:
    """The absolute URL a redirect points to, or None when it names none."""
    if not location:
        return None
    return urljoin(current, location.strip())
