"""The services one app runs on, built once at start-up by the app factory and handed to the handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.keyring import KeyAuthenticator
from gateway.keys import RateLimiter, SharedRateLimiter
from gateway.ledger import Ledger
from gateway.media_guard import MediaGuard
from gateway.metrics import Metrics
from gateway.pricing import PriceTable
from gateway.status_cache import StatusPoller
from gateway.store import Store
from gateway.upstream import UpstreamClient
from gateway.validation import ValidationOptions


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    log: Any
    upstream: UpstreamClient
    auth: Authenticator
    validation: ValidationOptions
    media_guard: MediaGuard | None
    prices: PriceTable
    store: Store
    ledger: Ledger
    limiter: RateLimiter
    status: StatusPoller
    clock: Callable[[], float]
    #: Named readiness checks; each returns a problem string or None.
    ready_checks: list[Callable[[], Awaitable[str | None]]] = field(default_factory=list)
    shutting_down: bool = False
    #: Per-key limits counted in Redis for every replica (``[cache] url = "redis://..."``); else ``limiter``.
    shared_limiter: SharedRateLimiter | None = None

    async def readiness(self) -> list[str]:
        if self.shutting_down:
            return ["shutting down"]
        problems = []
        for check in self.ready_checks:
            problem = await check()
            if problem:
                problems.append(problem)
        return problems

    async def keys_changed(self) -> None:
        """Apply a key change made through this process at once (other processes follow within a second)."""
        if isinstance(self.auth, KeyAuthenticator):
            await self.auth.load()
