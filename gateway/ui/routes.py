"""The admin UI's pages and form posts under ``/gateway/ui``, built on the admin API's own functions.

Every page needs a signed session (``session``); every post needs the session's CSRF token (403 ``csrf_failed``
otherwise). Keys are changed through :mod:`gateway.auth.key_admin`, usage comes from the store's report and
:mod:`gateway.ledger.reports` (so totals are the CLI's to the cent), tasks from the store's task pages, a task's
video from the content service behind ``/v1/videos/{id}/content``. Without an admin token every UI path is 404, as
the admin API is. Each response carries a strict Content-Security-Policy (no
inline script: the copy button's script is a file under ``static/``), no-store caching and no referrer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.templating import Jinja2Templates

from gateway.accounts.pool import AccountPool
from gateway.audit.trail import Actor, audit_view
from gateway.auth import key_admin
from gateway.auth.authenticate import AdminToken
from gateway.auth.key_admin import IssuedKey
from gateway.catalog import MODELS, TASK_STATUSES
from gateway.config import UiSettings
from gateway.content.service import ContentService
from gateway.errors import AuthenticationFailed, NotFound, PermissionDenied
from gateway.keys import parse_model_globs
from gateway.ledger.pricing import to_cents
from gateway.ledger.reports import parse_group_by, parse_period, table_cells
from gateway.ledger.service import month_bounds
from gateway.services import Services
from gateway.store.base import USAGE_GROUPS, KeyExists, KeyNotFound, KeyRevoked, Store, TaskRecord
from gateway.ui import chart
from gateway.ui.session import COOKIE, Session, SessionSigner
from gateway.web.bodies import read_body

PREFIX: Final = "/gateway/ui"
_HERE = Path(__file__).parent
_MAX_FORM_BYTES = 16 * 1024
_TASK_PAGE = 50
SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}
_USAGE_COLUMNS: Final = (
    "tasks",
    "requested_seconds",
    "settled_seconds",
    "estimated_usd",
    "settled_usd",
    "cost_usd",
    "completed",
    "failed",
    "pending",
)
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class UiDeps:
    """What the UI uses, all of it the admin API's too."""

    admin_token: str
    store: Store
    keys_changed: Callable[[], Awaitable[None]]
    clock: Callable[[], float]
    rotation_grace_s: float
    allow_private_webhooks: bool
    content: ContentService | None = None
    accounts: AccountPool | None = None
    known_models: Collection[str] = frozenset(MODELS)


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One key as the keys page shows it: display strings only (never the secret or its hash)."""

    name: str
    path: str
    prefix: str
    active: bool
    models: str
    rpm: str
    budget: str
    spent: str
    remaining: str
    created: str


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One ledger task as the tasks page shows it."""

    task_id: str
    path: str
    key: str
    model: str
    mode: str
    status: str
    seconds: int
    estimate: str
    settled: str
    submitted: str


def _task_row(task: TaskRecord) -> TaskRow:
    return TaskRow(
        task_id=task.task_id,
        path=quote(task.task_id, safe=""),
        key=task.key_name,
        model=task.model,
        mode=task.mode,
        status=task.status,
        seconds=task.estimate_seconds,
        estimate=_money(task.estimate_usd),
        settled=_money(task.settled_usd),
        submitted=_when(task.submitted_at),
    )


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _money(amount: Decimal | None) -> str:
    return "" if amount is None else to_cents(amount)


class UiRoutes:
    """The UI's routes, given the admin API's collaborators when built."""

    def __init__(self, deps: UiDeps, admin: AdminToken, *, session_ttl_s: int = UiSettings.session_ttl_s) -> None:
        self._deps = deps
        self._admin = admin
        self._signer = SessionSigner(deps.admin_token, ttl_s=session_ttl_s)
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True, auto_reload=False
        )  # templates are part of the package: read once, never re-checked per request
        env.filters["when"] = _when
        self._templates = Jinja2Templates(env=env)
        self._static = {p.name: p.read_bytes() for p in (_HERE / "static").iterdir() if p.suffix in _STATIC_TYPES}

    @classmethod
    def build(cls, services: Services, admin: AdminToken) -> UiRoutes:
        """The UI over the admin API's token check (and its guessing limiter), store, clock and key-change hook."""
        settings = services.settings
        return cls(
            UiDeps(
                admin_token=settings.admin_token,
                store=services.store,
                keys_changed=services.keys_changed,
                clock=services.clock,
                rotation_grace_s=settings.auth.rotation_grace_s,
                allow_private_webhooks=settings.webhooks.allow_private_targets,
                content=services.content,
                accounts=services.accounts,
                known_models=settings.known_models,
            ),
            admin,
            session_ttl_s=settings.ui.session_ttl_s,
        )

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _page(self, handler: Handler, *, signed_in: bool = True) -> Handler:
        """The UI's checks around ``handler``: 404 without an admin token, a session when needed, the headers."""

        async def endpoint(request: Request) -> Response:
            if not self._deps.admin_token:
                raise NotFound(f"No route {request.url.path}.", code="not_found")
            if signed_in:
                session = self._signer.verify(request.cookies.get(COOKIE), self._deps.clock())
                # A signed-out session's cookie still verifies until it expires: the store says it is revoked
                # (one indexed read per page; every process and replica shares the store).
                if session is None or await self._deps.store.ui_session_revoked(session.session_id):
                    return _secured(RedirectResponse(f"{PREFIX}/signin", status_code=303))
                request.state.ui_session = session
            return _secured(await handler(request))

        return endpoint

    def _render(self, request: Request, name: str, code: int = 200, **context: Any) -> Response:
        session: Session | None = getattr(request.state, "ui_session", None)
        context["csrf"] = "" if session is None else self._signer.csrf_token(session)
        context["prefix"] = PREFIX
        return self._templates.TemplateResponse(request, name, context, status_code=code)

    async def _form(self, request: Request) -> dict[str, str]:
        """A url-encoded form post (first value of each field); the CSRF token is checked when signed in."""
        raw = await read_body(request, _MAX_FORM_BYTES)
        fields = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
        session: Session | None = getattr(request.state, "ui_session", None)
        if session is not None and not self._signer.csrf_ok(session, fields.get("csrf")):
            raise PermissionDenied("The form's CSRF token is missing or wrong: reload the page.", code="csrf_failed")
        return fields

    # -- sign-in ----------------------------------------------------------------------------------------------

    async def signin_page(self, request: Request) -> Response:
        return self._render(request, "signin.html")

    async def signin(self, request: Request) -> Response:
        # No session yet, so no CSRF token: refuse a sign-in posted by another site (login CSRF). With the UI's
        # no-referrer policy browsers send ``Origin: null`` for its own forms; Sec-Fetch-Site still tells.
        origin = request.headers.get("origin")
        foreign_origin = origin not in (None, "null") and origin != f"{request.url.scheme}://{request.url.netloc}"
        if foreign_origin or request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            raise PermissionDenied("Sign in from this gateway's own sign-in page.", code="csrf_failed")
        address = request.client.host if request.client else ""
        fields = await self._form(request)
        given = fields.get("token", "")
        try:
            # The admin API's own check: 429 too_many_auth_failures while the address is locked out.
            self._admin.require(f"Bearer {given}" if given else None, request.url.path, address)
        except AuthenticationFailed:
            return self._render(request, "signin.html", 401, error="That is not the admin token.")
        response = RedirectResponse(f"{PREFIX}/keys", status_code=303)
        response.set_cookie(
            COOKIE,
            self._signer.issue(self._deps.clock()),
            max_age=self._signer.ttl_s,
            path=PREFIX,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def signout(self, request: Request) -> Response:
        """End the session everywhere: its id is recorded as revoked until the cookie would have expired."""
        await self._form(request)
        session: Session = request.state.ui_session
        await self._deps.store.revoke_ui_session(session.session_id, session.expires_at, self._deps.clock())
        response = RedirectResponse(f"{PREFIX}/signin", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return response

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    # -- keys -------------------------------------------------------------------------------------------------

    async def keys_page(self, request: Request, status: int = 200, **extra: Any) -> Response:
        now = self._deps.clock()
        start, end = month_bounds(now)
        store = self._deps.store
        records, usage = await asyncio.gather(store.list_keys(), store.usage(start, end, ("key",)))
        spent = {row.key: row.cost_usd for row in usage}
        rows = []
        for record in sorted(records, key=lambda r: (r.revoked, r.name)):
            mtd = spent.get(record.name, Decimal(0))
            budget = record.monthly_budget_usd
            rows.append(
                KeyRow(
                    name=record.name,
                    path=quote(record.name, safe=""),
                    prefix=record.prefix,
                    active=not record.revoked,
                    models=", ".join(record.models) or "all",
                    rpm="" if record.rpm is None else str(record.rpm),
                    budget=_money(budget),
                    spent=_money(mtd),
                    remaining="" if budget is None else _money(max(budget - mtd, Decimal(0))),
                    created=_when(record.created_at),
                )
            )
        return self._render(request, "keys.html", status, keys=rows, **extra)

    async def keys(self, request: Request) -> Response:
        return await self.keys_page(request, notice=request.query_params.get("done", ""))

    async def create_key(self, request: Request) -> Response:
        fields = await self._form(request)
        name = fields.get("name", "").strip()
        try:
            issued = await key_admin.create(
                self._deps.store,
                name,
                actor=_actor(request),
                now=self._deps.clock(),
                models=parse_model_globs(fields.get("models", "")),
                rpm=_optional_int(fields.get("rpm"), "rpm"),
                monthly_budget_usd=_optional_money(fields.get("monthly_budget_usd")),
                allow_private_webhooks=self._deps.allow_private_webhooks,
                known_models=self._deps.known_models,
            )
        except KeyExists:
            return await self.keys_page(request, 409, error=f"A key named '{name}' exists already.", form=fields)
        except ValueError as exc:
            return await self.keys_page(request, 400, error=str(exc), form=fields)
        await self._deps.keys_changed()
        return self._secret_page(request, issued, "created")

    async def edit_key(self, request: Request) -> Response:
        """The form that changes a key's limits, filled with its current ones."""
        name = request.path_params["name"]
        record = await self._deps.store.get_key(name)
        if record is None or record.revoked:
            return await self.keys_page(request, 404, error=f"No active key named '{name}'.")
        form = {
            "models": ", ".join(record.models),
            "rpm": "" if record.rpm is None else str(record.rpm),
            "monthly_budget_usd": "" if record.monthly_budget_usd is None else str(record.monthly_budget_usd),
        }
        return self._render(request, "key_edit.html", key={"name": name, "path": quote(name, safe="")}, form=form)

    async def update_key(self, request: Request) -> Response:
        """``PATCH /gateway/keys/{name}``'s change of models, rpm and budget (an empty field removes the limit)."""
        fields = await self._form(request)
        name = request.path_params["name"]
        key = {"name": name, "path": quote(name, safe="")}
        try:
            changes = {
                "models": parse_model_globs(fields.get("models", "")),
                "rpm": _optional_int(fields.get("rpm"), "rpm"),
                "monthly_budget_usd": _optional_money(fields.get("monthly_budget_usd")),
            }
            await key_admin.update_limits(
                self._deps.store,
                name,
                changes,
                actor=_actor(request),
                now=self._deps.clock(),
                allow_private_webhooks=self._deps.allow_private_webhooks,
                known_models=self._deps.known_models,
            )
        except KeyNotFound:
            return await self.keys_page(request, 404, error=f"No key named '{name}'.")
        except KeyRevoked:
            return await self.keys_page(request, 409, error=f"'{name}' is revoked, so it cannot be changed.")
        except ValueError as exc:
            return self._render(request, "key_edit.html", 400, key=key, form=fields, error=str(exc))
        await self._deps.keys_changed()
        return RedirectResponse(f"{PREFIX}/keys?{urlencode({'done': f'Saved the limits of {name}.'})}", status_code=303)

    async def rotate_key(self, request: Request) -> Response:
        await self._form(request)
        name = request.path_params["name"]
        try:
            issued = await key_admin.rotate(
                self._deps.store,
                name,
                actor=_actor(request),
                now=self._deps.clock(),
                grace_s=self._deps.rotation_grace_s,
            )
        except KeyNotFound:
            return await self.keys_page(request, 404, error=f"No key named '{name}'.")
        except KeyRevoked:
            return await self.keys_page(request, 409, error=f"'{name}' is revoked, so it cannot be rotated.")
        await self._deps.keys_changed()
        return self._secret_page(request, issued, "rotated")

    async def revoke_key(self, request: Request) -> Response:
        await self._form(request)
        name = request.path_params["name"]
        try:
            await key_admin.revoke(self._deps.store, name, actor=_actor(request), now=self._deps.clock())
        except KeyNotFound:
            return await self.keys_page(request, 404, error=f"No key named '{name}'.")
        await self._deps.keys_changed()
        return RedirectResponse(f"{PREFIX}/keys?{urlencode({'done': f'Revoked {name}.'})}", status_code=303)

    def _secret_page(self, request: Request, issued: IssuedKey, verb: str) -> Response:
        """The one page that shows a secret: right after it was issued, never again."""
        grace = issued.record.previous_valid_until
        return self._render(
            request, "secret.html", 201 if verb == "created" else 200, issued=issued, verb=verb, grace=grace
        )

    # -- usage ------------------------------------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        params = request.query_params
        now = self._deps.clock()
        month_start = dt.datetime.fromtimestamp(month_bounds(now)[0], dt.UTC).strftime("%Y-%m-%d")
        form = {
            "since": params.get("since", month_start),
            "until": params.get("until", ""),
            "by": params.get("by", "key"),
        }
        try:
            since, until = parse_period(form["since"], form["until"], now, names=("since", "until"))
            group_by = parse_group_by(form["by"], name="by")
        except ValueError as exc:
            return self._render(
                request, "usage.html", 400, form=form, groups=USAGE_GROUPS, month_start=month_start, error=str(exc)
            )
        rows = await self._deps.store.usage(since, until, group_by)
        cells, totals = table_cells(rows)
        labels = [[getattr(row, dim) or "-" for dim in group_by] for row in rows]
        # Built here rather than in the template: a report can have thousands of cells, and one string for the
        # whole body is several times faster than the template's per-cell output. The labels (key, model, ...
        # names) are escaped; the measures are numbers this module formatted, digits and a point only.
        shown = {text: escape(text) for text in {text for label in labels for text in label}}  # once per name
        table = Markup(  # noqa: S704 - labels escaped, measures are formatted numbers
            "".join(
                "<tr>"
                + "".join([f"<td>{shown[t]}</td>" for t in label])
                + "".join([f'<td class="num">{cell[n]}</td>' for n in _USAGE_COLUMNS])
                + "</tr>\n"
                for label, cell in zip(labels, cells, strict=True)
            )
        )
        bars = chart.bars(
            [
                (" / ".join(label) or "all", row.cost_usd, cell["cost_usd"])
                for label, row, cell in zip(labels, rows, cells, strict=True)
            ]
        )
        return self._render(
            request,
            "usage.html",
            form=form,
            groups=USAGE_GROUPS,
            month_start=month_start,
            group_by=group_by,
            rows=table,
            totals=totals,
            bars=bars,
            chart_width=chart.WIDTH,
            chart_height=chart.HEIGHT,
            more_bars=max(0, len(rows) - chart.MAX_BARS),
        )

    # -- tasks ------------------------------------------------------------------------------------------------

    async def tasks(self, request: Request) -> Response:
        """The newest tasks, a page at a time, of one key and/or one status (filtered by the store's query)."""
        params = request.query_params
        key = params.get("key") or None
        status = params.get("status") or None
        if status is not None and status not in TASK_STATUSES:
            status = None
        cursor = params.get("cursor") or None
        store = self._deps.store
        found: list[TaskRecord] = []
        error = ""
        try:
            found, cursor = await store.tasks_for_key(key, _TASK_PAGE, cursor, status=status)
        except ValueError:
            error, cursor = "That page link is not one this gateway made.", None
        keys = sorted(r.name for r in await store.list_keys())
        older = None
        if cursor is not None:
            older = "?" + urlencode({k: v for k, v in {"key": key, "status": status, "cursor": cursor}.items() if v})
        return self._render(
            request,
            "tasks.html",
            400 if error else 200,
            tasks=[_task_row(t) for t in found],
            keys=keys,
            statuses=sorted(TASK_STATUSES),
            key=key or "",
            status=status or "",
            older=older,
            error=error,
        )

    async def video(self, request: Request) -> Response:
        """A task's video for the signed-in admin: what ``/v1/videos/{id}/content`` serves the task's own key.

        A browser session cannot send the owning key's bearer token, so the UI hands the task to the same content
        service under its session instead.
        """
        task = await self._deps.store.get_task(request.path_params["task_id"])
        if task is None or self._deps.content is None:
            raise NotFound("No such task.", code="task_not_found", param="task_id")
        return await self._deps.content.serve(request, task)

    # -- upstream accounts ------------------------------------------------------------------------------------

    async def accounts(self, request: Request) -> Response:
        """What ``GET /gateway/accounts`` shows: state, tasks in flight (every process's), limit; fingerprints only."""
        pool = self._deps.accounts
        rows: list[dict[str, Any]] = []
        if pool is not None:
            await pool.refresh(self._deps.store)
            rows = pool.describe()
        return self._render(request, "accounts.html", accounts=rows)

    # -- audit trail ------------------------------------------------------------------------------------------

    async def audit(self, request: Request) -> Response:
        """What ``GET /gateway/audit`` shows: admin actions, newest first, a page at a time."""
        cursor = request.query_params.get("cursor") or None
        try:
            entries, cursor = await self._deps.store.audit_list(None, 50, cursor)
        except ValueError:
            return self._render(
                request, "audit.html", 400, entries=[], error="That page link is not one this gateway made."
            )
        older = None if cursor is None else "?" + urlencode({"cursor": cursor})
        return self._render(request, "audit.html", entries=[audit_view(e) for e in entries], older=older)

    # -- static -----------------------------------------------------------------------------------------------

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self._static.get(name)
        if body is None:
            raise NotFound(f"No route {request.url.path}.", code="not_found")
        response = Response(body, media_type=_STATIC_TYPES[Path(name).suffix])
        return response

    def routes(self) -> list[BaseRoute]:
        """The UI's routes; none without an admin token, so every UI path is the router's plain 404."""
        if not self._deps.admin_token:
            return []
        page = self._page
        return [
            Mount(
                PREFIX,
                routes=[
                    Route("/", page(self.home), methods=["GET"]),
                    Route("/signin", page(self.signin_page, signed_in=False), methods=["GET"]),
                    Route("/signin", page(self.signin, signed_in=False), methods=["POST"]),
                    Route("/signout", page(self.signout), methods=["POST"]),
                    Route("/keys", page(self.keys), methods=["GET"]),
                    Route("/keys", page(self.create_key), methods=["POST"]),
                    Route("/keys/{name}/rotate", page(self.rotate_key), methods=["POST"]),
                    Route("/keys/{name}/limits", page(self.edit_key), methods=["GET"]),
                    Route("/keys/{name}/limits", page(self.update_key), methods=["POST"]),
                    Route("/keys/{name}/revoke", page(self.revoke_key), methods=["POST"]),
                    Route("/usage", page(self.usage), methods=["GET"]),
                    Route("/accounts", page(self.accounts), methods=["GET"]),
                    Route("/audit", page(self.audit), methods=["GET"]),
                    Route("/tasks", page(self.tasks), methods=["GET"]),
                    Route("/tasks/{task_id}/video", page(self.video), methods=["GET", "HEAD"]),
                    Route("/static/{name}", page(self.static, signed_in=False), methods=["GET"]),
                ],
            )
        ]


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _optional_int(text: str | None, name: str) -> int | None:
    if text is None or not text.strip():
        return None
    value = text.strip()
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name} must be a whole number.")
    return int(value)


def _optional_money(text: str | None) -> Decimal | None:
    if text is None or not text.strip():
        return None
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        raise ValueError("monthly_budget_usd must be a decimal amount.") from None


def _actor(request: Request) -> Actor:
    """The web UI as the audit trail names it, from the client's address."""
    return Actor.admin_ui(request.client.host if request.client is not None else None)
