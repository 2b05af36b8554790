"""The streaming fetch of a task's video: credentials only to the upstream's origin, every redirect hop re-checked.

``VideoFetcher.open(url, key)`` follows at most ``MAX_REDIRECTS`` redirects itself. Each hop is planned by
``gateway.content.origin.plan_hop`` (the account's key only on the upstream's own origin; other origins must be
public hosts and get no credentials). For a host name on another origin the connection goes through
``GuardedResolver``: the name is resolved, every address must be public, and the connection is made to exactly
those addresses (no DNS cache, so no answer outlives its check). The answer's body is read chunk by chunk, never
whole.

Failures are gateway errors: a URL that may not be fetched, a refused or failed connection, an origin that answers
with an error (an expired URL) or a video over ``[content] max_bytes`` are 502 ``video_unavailable``; the origin
going silent past the timeouts is 504 ``upstream_timeout``; a 401 from the upstream's own origin (the key sent was
rejected) is 502 ``upstream_auth_failed``, as from the API. An origin that got the key may echo it: the key is
masked in every message, and ``Fetched.header`` never returns a value holding it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.config import ContentSettings
from gateway.content.origin import Hop, Origin, plan_hop, redirect_target
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.hygiene import USER_AGENT, mask_text
from gateway.validation.media_guard import Resolver, system_resolver
from gateway.validation.media_urls import is_private_address, parse_ip_literal

MAX_REDIRECTS: Final = 3
CHUNK_BYTES: Final = 256 * 1024
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

Dial = Callable[[str, int], tuple[str, int]]
"""Where to connect for a checked (address, port): the same in production; tests map test addresses to loopback."""

AuthFailed = Callable[[int, str], GatewayError]
"""Told the upstream's origin rejected the key (status, route label): counts and logs it, returns the error to raise."""


def _auth_failed(status: int, route: str) -> GatewayError:
    return UpstreamUnavailable(
        "The upstream rejected the gateway's upstream key; the operator has been alerted.", code="upstream_auth_failed"
    )


def _direct(address: str, port: int) -> tuple[str, int]:
    return address, port


def video_unavailable(message: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(message, code="video_unavailable")


def whole_number(value: str | None) -> int | None:
    """A header's non-negative integer of at most 19 ASCII digits (a size), or None."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 19:
        return None
    return int(value)


class AddressRefused(OSError):
    """A video host name that resolves to a private address (or to nothing usable)."""


class GuardedResolver(AbstractResolver):
    """aiohttp resolver for other origins: every address public, or no connection at all."""

    def __init__(self, resolve: Resolver, dial: Dial, timeout_s: float) -> None:
        self._resolve = resolve
        self._dial = dial
        self._timeout_s = timeout_s

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.rstrip(".")
        try:
            async with asyncio.timeout(self._timeout_s):
                addresses = await self._resolve(name)
        except (OSError, TimeoutError) as exc:
            raise AddressRefused(f"{name!r} could not be resolved") from exc
        parsed = [parse_ip_literal(address) for address in addresses]
        if not parsed or any(ip is None or is_private_address(ip) for ip in parsed):
            raise AddressRefused(f"{name!r} resolves to a private, loopback, link-local or reserved address")
        results: list[ResolveResult] = []
        for ip in parsed:
            assert ip is not None
            address, connect_port = self._dial(str(ip), port)
            results.append(
                {
                    "hostname": name,
                    "host": address,
                    "port": connect_port,
                    "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return results

    async def close(self) -> None:
        return None


@dataclass
class Fetched:
    """An origin's answer whose body has not been read yet: read it with ``chunks`` or drop it with ``close``."""

    status: int
    response: aiohttp.ClientResponse
    credentials: bool
    key: str = ""  # the key sent, if any

    def header(self, name: str) -> str | None:
        """The origin's header, or None when absent or when it quotes the key it was sent."""
        value = self.response.headers.get(name)
        if value is not None and self.key and self.key in value:
            return None
        return value

    @property
    def content_length(self) -> int | None:
        return whole_number(self.header("content-length"))

    async def chunks(self, limit: int, *, skip: int = 0, take: int | None = None) -> AsyncGenerator[bytes, None]:
        """The body in chunks; ``skip`` bytes dropped first, at most ``take`` sent; more than ``limit`` aborts."""
        seen = 0
        left = take
        try:
            async for chunk in self.response.content.iter_chunked(CHUNK_BYTES):
                seen += len(chunk)
                if seen > limit:
                    raise video_unavailable("The video is larger than the configured limit.")
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                if left is not None:
                    chunk = chunk[:left]
                    left -= len(chunk)
                if chunk:
                    yield chunk
                if left == 0:
                    return
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("The video's origin stopped sending.", code="upstream_timeout") from exc
        except aiohttp.ClientError as exc:
            raise video_unavailable(f"The video's origin failed mid-transfer ({type(exc).__name__}).") from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()


class VideoFetcher:
    """One per app: the two connection pools (the upstream's origin, and guarded other origins)."""

    def __init__(
        self,
        settings: ContentSettings,
        upstream: Origin | None,
        *,
        resolver: Resolver | None = None,
        dial: Dial | None = None,
        auth_failed: AuthFailed | None = None,
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._auth_failed = auth_failed or _auth_failed
        self._resolver = resolver or system_resolver
        self._dial = dial or _direct
        self._trusted: aiohttp.ClientSession | None = None
        self._guarded: aiohttp.ClientSession | None = None

    def _session(self, hop: Hop) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._settings.connect_timeout_s, sock_read=self._settings.read_timeout_s
        )
        # No connection cap of aiohttp's own (100 by default, waited for without a timeout): downloads are already
        # bounded by [server] max_in_flight, and a cap here would stall the 101st behind slow clients.
        if hop.credentials:
            if self._trusted is None:
                self._trusted = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    timeout=timeout,
                    auto_decompress=False,
                    read_bufsize=CHUNK_BYTES,
                )
            return self._trusted
        if self._guarded is None:
            resolver = GuardedResolver(self._resolver, self._dial, self._settings.connect_timeout_s)
            connector = aiohttp.TCPConnector(limit=0, resolver=resolver, use_dns_cache=False)
            self._guarded = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, read_bufsize=CHUNK_BYTES
            )
        return self._guarded

    async def open(self, url: str, key: str, *, range_header: str | None = None) -> Fetched:
        """GET ``url`` (following redirects, each hop checked) up to the answer's headers."""
        for _ in range(MAX_REDIRECTS + 1):
            hop = plan_hop(url, self._upstream)
            if isinstance(hop, str):  # a redirect's URL came from an origin that may have had the key
                raise video_unavailable(mask_text(f"The video may not be fetched: {hop}.", (key,)))
            response = await self._get(hop, key, range_header)
            if response.status not in _REDIRECTS:
                return self._answer(response, hop, key)
            location = response.headers.get("location")
            response.close()
            target = redirect_target(url, location)
            if target is None:
                raise video_unavailable("The video's origin redirected without a Location.")
            url = target
        raise video_unavailable(f"The video's origin redirected more than {MAX_REDIRECTS} times.")

    async def _get(self, hop: Hop, key: str, range_header: str | None) -> aiohttp.ClientResponse:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if hop.credentials and key:
            headers["Authorization"] = f"Bearer {key}"
        if range_header is not None:
            headers["Range"] = range_header
        try:
            return await self._session(hop).get(hop.url, headers=headers, allow_redirects=False)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise video_unavailable(mask_text(f"The video may not be fetched: {exc.os_error}.", (key,))) from exc
            raise video_unavailable("The video's origin could not be reached.") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("The video's origin did not answer in time.", code="upstream_timeout") from exc
        except aiohttp.ClientError as exc:
            raise video_unavailable(f"The video's origin failed ({type(exc).__name__}).") from exc

    def _answer(self, response: aiohttp.ClientResponse, hop: Hop, key: str) -> Fetched:
        status = response.status
        if status in (200, 206, 416):
            fetched = Fetched(status, response, hop.credentials, key if hop.credentials else "")
            length = fetched.content_length
            if status == 200 and length is not None and length > self._settings.max_bytes:
                fetched.close()
                raise video_unavailable(
                    f"The video is {length} bytes, more than the configured limit of {self._settings.max_bytes}."
                )
            return fetched
        response.close()
        if status == 401 and hop.credentials and key:
            raise self._auth_failed(status, "video_url")
        raise video_unavailable(f"The video's origin answered {status}; its URL may have expired.")

    async def aclose(self) -> None:
        for session in (self._trusted, self._guarded):
            if session is not None:
                await session.close()
