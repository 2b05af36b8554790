"""The gateway's own JSON API: key management (admin token), the caller's tasks, and usage reports.

The admin API exists only when ``KLING_GATEWAY_ADMIN_TOKEN`` is set; without it every ``/gateway/keys`` path is
404, so an unconfigured gateway offers nothing to guess at.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.accounts.pool import AccountPool
from gateway.audit.trail import Actor, audit_view
from gateway.auth import key_admin
from gateway.auth.authenticate import AdminToken, ClientAuthentication
from gateway.auth.principal import Principal
from gateway.catalog import MODELS
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.keys import parse_model_globs
from gateway.ledger.pricing import to_report
from gateway.ledger.reports import iso_time, parse_group_by, parse_period, rollup, usage_json
from gateway.ledger.service import month_bounds
from gateway.store.base import KeyExists, KeyNotFound, KeyRevoked, Store, TaskRecord
from gateway.suggest import did_you_mean
from gateway.web.bodies import json_response, read_json_object
from gateway.web.middleware import log_fields

_PERIOD = ("since", "until")
_KEY_FIELDS = {"name", "models", "rpm", "monthly_budget_usd", "webhook_url"}


def task_view(task: TaskRecord) -> dict[str, Any]:
    """A ledger row as ``GET /gateway/tasks`` shows it (money as 4-decimal strings)."""
    return {
        "task_id": task.task_id,
        "key": task.key_name,
        "model": task.model,
        "mode": task.mode,
        "tier": task.tier,
        "audio": task.audio,
        "duration": task.duration,
        "duration_defaulted": task.duration_defaulted,
        "status": task.status,
        "progress": task.progress,
        "submitted_at": task.submitted_at,
        "estimate": {"seconds": task.estimate_seconds, "usd": to_report(task.estimate_usd)},
        "outcome": task.outcome,
        "settled": None
        if task.settled_usd is None
        else {
            "seconds": str(task.settled_seconds),
            "usd": to_report(task.settled_usd),
            "at": task.settled_at,
        },
        "request_id": task.request_id,
    }


class AdminRoutes:
    """The gateway's own API, given everything it uses when built.

    ``keys_changed`` applies a key change made here to this process at once (others follow within a second).
    """

    def __init__(
        self,
        *,
        clients: ClientAuthentication,
        admin_token: AdminToken,
        store: Store,
        keys_changed: Callable[[], Awaitable[None]],
        clock: Callable[[], float],
        max_body_bytes: int,
        rotation_grace_s: float,
        allow_private_webhooks: bool,
        accounts: AccountPool,
        known_models: Collection[str] = MODELS,
    ) -> None:
        self._clients = clients
        self._admin_token = admin_token
        self._store = store
        self._keys_changed = keys_changed
        self._clock = clock
        self._max_body_bytes = max_body_bytes
        self._rotation_grace_s = rotation_grace_s
        self._allow_private_webhooks = allow_private_webhooks
        self._accounts = accounts
        self._known_models = known_models

    # -- the caller's own ---------------------------------------------------------------------------------------

    async def tasks(self, request: Request) -> Response:
        """GET /gateway/tasks?limit=&cursor=: the caller's tasks, newest first (the admin token sees everyone's)."""
        key_name = None if self.is_admin(request) else (await self.authenticate(request)).name
        limit = _int_param(request, "limit", 50, 1, 1000)
        try:
            tasks, cursor = await self._store.tasks_for_key(key_name, limit, request.query_params.get("cursor"))
        except ValueError:
            raise InvalidRequest(
                "The cursor is not one this gateway issued.", code="invalid_cursor", param="cursor"
            ) from None
        return json_response({"data": [task_view(t) for t in tasks], "next_cursor": cursor})

    async def usage(self, request: Request) -> Response:
        """GET /gateway/usage?since=&until=&by=: the caller's usage (the admin token: everyone's)."""
        admin = self.is_admin(request)
        principal: Principal | None = None if admin else await self.authenticate(request)
        params = request.query_params
        try:
            since, until = parse_period(params.get("since"), params.get("until"), self._clock(), names=_PERIOD)
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_parameter", param=_period_param(str(exc))) from None
        try:
            group_by = parse_group_by(params.get("by", ""), name="by")
            if "account" in group_by and not admin:
                raise ValueError("by: 'account' needs the admin token")
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_parameter", param="by") from None
        if principal is None:
            rows = await self._store.usage(since, until, group_by)
        else:
            # The store groups by key first so the caller's own rows can be picked out ("key" may be asked too).
            by_key = ("key", *(dim for dim in group_by if dim != "key"))
            own = [r for r in await self._store.usage(since, until, by_key) if r.key == principal.name]
            rows = rollup(own, group_by)
        report = usage_json(rows, group_by, since, until)
        if principal is not None:
            report["budget"] = await self.month_budget(principal)
        return json_response(report)

    async def month_budget(self, principal: Principal) -> dict[str, Any]:
        """This UTC month's spend (settled + outstanding estimates), the key's budget and what remains of it."""
        start, end = month_bounds(self._clock())
        spent = await self._store.outstanding_and_settled_usd(principal.name, start, end)
        budget = principal.monthly_budget_usd
        return {
            "month_start": iso_time(start),
            "spent_usd": to_report(spent),
            "monthly_budget_usd": None if budget is None else to_report(budget),
            "remaining_usd": None if budget is None else to_report(max(budget - spent, Decimal(0))),
        }

    async def unknown_outcomes(self, request: Request) -> Response:
        """GET /gateway/submissions/unknown (admin): submissions sent upstream whose outcome was never recorded.

        After a crash or an unanswered upstream call these are the submissions to reconcile with the upstream
        (by request id, which the gateway sends upstream as X-Request-ID).
        """
        self.require_admin(request)
        intents = await self._store.list_intents()
        return json_response(
            {
                "data": [
                    {
                        "intent_id": i.intent_id,
                        "key": i.key_name,
                        "request_id": i.request_id,
                        "model": i.model,
                        "mode": i.mode,
                        "submitted_at": i.submitted_at,
                        "account": i.account,
                    }
                    for i in intents
                ]
            }
        )

    # -- admin: upstream accounts ---------------------------------------------------------------------------------

    async def accounts(self, request: Request) -> Response:
        """GET /gateway/accounts: each upstream account's state, tasks in flight (every process's), limit, weight,
        models and key fingerprint; never key material."""
        self.require_admin(request)
        await self._accounts.refresh(self._store)
        await self._accounts.sync()  # the deployment's set-asides as of now, not as of this process's last read
        return json_response({"data": self._accounts.describe()})

    # -- admin: keys ---------------------------------------------------------------------------------------------

    async def list_keys(self, request: Request) -> Response:
        self.require_admin(request)
        now = self._clock()
        return json_response({"data": [key_admin.describe(r, now) for r in await self._store.list_keys()]})

    async def get_key(self, request: Request) -> Response:
        self.require_admin(request)
        record = await self._store.get_key(request.path_params["name"])
        if record is None:
            raise NotFound("No such key.", code="key_not_found", param="name")
        return json_response(key_admin.describe(record, self._clock()))

    async def create_key(self, request: Request) -> Response:
        self.require_admin(request)
        body = await read_json_object(request, self._max_body_bytes)
        _refuse_unknown_fields(body, _KEY_FIELDS)
        name = body.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("name is required (a string).", code="missing_field", param="name")
        log_fields(request.scope)["key_name"] = name
        try:
            issued = await key_admin.create(
                self._store,
                name,
                actor=_actor(request),
                now=self._clock(),
                models=_models(body.get("models")),
                rpm=_optional_int(body.get("rpm"), "rpm"),
                monthly_budget_usd=_optional_money(body.get("monthly_budget_usd")),
                webhook_url=_optional_str(body.get("webhook_url"), "webhook_url"),
                allow_private_webhooks=self._allow_private_webhooks,
                known_models=self._known_models,
            )
        except key_admin.NameRevoked:
            raise Conflict(
                f"A key named '{name}' was revoked; names stay reserved (tasks and usage are recorded by name), "
                "so choose another name.",
                code="key_revoked",
                param="name",
            ) from None
        except KeyExists:
            raise Conflict(f"A key named '{name}' exists already.", code="key_exists", param="name") from None
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_key_request") from None
        await self._keys_changed()
        return json_response({**key_admin.describe(issued.record, self._clock()), "key": issued.secret}, 201)

    async def update_key(self, request: Request) -> Response:
        """PATCH /gateway/keys/{name}: change models, rpm, monthly_budget_usd or webhook_url (null removes)."""
        self.require_admin(request)
        name = request.path_params["name"]
        log_fields(request.scope)["key_name"] = name
        body = await read_json_object(request, self._max_body_bytes)
        _refuse_unknown_fields(body, set(key_admin.UPDATABLE))
        changes: dict[str, Any] = {}
        try:
            if "models" in body:
                changes["models"] = _models(body["models"])
            if "rpm" in body:
                changes["rpm"] = _optional_int(body["rpm"], "rpm")
            if "monthly_budget_usd" in body:
                changes["monthly_budget_usd"] = _optional_money(body["monthly_budget_usd"])
            if "webhook_url" in body:
                changes["webhook_url"] = _optional_str(body["webhook_url"], "webhook_url")
            record = await key_admin.update_limits(
                self._store,
                name,
                changes,
                actor=_actor(request),
                now=self._clock(),
                allow_private_webhooks=self._allow_private_webhooks,
                known_models=self._known_models,
            )
        except KeyNotFound:
            raise NotFound("No such key.", code="key_not_found", param="name") from None
        except KeyRevoked:
            raise Conflict("A revoked key cannot be changed.", code="key_revoked", param="name") from None
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_key_request") from None
        await self._keys_changed()
        return json_response(key_admin.describe(record, self._clock()))

    async def revoke_key(self, request: Request) -> Response:
        self.require_admin(request)
        log_fields(request.scope)["key_name"] = request.path_params["name"]
        try:
            record = await key_admin.revoke(
                self._store, request.path_params["name"], actor=_actor(request), now=self._clock()
            )
        except KeyNotFound:
            raise NotFound("No such key.", code="key_not_found", param="name") from None
        await self._keys_changed()
        return json_response(key_admin.describe(record, self._clock()))

    async def rotate_key(self, request: Request) -> Response:
        self.require_admin(request)
        log_fields(request.scope)["key_name"] = request.path_params["name"]
        grace = self._rotation_grace_s
        if "grace_s" in request.query_params:
            grace = float(_int_param(request, "grace_s", int(grace), 0, 30 * 86400))
        try:
            issued = await key_admin.rotate(
                self._store, request.path_params["name"], actor=_actor(request), now=self._clock(), grace_s=grace
            )
        except KeyNotFound:
            raise NotFound("No such key.", code="key_not_found", param="name") from None
        except KeyRevoked:
            raise Conflict("A revoked key cannot be rotated.", code="key_revoked", param="name") from None
        await self._keys_changed()
        return json_response({**key_admin.describe(issued.record, self._clock()), "key": issued.secret})

    # -- admin: audit trail ---------------------------------------------------------------------------------------

    async def audit(self, request: Request) -> Response:
        """GET /gateway/audit?since=&limit=&cursor= (admin): admin actions, newest first."""
        self.require_admin(request)
        limit = _int_param(request, "limit", 50, 1, 1000)
        try:
            since, _ = parse_period(request.query_params.get("since"), None, self._clock(), names=_PERIOD)
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_parameter", param="since") from None
        try:
            entries, cursor = await self._store.audit_list(since, limit, request.query_params.get("cursor"))
        except ValueError:
            raise InvalidRequest(
                "The cursor is not one this gateway issued.", code="invalid_cursor", param="cursor"
            ) from None
        return json_response({"data": [audit_view(e) for e in entries], "next_cursor": cursor})

    # -- authentication ------------------------------------------------------------------------------------------

    async def authenticate(self, request: Request) -> Principal:
        """The calling client (401 otherwise), within its rate limit (429)."""
        return await self._clients.authenticate(request.headers.get("authorization"), log_fields(request.scope))

    def is_admin(self, request: Request) -> bool:
        return self._admin_token.matches(request.headers.get("authorization"))

    def require_admin(self, request: Request) -> None:
        """The admin token (401), unless this address sent too many wrong ones lately (429, before comparing)."""
        address = request.client.host if request.client else ""
        self._admin_token.require(request.headers.get("authorization"), request.url.path, address)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/gateway/tasks", self.tasks, methods=["GET"]),
            Route("/gateway/usage", self.usage, methods=["GET"]),
            Route("/gateway/submissions/unknown", self.unknown_outcomes, methods=["GET"]),
            Route("/gateway/accounts", self.accounts, methods=["GET"]),
            Route("/gateway/keys", self.list_keys, methods=["GET"]),
            Route("/gateway/keys", self.create_key, methods=["POST"]),
            Route("/gateway/keys/{name}", self.get_key, methods=["GET"]),
            Route("/gateway/keys/{name}", self.revoke_key, methods=["DELETE"]),
            Route("/gateway/keys/{name}", self.update_key, methods=["PATCH"]),
            Route("/gateway/keys/{name}/rotate", self.rotate_key, methods=["POST"]),
            Route("/gateway/audit", self.audit, methods=["GET"]),
        ]


def _actor(request: Request) -> Actor:
    """The admin API as the audit trail names it: the admin token, from the client's address."""
    return Actor.admin_api(request.client.host if request.client is not None else None)


def _refuse_unknown_fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        hint = did_you_mean(unknown[0], sorted(known))
        raise InvalidRequest(
            f"Unknown field '{unknown[0]}' (fields: {', '.join(sorted(known))}){hint}",
            code="unknown_field",
            param=unknown[0],
        )


def _period_param(message: str) -> str:
    """Which of ``since``/``until`` a period error is about (its message starts with the name)."""
    return "until" if message.startswith("until") else "since"


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}.", code="invalid_parameter", param=name)
    return int(raw)


def _models(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return parse_model_globs(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_model_globs(",".join(value))
    raise InvalidRequest("models must be a list of model globs.", code="invalid_type", param="models")


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer.", code="invalid_type", param=name)
    return value


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidRequest(f"{name} must be a string.", code="invalid_type", param=name)


def _optional_money(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InvalidOperation
        return Decimal(str(value))
    except InvalidOperation:
        raise InvalidRequest(
            "monthly_budget_usd must be a decimal amount.", code="invalid_type", param="monthly_budget_usd"
        ) from None
