"""``HttpxTransport``: the upstream client's ``Transport`` over any httpx transport, for tests and the benchmarks.

Unit tests plug in ``httpx.MockTransport`` exactly where the network would be; httpx errors become the client's
``TransportError`` tree just as the production transport's do.
"""

from __future__ import annotations

import time

import httpx

from gateway.config import UpstreamSettings
from gateway.upstream.client import BadResponse, ConnectFailed, Headers, TimedOut, UpstreamResponse


class HttpxTransport:
    """Adapter for any httpx transport (``httpx.MockTransport`` in unit tests, ``ASGITransport`` for an app)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, settings: UpstreamSettings | None = None) -> None:
        settings = settings or UpstreamSettings()
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(
                settings.timeout_s,
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                pool=settings.pool_timeout_s,
            ),
        )

    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse:
        started = time.perf_counter()
        try:
            response = await self._client.request(method, url, headers=headers, content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ConnectFailed(type(exc).__name__) from None
        except httpx.TimeoutException as exc:
            raise TimedOut(type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise BadResponse(type(exc).__name__) from None
        return UpstreamResponse(
            status=response.status_code,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw],
            body=response.content,
            elapsed_s=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
