"""Upstream-compatible handlers: each reads as the pipeline steps it runs; the steps live in their own modules."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.accounts.pool import AccountPool
from gateway.auth.authenticate import ClientAuthentication
from gateway.auth.principal import Principal
from gateway.catalog import DEFAULT_ACCOUNT, TASK_ID_SHAPE
from gateway.content.answer import rewrite_video_url
from gateway.content.service import ContentService
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Problem,
    UnsupportedMediaType,
    UpstreamUnavailable,
)
from gateway.keys import model_allowed
from gateway.ledger.pricing import Estimate, PriceTable
from gateway.ledger.service import BudgetHold, DuplicateTaskId, Ledger, Submission
from gateway.logs import Logger
from gateway.status.fetch import STATUS_ROUTE
from gateway.status.poller import StatusPoller
from gateway.store.base import TaskRecord
from gateway.upstream.client import UpstreamClient, UpstreamResponse, inbound_headers
from gateway.validation.checks import ValidRequest
from gateway.validation.request_checks import RequestChecks
from gateway.web.bodies import encode_headers, json_response, read_body, read_json_object, unread_coding
from gateway.web.idempotency import IdempotencyRecords, idempotency_key
from gateway.web.middleware import log_fields, request_id_of
from gateway.web.verdict import verdict

__all__ = ["CONTENT_ROUTE", "PASSTHROUGH_ROUTE", "STATUS_ROUTE", "SUBMIT_ROUTE", "GatewayRoutes"]

SUBMIT_ROUTE = "/v1/video/generations"
CONTENT_ROUTE = "/v1/videos/{task_id}/content"
PASSTHROUGH_ROUTE = "/v1/{path:path}"
_STATUS_PATH_PREFIX = "/v1/videos/"
_TASK_ID = re.compile(TASK_ID_SHAPE)  # never "." or ".."
_ENCODED_HEADER_MEMO = 1024


class GatewayRoutes:
    """The upstream-compatible handlers and ``POST /gateway/validate``, given everything they use when built."""

    def __init__(
        self,
        *,
        clients: ClientAuthentication,
        checks: RequestChecks,
        idempotency: IdempotencyRecords,
        ledger: Ledger,
        upstream: UpstreamClient,
        statuses: StatusPoller,
        prices: PriceTable,
        log: Logger,
        max_body_bytes: int,
        passthrough_enabled: bool,
        content: ContentService | None = None,
        video_url_base: str | None = None,
        accounts: AccountPool,
    ) -> None:
        """``content`` serves ``/v1/videos/{id}/content``; with ``video_url_base`` (``[archive] rewrite_video_url``),
        completed status answers point ``video_url`` at ``<video_url_base>/v1/videos/{id}/content``."""
        self._clients = clients
        self._checks = checks
        self._idempotency = idempotency
        self._ledger = ledger
        self._upstream = upstream
        self._statuses = statuses
        self._prices = prices
        self._log = log
        self._max_body_bytes = max_body_bytes
        self._passthrough_enabled = passthrough_enabled
        self._content = content
        self._video_url_base = video_url_base
        self._accounts = accounts
        self._encoded_headers: dict[tuple[tuple[tuple[str, str], ...], str], list[tuple[bytes, bytes]]] = {}

    # -- upstream-compatible -------------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        """POST /v1/video/generations: auth → validate → limits → idempotency → forward → record → respond."""
        principal = await self._clients.authenticate(request.headers.get("authorization"), log_fields(request.scope))
        body = await read_json_object(request, self._max_body_bytes)
        result = await self._checks.validated(body)
        valid = self._checks.require_valid(result)
        log_fields(request.scope).update(model=valid.model, mode=valid.mode)
        self.authorize_model(principal, valid)
        estimate = self._ledger.estimate(valid)
        idem_key = idempotency_key(request)
        if idem_key is not None:
            replay = await self._idempotency.claim(principal, idem_key, body)
            if replay is not None:
                return replay  # a finished repeat answers as the first time did, budget or not
        try:
            async with self._ledger.budget_hold(principal) as budget:
                response = await self.forward_submission(request, principal, valid, estimate, result.warnings, budget)
        except Exception:
            # Failed (not cancelled): the same key may be retried. A cancelled attempt keeps its in-flight record
            # (409 to repeats) until it is taken over, since the upstream may have the task.
            if idem_key is not None:
                await self._idempotency.release(principal, idem_key)
            raise
        if idem_key is not None:
            await self._idempotency.finish(principal, idem_key, response)
        return response

    async def forward_submission(
        self,
        request: Request,
        principal: Principal,
        valid: ValidRequest,
        estimate: Estimate,
        validation_warnings: tuple[Problem, ...],
        budget: BudgetHold | None = None,
    ) -> Response:
        """Account → intent → upstream → task row (before the client sees 200) → the upstream's answer.

        The intent is the admission of the account's capacity and, for a budgeted key, of its budget: the first
        intent admitted takes the submission's hold (429 ``budget_exceeded`` before anything goes upstream, or
        before a wait for capacity), which stays with the submission when it moves to another account.

        An account the upstream refuses (capacity, rate, key) is set aside and the submission tried on the next one
        with room; only a refused submission moves (the upstream did not accept it), never one that timed out or was
        cut off. When no account can take it, the gateway says why (``AccountPool.no_account_error``): 502
        ``upstream_auth_failed`` when every account's key was rejected, else 429 ``upstream_capacity`` (over budget
        first: 429 ``budget_exceeded``). One account without a limit passes a refusal through.
        """
        accounts, ledger, request_id = self._accounts, self._ledger, self.request_id(request)
        body = orjson.dumps(valid.body)
        tried: set[str] = set()
        last_refusal: UpstreamResponse | None = None
        while True:
            placed = await self.place(
                principal, valid, estimate, request_id, tried, wait=last_refusal is None, budget=budget
            )
            if placed is None:
                await ledger.check_budget(principal, estimate, budget)  # over budget: that is the answer
                raise accounts.no_account_error(valid.model)
            account, submission = placed
            try:
                upstream = await self._upstream.request(
                    "POST",
                    SUBMIT_ROUTE,
                    route=SUBMIT_ROUTE,
                    request_id=request_id,
                    client_headers=request.headers.items(),
                    body=body,
                    account=account,
                    idempotency_key=self.upstream_idempotency_key(request, principal, account),
                    auth_refusal_to_caller=True,
                )
            except UpstreamUnavailable as exc:
                if not exc.request_sent:
                    await ledger.refused(submission)
                raise  # sent but unanswered: the intent stays, listed as outcome unknown
            self.note_upstream(request, upstream)
            if 200 <= upstream.status < 300:
                break
            await ledger.refused(submission)
            reason = await accounts.refused(account, upstream.status, upstream.body, upstream.header("retry-after"))
            if reason is None or accounts.simple:
                return self.refusal_response(upstream)
            tried.add(account)
            last_refusal = upstream
        log_fields(request.scope)["account"] = account
        task = await self.record_task(submission, upstream)
        log_fields(request.scope)["task_id"] = task.task_id
        warnings = [f"{w.code}: {w.message}" for w in validation_warnings]
        if estimate.duration_defaulted:
            warnings.append(
                f"duration_defaulted: no duration given; estimated at {estimate.seconds} s "
                "(settled at the seconds the upstream reports)"
            )
        return self.passthrough_response(upstream, warnings=warnings)

    async def place(
        self,
        principal: Principal,
        valid: ValidRequest,
        estimate: Estimate,
        request_id: str,
        tried: set[str],
        *,
        wait: bool,
        budget: BudgetHold | None = None,
    ) -> tuple[str, Submission] | None:
        """The account for this submission and its intent (capacity admitted), or None when none can take it."""
        accounts, ledger = self._accounts, self._ledger
        if accounts.simple:  # one account without a limit: the plain intent write, no choice, no count
            account = accounts.names[0]
            if tried or accounts.unauthorized(account):  # a rejected key is refused here until it changes
                return None
            submission = await ledger.begin(principal, valid, estimate, request_id, account, budget=budget)
            return None if submission is None else (account, submission)

        async def admit(account: str, limit: int) -> Submission | None:
            return await ledger.begin(
                principal, valid, estimate, request_id, account, limit, accounts.hold_since(), budget
            )

        async def before_wait() -> None:  # an over-budget submission is answered at once, not after the wait
            await ledger.check_budget(principal, estimate, budget)

        return await accounts.place(valid.model, admit, exclude=tried, wait=wait, before_wait=before_wait)

    async def record_task(self, submission: Submission, upstream: UpstreamResponse) -> TaskRecord:
        answer = self.parsed_object(upstream) or {}
        task_id = answer.get("task_id") or answer.get("id")
        if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
            # Accepted but unusable: the intent stays as outcome unknown for reconciliation.
            self._log.error("upstream_task_without_id", intent_id=submission.intent_id)
            raise self._upstream.invalid_response()
        try:
            return await self._ledger.accepted(submission, task_id)
        except DuplicateTaskId as exc:
            # An id the ledger already holds: its owner keeps it; this submission stays as outcome unknown.
            self._log.error(
                "upstream_task_id_reused",
                task_id=task_id,
                intent_id=submission.intent_id,
                same_key=exc.owner == submission.principal.name,
            )
            raise self._upstream.invalid_response() from None

    async def status(self, request: Request) -> Response:
        """GET /v1/videos/{task_id}: auth → ownership → cache/coalesce → upstream response."""
        principal = await self._clients.authenticate(request.headers.get("authorization"), log_fields(request.scope))
        task = await self.owned_task(principal, request.path_params["task_id"])
        log_fields(request.scope).update(model=task.model, task_id=task.task_id)
        # A settled task's final answer is in the ledger: served from there even after expiry or a restart.
        try:
            outcome = await self._statuses.poll(task.task_id, terminal_body=task.terminal_body)
        except GatewayError as exc:  # nothing cached to serve stale: still say where the answer came from
            exc.headers["X-Cache"] = "MISS"
            raise
        log_fields(request.scope)["cache"] = outcome.x_cache
        body = outcome.body
        if self._video_url_base is not None:  # clients keep a URL that outlives the upstream's
            body = rewrite_video_url(body, self._video_url_base, task.task_id)
        response = Response(body, status_code=outcome.status_code)
        response.raw_headers.extend(self.encoded_status_headers(outcome.headers, outcome.x_cache))
        return response

    async def content(self, request: Request) -> Response:
        """GET|HEAD /v1/videos/{task_id}/content: auth → ownership → the video's bytes (gateway.content)."""
        principal = await self._clients.authenticate(request.headers.get("authorization"), log_fields(request.scope))
        task = await self.owned_task(principal, request.path_params["task_id"])
        log_fields(request.scope).update(model=task.model, task_id=task.task_id)
        if self._content is None:
            raise NotFound(f"No route {request.url.path}.", code="not_found")
        return await self._content.serve(request, task)

    def encoded_status_headers(self, headers: tuple[tuple[str, str], ...], x_cache: str) -> list[tuple[bytes, bytes]]:
        """A poll answer's end-to-end headers plus ``X-Cache``, encoded once per distinct header set."""
        memo_key = (headers, x_cache)
        encoded = self._encoded_headers.get(memo_key)
        if encoded is None:
            encoded = [*encode_headers(inbound_headers(headers)), (b"x-cache", x_cache.encode())]
            if len(self._encoded_headers) >= _ENCODED_HEADER_MEMO:
                self._encoded_headers.clear()
            self._encoded_headers[memo_key] = encoded
        return encoded

    async def passthrough(self, request: Request) -> Response:
        """Other /v1/... paths: forwarded with the key injected when ``[proxy] passthrough`` is on.

        The gateway's own two paths with another method are 405 with ``Allow`` (never forwarded), and
        ``POST /v1/videos`` (the openai SDK's ``videos.create``) is 404 with a pointer to the submit route.
        """
        allowed = _allowed_methods(request.url.path)
        if allowed is not None:
            raise HTTPException(405, "Method Not Allowed", headers={"Allow": allowed})
        if request.url.path.rstrip("/") == "/v1/videos" and request.method == "POST":
            raise NotFound(
                "No route POST /v1/videos: submit with POST /v1/video/generations (the Kling API's shape; "
                "the openai SDK's client.videos.create does not fit it, use client.post or plain HTTP).",
                code="not_found",
            )
        if not self._passthrough_enabled:
            raise NotFound(f"No route {request.url.path}.", code="not_found")
        principal = await self.authenticate(request)
        path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        query = request.scope.get("query_string", b"").decode("latin-1")
        if not passthrough_path_ok(path) or not passthrough_query_ok(query):
            # Only the normal form goes up: other spellings (//, case, ;params, %-escapes) could name another
            # key's task in a way the ownership check below does not read, and the team key must never reach a
            # path the upstream would resolve outside /v1/.
            raise InvalidRequest(
                "Pass-through paths must be /v1/ followed by plain segments (letters, digits, '.', '_', '-', '~'), "
                "without empty, '.' or '..' segments, parameters or percent-escapes.",
                code="invalid_path",
                param="path",
            )
        account = self._accounts.names[0] if self._accounts.names else DEFAULT_ACCOUNT
        segments = path.split("/")
        if len(segments) > 3 and segments[1:3] == ["v1", "videos"]:
            account = (await self.owned_task(principal, segments[3])).account  # tenancy, and the task's account
        for candidate in task_id_candidates(path, query):
            task = await self._ledger.find(candidate)
            if task is None:
                continue
            if task.key_name != principal.name:  # whatever names another key's task, however spelled
                raise NotFound("No such task for this key.", code="task_not_found", param="task_id")
            account = task.account
        if unread_coding(None, request.headers.get("transfer-encoding")) is not None:
            # Transfer codings are hop-by-hop: forwarding the still-coded bytes without the header would corrupt them.
            raise UnsupportedMediaType(
                "Send the body without a transfer coding other than chunked.",
                code="unsupported_encoding",
                param="transfer-encoding",
            )
        body = await read_body(request, self._max_body_bytes)
        if query:
            path = f"{path}?{query}"
        upstream = await self._upstream.request(
            request.method,
            path,
            route=PASSTHROUGH_ROUTE,
            request_id=self.request_id(request),
            client_headers=request.headers.items(),
            body=body or None,
            account=account,
        )
        self.note_upstream(request, upstream)
        return self.passthrough_response(upstream)

    async def validate(self, request: Request) -> Response:
        """POST /gateway/validate: the same checks as a submission, answered here, never forwarded."""
        await self.authenticate(request)
        body = await read_json_object(request, self._max_body_bytes)
        return json_response(verdict(await self._checks.validated(body), self._prices))

    # -- pipeline steps ---------------------------------------------------------------------------------------------

    async def authenticate(self, request: Request) -> Principal:
        """Who is calling (401 otherwise), then their requests-per-minute limit (429)."""
        return await self._clients.authenticate(request.headers.get("authorization"), log_fields(request.scope))

    def authorize_model(self, principal: Principal, valid: ValidRequest) -> None:
        if not model_allowed(principal.models, valid.model):
            raise PermissionDenied(
                f"Key '{principal.name}' may not use model '{valid.model}' (allowed: {', '.join(principal.models)}).",
                code="model_not_allowed",
                param="model",
            )
        if principal.monthly_budget_usd is not None and not self._prices.priced(valid.model):
            # A budget cannot hold a model that costs nothing in the ledger: price it in [pricing.prices] first.
            raise PermissionDenied(
                f"Key '{principal.name}' has a monthly budget, and model '{valid.model}' has no configured price.",
                code="model_not_priced",
                param="model",
            )

    async def owned_task(self, principal: Principal, task_id: str) -> TaskRecord:
        """The caller's task; an unknown task and another key's task get the same 404."""
        task = await self._ledger.find(task_id) if _TASK_ID.fullmatch(task_id) else None
        if task is None or task.key_name != principal.name:
            raise NotFound("No such task for this key.", code="task_not_found", param="task_id")
        return task

    def upstream_idempotency_key(self, request: Request, principal: Principal, account: str) -> str | None:
        """The client's Idempotency-Key scoped to its key (an HMAC), so it never meets another key's upstream."""
        client_key = request.headers.get("idempotency-key")
        if client_key is None:
            return None
        return self._upstream.idempotency_key_for(principal.name, client_key, account)

    def refusal_response(self, upstream: UpstreamResponse) -> Response:
        """A submission the upstream refused, passed on; a rejected key (401/403) is the operator's problem, 502."""
        if upstream.status in (401, 403):
            raise self._upstream.auth_failed(upstream.status, SUBMIT_ROUTE)
        return self.passthrough_response(upstream)

    def request_id(self, request: Request) -> str:
        return request_id_of(request.scope) or ""

    def note_upstream(self, request: Request, upstream: UpstreamResponse) -> None:
        log_fields(request.scope).update(
            upstream_status=upstream.status, upstream_ms=round(upstream.elapsed_s * 1000, 3)
        )

    def parsed_object(self, upstream: UpstreamResponse) -> dict[str, Any] | None:
        """A 2xx answer's JSON object; a 2xx the gateway cannot read is 502 (errors pass through as they are)."""
        if not 200 <= upstream.status < 300:
            return None
        try:
            parsed = orjson.loads(upstream.body)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise self._upstream.invalid_response()
        return parsed

    def passthrough_response(self, upstream: UpstreamResponse, *, warnings: list[str] | None = None) -> Response:
        """The upstream's status and body unchanged, its end-to-end headers, plus gateway warnings."""
        response = Response(upstream.body, status_code=upstream.status)
        response.raw_headers.extend(encode_headers(inbound_headers(upstream.headers)))
        for warning in warnings or ():
            response.raw_headers.append((b"x-gateway-warning", _header_safe(warning)))
        return response

    def routes(self) -> list[BaseRoute]:
        return [
            Route(SUBMIT_ROUTE, self.submit, methods=["POST"]),
            Route(STATUS_ROUTE, self.status, methods=["GET"]),
            Route(CONTENT_ROUTE, self.content, methods=["GET", "HEAD"]),
            Route("/gateway/validate", self.validate, methods=["POST"]),
        ]

    def passthrough_routes(self) -> list[BaseRoute]:
        """Registered last so they never shadow the gateway's own routes."""
        return [Route(PASSTHROUGH_ROUTE, self.passthrough, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]


_PASSTHROUGH_PATH = re.compile(r"/v1(?:/[A-Za-z0-9_~\-][A-Za-z0-9._~\-]{0,199}){1,8}")
_PASSTHROUGH_QUERY = re.compile(r"[A-Za-z0-9._~\-=&,+]{0,2048}")
_CANDIDATE_SPLIT = re.compile(r"[/&=,+]")


def passthrough_path_ok(path: str) -> bool:
    """A path in normal form: ``/v1`` then 1-8 plain segments (none empty, none starting with a dot)."""
    return _PASSTHROUGH_PATH.fullmatch(path) is not None


def passthrough_query_ok(query: str) -> bool:
    """A query of plain names and values only (no percent-escapes, so what is checked is what goes up)."""
    return _PASSTHROUGH_QUERY.fullmatch(query) is not None


def task_id_candidates(path: str, query: str) -> list[str]:
    """Every path segment and query name or value shaped like a task id (after ``/v1``), once each."""
    seen: dict[str, None] = {}
    for part in [*_CANDIDATE_SPLIT.split(path[len("/v1/") :]), *_CANDIDATE_SPLIT.split(query)]:
        if part and _TASK_ID.fullmatch(part):
            seen[part] = None
    return list(seen)


def _allowed_methods(path: str) -> str | None:
    """The ``Allow`` value when ``path`` is one of the gateway's own routes (reached here with another method)."""
    if path == SUBMIT_ROUTE:
        return "POST"
    if path.startswith(_STATUS_PATH_PREFIX):
        task_id = path[len(_STATUS_PATH_PREFIX) :]
        if task_id and "/" not in task_id:
            return "GET, HEAD"
    return None


def _header_safe(text: str) -> bytes:
    """Header values are one line of visible ASCII."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return cleaned[:500].encode("ascii")
