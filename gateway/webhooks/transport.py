"""The HTTP side of a delivery: one POST to a pinned ``Target``, and nothing else touches the network.

``WebhookTransport`` is the seam tests replace. ``AiohttpWebhookTransport`` connects to ``target.address`` (the
checked IP: aiohttp is given the address, so it has no name to resolve) and sends the registered name in ``Host``
and, for https, in TLS SNI and the certificate check (``server_hostname``). Connections are not kept alive
(``force_close``): a pooled connection would outlive the check that allowed it, and webhook hosts come and go.
Redirects are not followed (a 3xx is a failed attempt), so a public receiver cannot bounce a delivery inside.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp
from yarl import URL

from gateway.webhooks.targets import Target

Headers = list[tuple[str, str]]


class WebhookTransport(Protocol):
    async def post(self, target: Target, headers: Headers, body: bytes) -> int:
        """POST ``body`` to ``target.address``; the response status (any exception is a failed attempt)."""
        ...

    async def aclose(self) -> None: ...


class AiohttpWebhookTransport:
    """Webhook POSTs on aiohttp, bounded by ``timeout_s`` for the whole exchange and ``connect_timeout_s``."""

    def __init__(self, *, timeout_s: float, connect_timeout_s: float = 5.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(connect_timeout_s, timeout_s))
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created inside the running loop (aiohttp binds a session to it)
            connector = aiohttp.TCPConnector(force_close=True, use_dns_cache=False, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False, trust_env=False
            )
        return self._session

    async def post(self, target: Target, headers: Headers, body: bytes) -> int:
        address = f"[{target.address}]" if ":" in target.address else target.address
        url = f"{target.scheme}://{address}:{target.port}{target.target}"
        sni = target.name if target.scheme == "https" and target.name != target.address else None
        async with self._client().post(
            URL(url, encoded=True),
            data=body,
            headers=[*headers, ("Host", target.host_header)],
            allow_redirects=False,
            server_hostname=sni,
        ) as response:
            return response.status

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
