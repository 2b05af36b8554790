"""The fast lane: status polls and submissions reach their handlers without Starlette's router.

These two routes are nearly all of the traffic, and Starlette's exception middleware, router (a regex per route
until one matches) and per-route request/response wrapper were a fifth of a cached poll's CPU. The lane sits
inside the request-context and overload middleware (so request ids, limits, metrics and the access line are
unchanged), recognises exactly ``GET /v1/videos/{task_id}`` and ``POST /v1/video/generations``, calls the same
handlers with the same ``Route`` in the scope (the metrics' route label), and answers errors through the same
``ErrorResponder`` as Starlette's exception handlers. Everything else, including other methods on these paths and
trailing-slash or deeper paths, goes to Starlette exactly as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.error_responses import ErrorResponder

Handler = Callable[[Request], Awaitable[Response]]
_STATUS_PREFIX = "/v1/videos/"


class FastLane:
    """Plain ASGI dispatch of the two hot routes; any other request is passed to ``app`` untouched."""

    def __init__(self, app: ASGIApp, *, submit: Route, status: Route, errors: ErrorResponder) -> None:
        self.app = app
        self._submit = submit
        self._status = status
        self._submit_path = submit.path
        self._errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            method = scope["method"]
            path: str = scope["path"]
            if method == "GET" and path.startswith(_STATUS_PREFIX):
                task_id = path[len(_STATUS_PREFIX) :]
                if task_id and "/" not in task_id:
                    scope["path_params"] = {"task_id": task_id}
                    await self._serve(self._status, scope, receive, send)
                    return
            elif method == "POST" and path == self._submit_path:
                scope["path_params"] = {}
                await self._serve(self._submit, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            answer = self._errors.respond(request, exc)
            if answer is None:
                raise
            response = answer
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
