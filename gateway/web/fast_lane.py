"""The fast lane: status polls and submissions handled start to finish in one plain-ASGI step.

These two routes are nearly all of the traffic. Through the general stack a request passes four ASGI layers
(request context, overload, Starlette's exception middleware and router: a regex per route until one matches,
then a per-route request/response wrapper), each wrapping ``send``; that was a third of a cached poll's CPU.
``GatewayApp`` (the app ``create_app`` returns) asks the lane first, before Starlette's own error middleware and
the app's middleware. It recognises exactly ``GET /v1/videos/{task_id}`` and
``POST /v1/video/generations`` and does, inline and in the same order, what those layers do: request id and
header limit and the access line and request metrics (``RequestBook``), the in-flight bound (``Overload``), the
same handler with the same ``Route`` in the scope (the metrics' route label), and errors answered by the same
``ErrorResponder`` as Starlette's exception handlers. Anything else, including other methods on these paths and
trailing-slash or deeper paths, goes down the general stack exactly as before.
"""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.logs import REQUEST_ID
from gateway.web.error_responses import ErrorResponder
from gateway.web.middleware import RequestBook, answer_error
from gateway.web.overload import Overload

_STATUS_PREFIX = "/v1/videos/"


class FastLane:
    """Plain ASGI handling of the two hot routes (``GatewayApp`` asks it first; everything else is Starlette's)."""

    def __init__(
        self,
        *,
        submit: Route,
        status: Route,
        book: RequestBook,
        overload: Overload,
        errors: ErrorResponder,
    ) -> None:
        self._submit = submit
        self._status = status
        self._submit_path = submit.path
        self._book = book
        self._overload = overload
        self._errors = errors

    def route_for(self, scope: Scope) -> Route | None:
        """The hot route ``scope`` is for (its path parameters set in the scope), or None."""
        if scope["type"] != "http" or scope.get("root_path"):
            return None
        method = scope["method"]
        path: str = scope["path"]
        if method == "GET" and path.startswith(_STATUS_PREFIX):
            task_id = path[len(_STATUS_PREFIX) :]
            if task_id and "/" not in task_id:
                scope["path_params"] = {"task_id": task_id}
                return self._status
        elif method == "POST" and path == self._submit_path:
            scope["path_params"] = {}
            return self._submit
        return None

    async def serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one request for ``route`` start to finish."""
        book = self._book
        started = time.perf_counter()
        request_id, fields = book.open(scope)
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        status = 500
        answered = False
        context_token = REQUEST_ID.set(request_id)
        try:
            too_large = book.headers_too_large(scope)
            if too_large is not None:
                answered = True
                status = too_large.status
                await answer_error(_with_request_id(send, request_id), too_large, request_id)
                return
            limiter = self._overload.limiter
            if not await limiter.acquire():
                answered = True
                status = await self._overload.refuse(scope, _with_request_id(send, request_id))
                return
            try:
                request = Request(scope, receive)
                try:
                    response = await route.endpoint(request)
                except Exception as exc:
                    error_response = self._errors.respond(request, exc)
                    if error_response is None:
                        raise
                    response = error_response
                status = response.status_code
                headers = response.raw_headers
                headers.append((b"x-request-id", request_id.encode("ascii")))
                headers.extend(book.rate_pairs(fields))
                answered = True
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": response.body})
            finally:
                limiter.release()
        except Exception as exc:
            # Answer in the gateway's own error shape (with the request id), then let the server log the trace.
            book.unhandled(scope, exc)
            if not answered:
                status = 500
                failure = GatewayError("The gateway failed to handle this request.")
                await answer_error(_with_request_id(send, request_id), failure, request_id)
            raise
        finally:
            REQUEST_ID.reset(context_token)
            book.close(scope, request_id, fields, status, time.perf_counter() - started)


def _with_request_id(send: Send, request_id: str) -> Send:
    """``send`` that adds ``X-Request-ID`` to the response start (for the lane's rare error answers)."""
    header = (b"x-request-id", request_id.encode("ascii"))

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return send_with_id


class GatewayApp(Starlette):
    """The Starlette app, with the fast lane asked first (before Starlette's own error middleware and router)."""

    fast_lane: FastLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.fast_lane
        if lane is not None:
            route = lane.route_for(scope)
            if route is not None:
                scope["app"] = self
                await lane.serve(route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)
