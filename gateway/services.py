"""The services one app runs on, built once at start-up by the app factory and handed to the handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.guard import GuessLimiter
from gateway.auth.keyring import KeyAuthenticator
from gateway.auth.principal import Authenticator
from gateway.config import Settings
from gateway.keys import RateLimiter, SharedRateLimiter
from gateway.ledger.pricing import PriceTable
from gateway.ledger.service import Ledger
from gateway.metrics import Metrics
from gateway.status.poller import StatusPoller
from gateway.store.base import Store
from gateway.upstream.client import UpstreamClient
from gateway.validation.checks import ValidationOptions
from gateway.validation.media_guard import MediaGuard


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
    #: Wrong admin tokens per client address (429 ``too_many_auth_failures`` after repeated ones).
    admin_guard: GuessLimiter = field(default_factory=GuessLimiter)

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
