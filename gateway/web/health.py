"""``/healthz`` (the process answers) and ``/readyz`` (it can serve: store reachable, not shutting down)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.web.bodies import json_response


class HealthRoutes:
    """``readiness`` returns the problems that make the gateway unready (none: ready)."""

    def __init__(self, readiness: Callable[[], Awaitable[list[str]]]) -> None:
        self._readiness = readiness

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problems = await self._readiness()
        if problems:
            return json_response({"status": "unavailable", "problems": problems}, status=503)
        return json_response({"status": "ready"})

    def routes(self) -> list[BaseRoute]:
        return [Route("/healthz", self.healthz, methods=["GET"]), Route("/readyz", self.readyz, methods=["GET"])]
