"""The services one app runs on, built once at start-up by the app factory's lifespan and closed at shutdown.

Handlers are given the few services each needs when they are built; this record is what the lifespan itself
keeps (background loops, shutdown, readiness) and what ``app.state.services`` shows tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.accounts.pool import AccountPool
from gateway.auth.keyring import KeyAuthenticator
from gateway.auth.principal import Authenticator
from gateway.auth.rate_limits import KeyRateLimits
from gateway.config import Settings
from gateway.content.archiver import Archiver
from gateway.content.service import ContentService
from gateway.ledger.service import Ledger
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.status.poller import StatusPoller
from gateway.store.base import Store
from gateway.upstream.client import UpstreamClient


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    log: Logger
    store: Store
    upstream: UpstreamClient
    auth: Authenticator
    rate_limits: KeyRateLimits
    ledger: Ledger
    status: StatusPoller
    clock: Callable[[], float]
    #: The upstream accounts: keys, states, capacity bookkeeping (SPEC section 9).
    accounts: AccountPool
    #: Named readiness checks; each returns a problem string or None.
    ready_checks: list[Callable[[], Awaitable[str | None]]] = field(default_factory=list)
    shutting_down: bool = False
    #: ``GET|HEAD /v1/videos/{id}/content`` and, when ``[archive] url`` is set, the background copier.
    content: ContentService | None = None
    archiver: Archiver | None = None

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
