"""Where a delivery may go: the callback URL rules, and the addresses one attempt connects to (DNS pinning).

``check_webhook_url`` is the static rule, applied when a key's URL is set and again on every attempt: absolute
http(s), no credentials, no fragment, no private/loopback/local host (the rules of private media URLs).

``pin`` is the dynamic half, run before every attempt: resolve the name once, refuse it when *any* of its
addresses is private (one private answer is enough to steer a delivery inside), and hand back a ``Target`` holding
the checked address. The transport connects to that address only, with the name in ``Host`` and in TLS SNI and
certificate checks, so the HTTP client never resolves the name again (no second answer to be rebound).

``allow_private_targets`` (``[webhooks]``, development only, off by default) drops the private-address rules for
local testing against a receiver on loopback; the name is still resolved once and pinned.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from gateway.validation.media_guard import Resolver
from gateway.validation.media_urls import is_private_address, media_host, parse_ip_literal, private_host_reason

MAX_URL_LENGTH: Final = 2048


class TargetRefused(Exception):
    """This attempt may not be made (the message says why; it never holds the URL's path or query)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One attempt's destination: the URL as registered, and the checked address to connect to."""

    url: str
    scheme: str
    name: str
    """The host as sent in ``Host`` and TLS SNI (an IP literal's canonical form for literal hosts)."""
    port: int
    address: str
    """The IP address that was checked; the only one the transport may connect to."""
    target: str
    """Path and query, as in the request line."""

    @property
    def host_header(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else self.name
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def check_webhook_url(url: object, *, allow_private: bool = False) -> str | None:
    """Why ``url`` cannot be a callback URL, or None when it can (the rules of private media URLs)."""
    if not isinstance(url, str) or not url:
        return "the callback URL must be a non-empty string"
    if len(url) > MAX_URL_LENGTH:
        return f"the callback URL is longer than {MAX_URL_LENGTH} characters"
    if any(char.isspace() or not char.isprintable() or char == "\\" for char in url):
        return "the callback URL must not contain whitespace, control characters or backslashes"
    try:
        parts = urlsplit(url)
        hostname, _port = parts.hostname, parts.port
    except ValueError:
        return "the callback URL cannot be parsed (host or port)"
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return "the callback URL must be an absolute http:// or https:// URL"
    if "@" in parts.netloc:
        return "the callback URL must not carry credentials (user:password@)"
    if parts.fragment:
        return "the callback URL must not have a fragment"
    ip = parse_ip_literal(hostname) if hostname else None
    host = hostname if ip is not None else media_host(url)  # the same strict parse as media URLs
    if host is None:
        return "the callback URL's host is not a valid host name"
    return None if allow_private else private_host_reason(host, ip)


def log_host(url: str) -> str:
    """The host of ``url`` for log lines (never the whole URL, whose path or query may hold a token)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


async def pin(url: str, resolver: Resolver, *, timeout_s: float, allow_private: bool = False) -> Target:
    """Check ``url``, resolve its host once and return the address to connect to; TargetRefused otherwise."""
    problem = check_webhook_url(url, allow_private=allow_private)
    if problem is not None:
        raise TargetRefused(problem)
    parts = urlsplit(url)
    hostname = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    literal = parse_ip_literal(hostname)
    if literal is not None:
        address = str(literal)
        return Target(url, parts.scheme, address, port, address, target)
    name = media_host(url) or hostname
    try:
        async with asyncio.timeout(timeout_s):
            answers = await resolver(name)
    except Exception as exc:  # resolver failure or TimeoutError: this attempt fails, a later one may resolve
        raise TargetRefused(f"{name!r} could not be resolved ({type(exc).__name__})") from None
    addresses = [ip for ip in (parse_ip_literal(answer) for answer in answers) if ip is not None]
    if not addresses:
        raise TargetRefused(f"{name!r} resolved to no address")
    private = [ip for ip in addresses if is_private_address(ip)]
    if private and not allow_private:
        raise TargetRefused(f"{name!r} resolves to a private, loopback, link-local or reserved address ({private[0]})")
    return Target(url, parts.scheme, name, port, str(addresses[0]), target)
