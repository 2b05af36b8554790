"""The DNS half of the private-media rule: media host names that resolve only to private addresses.

``validation`` rejects private IP literals and special-use names without any I/O and leaves the remaining
host names in ``ValidRequest.media_hosts``. ``MediaGuard.check`` resolves them — bounded, cached and
shared — and answers ``private_media_url`` for ``image``/``last_image`` when *every* address of the name
is private (SPEC: "names that resolve only to such addresses"); a name with any public address passes.

The check is best effort, never a reason to fail a request: a lookup that errors or exceeds ``timeout_s``
lets the request through (and the upstream fetches the media from its own network anyway; this guard
keeps clients from pointing it at obviously internal names, it does not defeat DNS rebinding).

- Results are cached per name in a bounded LRU: answers for ``cache_ttl_s``, failures for the shorter
  ``failure_ttl_s`` (so a transient resolver hiccup is retried soon), both on the injected ``clock``.
- Concurrent checks of one name share a single lookup; a caller that is cancelled does not cancel it.
- The resolver is injected (``hostname -> list of address strings``); the default asks the event loop's
  ``getaddrinfo``, which runs in the default executor — a timed-out lookup is abandoned, not killed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from gateway.bounded import LRUCache
from gateway.errors import Problem
from gateway.validation.checks import ValidRequest
from gateway.validation.media_urls import is_private_address, media_host, parse_ip_literal

Resolver = Callable[[str], Awaitable[list[str]]]

MEDIA_PARAMS = ("image", "last_image")


async def system_resolver(host: str) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``host`` (IPv4 and IPv6), as strings."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def private_only(addresses: list[str]) -> bool:
    """Whether a name with these addresses is private: it has some, and none of them is public.

    Strings that are not addresses are ignored (they prove nothing either way).
    """
    parsed = [parse_ip_literal(address) for address in addresses]
    known = [ip for ip in parsed if ip is not None]
    return bool(known) and all(is_private_address(ip) for ip in known)


class MediaGuard:
    """Resolves media host names and reports those that lead only into private networks.

    One instance per process (it owns the cache), e.g. ``MediaGuard(timeout_s=0.5)`` for the system
    resolver or ``MediaGuard(fake_resolve, clock=fake_clock)`` in tests; then
    ``problems = await guard.check(result.request)`` after a successful ``validate``.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        timeout_s: float = 0.5,
        cache_ttl_s: float = 300.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        failure_ttl_s: float = 30.0,
    ) -> None:
        if timeout_s <= 0 or cache_ttl_s < 0 or failure_ttl_s < 0 or cache_size < 0:
            raise ValueError("timeout_s must be positive; cache_ttl_s, failure_ttl_s, cache_size not negative")
        self._resolve: Resolver = resolver or system_resolver
        self._timeout_s = timeout_s
        self._ttl_s = cache_ttl_s
        self._failure_ttl_s = min(failure_ttl_s, cache_ttl_s)
        self._size = cache_size
        self._clock = clock
        self._cache: LRUCache[str, tuple[float, bool]] = LRUCache(max(1, cache_size))  # host -> (expires, private)
        self._inflight: dict[str, asyncio.Task[bool]] = {}

    async def check(self, request: ValidRequest) -> tuple[Problem, ...]:
        """``private_media_url`` for each of image/last_image whose host name resolves only privately."""
        if not request.media_hosts:
            return ()
        verdicts = await asyncio.gather(*(self.is_private(host) for host in request.media_hosts))
        private = {host for host, verdict in zip(request.media_hosts, verdicts, strict=True) if verdict}
        if not private:
            return ()
        problems = []
        for param in MEDIA_PARAMS:
            host = media_host(request.body.get(param))
            if host in private:
                problems.append(
                    Problem(
                        param,
                        "private_media_url",
                        f"{param} must be publicly reachable, but {host!r} resolves only to private, "
                        "loopback, link-local or reserved addresses",
                    )
                )
        return tuple(problems)

    async def is_private(self, host: str) -> bool:
        """Whether ``host`` resolves only to private addresses; ``False`` when that cannot be found out."""
        cached = self._cache.peek(host)
        if cached is not None:
            if cached[0] > self._clock():
                self._cache.touch(host)
                return cached[1]
            self._cache.pop(host)
        task = self._inflight.get(host)
        if task is None:
            task = asyncio.create_task(self._lookup(host))
            self._inflight[host] = task
            task.add_done_callback(lambda done: self._forget(host, done))
        return await asyncio.shield(task)

    def _forget(self, host: str, task: asyncio.Task[bool]) -> None:
        if self._inflight.get(host) is task:
            del self._inflight[host]

    async def _lookup(self, host: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                addresses = await self._resolve(host)
        except Exception:  # any resolver failure or TimeoutError: do not reject on what we could not learn
            self._remember(host, False, self._failure_ttl_s)
            return False
        verdict = private_only(addresses)
        self._remember(host, verdict, self._ttl_s)
        return verdict

    def _remember(self, host: str, verdict: bool, ttl_s: float) -> None:
        if self._size == 0 or ttl_s == 0:
            return
        self._cache.put(host, (self._clock() + ttl_s, verdict))
