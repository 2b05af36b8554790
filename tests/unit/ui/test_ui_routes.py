"""The admin UI's routes under TestClient: sessions, CSRF, headers, 404 when off, and the pages' figures."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from support.harness import ADMIN, ADMIN_TOKEN, GatewayHarness
from support.records import std_task
from support.upstream_fake import FakeUpstream

from gateway.cli.main import main as cli_main
from gateway.config import UiSettings
from gateway.ledger.pricing import to_cents
from gateway.store.base import TaskRecord
from gateway.ui.session import COOKIE

UI = "/gateway/ui"
SESSION_TTL_S = UiSettings.session_ttl_s
NOW = 1_798_000_000.0  # 2026-12-23, so the month's first day is 2026-12-01


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ui(make_gateway: Callable[..., GatewayHarness], fake_upstream: FakeUpstream, clock: Clock) -> GatewayHarness:
    return make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"}, clock=clock)


def sign_in(ui: GatewayHarness) -> str:
    """Sign in; the session's CSRF token (read from the keys page)."""
    response = ui.client.post(f"{UI}/signin", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return csrf_of(ui.client.get(f"{UI}/keys").text)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match is not None
    return match.group(1)


def task(task_id: str, key: str, at: float, usd: str, status: str = "queued", settled: str | None = None) -> TaskRecord:
    return std_task(
        task_id,
        key,
        at,
        usd,
        status=status,
        settled_usd=None if settled is None else Decimal(settled),
        settled_seconds=None if settled is None else Decimal(5),
        settled_at=None if settled is None else at + 10,
    )


def seed(ui: GatewayHarness, tasks: list[TaskRecord]) -> None:
    store = ui.client.app.state.services.store  # type: ignore[attr-defined]
    portal = ui.client.portal
    assert portal is not None
    for record in tasks:
        portal.call(store.resolve_intent, f"i-{record.task_id}", record)


# -- access ---------------------------------------------------------------------------------------------------


def test_without_an_admin_token_every_ui_path_is_404(
    make_gateway: Callable[..., GatewayHarness], fake_upstream: FakeUpstream
) -> None:
    ui = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_ADMIN_TOKEN": ""})
    for method, path in [
        ("GET", UI),
        ("GET", f"{UI}/"),
        ("GET", f"{UI}/signin"),
        ("POST", f"{UI}/signin"),
        ("GET", f"{UI}/keys"),
        ("GET", f"{UI}/static/ui.css"),
    ]:
        response = ui.client.request(method, path, data={"token": ""}, follow_redirects=False)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/", "/keys", "/usage", "/tasks"])
def test_pages_without_a_session_go_to_sign_in(ui: GatewayHarness, path: str) -> None:
    response = ui.client.get(UI + path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"{UI}/signin"


def test_signing_in_sets_a_strict_http_only_cookie(ui: GatewayHarness) -> None:
    response = ui.client.post(f"{UI}/signin", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"{UI}/keys"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for part in ("HttpOnly", "SameSite=strict", f"Path={UI}", f"Max-Age={SESSION_TTL_S}"):
        assert part.lower() in cookie.lower(), part
    assert "secure" not in cookie.lower()  # plain HTTP here; HTTPS gets Secure (next test)
    assert ADMIN_TOKEN not in cookie


def test_over_https_the_cookie_is_secure(ui: GatewayHarness) -> None:
    response = ui.client.post(f"https://testserver{UI}/signin", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert "; secure" in response.headers["set-cookie"].lower()


def test_a_wrong_token_is_refused_then_locked_out(ui: GatewayHarness) -> None:
    for _ in range(9):
        response = ui.client.post(f"{UI}/signin", data={"token": "wrong"})
        assert response.status_code == 401
        assert "not the admin token" in response.text
        assert COOKIE not in response.headers.get("set-cookie", "")
    assert ui.client.post(f"{UI}/signin", data={"token": "wrong"}).status_code == 401  # the tenth locks out
    locked = ui.client.post(f"{UI}/signin", data={"token": ADMIN_TOKEN})
    assert locked.status_code == 429
    assert locked.json()["error"]["code"] == "too_many_auth_failures"
    assert int(locked.headers["retry-after"]) > 0
    # One limiter with the admin API: the address is locked out of both.
    assert ui.client.get("/gateway/keys", headers=ADMIN).json()["error"]["code"] == "too_many_auth_failures"


def test_an_empty_token_is_refused(ui: GatewayHarness) -> None:
    assert ui.client.post(f"{UI}/signin", data={"token": ""}).status_code == 401


def test_a_sign_in_from_another_origin_is_refused(ui: GatewayHarness) -> None:
    response = ui.client.post(f"{UI}/signin", data={"token": ADMIN_TOKEN}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"


def test_the_session_expires(ui: GatewayHarness, clock: Clock) -> None:
    sign_in(ui)
    clock.now += SESSION_TTL_S - 1
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 200
    clock.now += 1
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 303


def test_a_tampered_cookie_is_refused(ui: GatewayHarness) -> None:
    sign_in(ui)
    value = ui.client.cookies[COOKIE]
    expiry, session_id, mac = value.split(".")
    ui.client.cookies.clear()
    ui.client.cookies.set(COOKIE, f"{int(expiry) + 3600}.{session_id}.{mac}", path=UI)
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 303


def test_sign_out_clears_the_cookie(ui: GatewayHarness) -> None:
    csrf = sign_in(ui)
    response = ui.client.post(f"{UI}/signout", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert f'{COOKIE}=""' in response.headers["set-cookie"] or "max-age=0" in response.headers["set-cookie"].lower()
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 303


def test_sign_out_ends_the_session_for_a_copied_cookie_too(ui: GatewayHarness) -> None:
    """The cookie is revoked in the store: a copy kept elsewhere opens no page and changes nothing."""
    ui.create_key("team-a")
    csrf = sign_in(ui)
    copied = ui.client.cookies[COOKIE]
    assert ui.client.post(f"{UI}/signout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    ui.client.cookies.clear()
    ui.client.cookies.set(COOKIE, copied, path=UI)
    for path in ("/keys", "/usage", "/tasks", "/accounts", "/audit"):
        response = ui.client.get(UI + path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == f"{UI}/signin"
    revoke = ui.client.post(f"{UI}/keys/team-a/revoke", data={"csrf": csrf}, follow_redirects=False)
    assert revoke.status_code == 303 and revoke.headers["location"] == f"{UI}/signin"
    keys = {k["name"]: k for k in ui.client.get("/gateway/keys", headers=ADMIN).json()["data"]}
    assert keys["team-a"]["revoked_at"] is None
    # Signing in again starts a new session, which works.
    sign_in(ui)
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 200


def test_sign_out_in_one_gateway_ends_the_session_in_another_on_the_same_store(
    make_gateway: Callable[..., GatewayHarness], fake_upstream: FakeUpstream
) -> None:
    """Two processes (replicas) sharing the store: a sign-out through one is refused by the other at once."""
    env = {"KLING_GATEWAY_AUTH_MODE": "keys"}
    first, second = make_gateway(fake_upstream.url, env=env), make_gateway(fake_upstream.url, env=env)
    csrf = sign_in(first)
    second.client.cookies.set(COOKIE, first.client.cookies[COOKIE], path=UI)
    assert second.client.get(f"{UI}/keys", follow_redirects=False).status_code == 200
    first.client.post(f"{UI}/signout", data={"csrf": csrf}, follow_redirects=False)
    assert second.client.get(f"{UI}/keys", follow_redirects=False).status_code == 303


def test_the_session_lifetime_is_a_setting(
    make_gateway: Callable[..., GatewayHarness], fake_upstream: FakeUpstream, clock: Clock
) -> None:
    env = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_UI_SESSION_TTL_S": "120"}
    ui = make_gateway(fake_upstream.url, env=env, clock=clock)
    response = ui.client.post(f"{UI}/signin", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert "max-age=120" in response.headers["set-cookie"].lower()
    clock.now += 119
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 200
    clock.now += 1
    assert ui.client.get(f"{UI}/keys", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("csrf", [None, "", "wrong", "x" * 43])
@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/keys", {"name": "team-x"}),
        ("/keys/team-a/revoke", {}),
        ("/keys/team-a/rotate", {}),
        ("/keys/team-a/limits", {"rpm": "1"}),
        ("/signout", {}),
    ],
)
def test_posts_without_the_right_csrf_token_are_refused(
    ui: GatewayHarness, csrf: str | None, path: str, fields: dict[str, str]
) -> None:
    ui.create_key("team-a")
    sign_in(ui)
    data = dict(fields) if csrf is None else {**fields, "csrf": csrf}
    response = ui.client.post(UI + path, data=data)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
    keys = {k["name"]: k for k in ui.client.get("/gateway/keys", headers=ADMIN).json()["data"]}
    assert set(keys) == {"team-a"} and keys["team-a"]["status"] == "active"


def test_another_sessions_csrf_token_is_refused(ui: GatewayHarness) -> None:
    other = sign_in(ui)
    ui.client.cookies.clear()
    sign_in(ui)
    assert ui.client.post(f"{UI}/keys", data={"name": "team-x", "csrf": other}).status_code == 403


@pytest.mark.parametrize("path", ["/signin", "/keys", "/usage", "/tasks"])
def test_every_page_has_the_security_headers(ui: GatewayHarness, path: str) -> None:
    if path != "/signin":
        sign_in(ui)
    response = ui.client.get(UI + path)
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ):
        assert directive in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert "<script>" not in response.text and " style=" not in response.text
    assert ADMIN_TOKEN not in response.text
    assert "http://" not in response.text.replace("http://testserver", "") and "https://" not in response.text


def test_static_files_are_served_with_their_types(ui: GatewayHarness) -> None:
    css = ui.client.get(f"{UI}/static/ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = ui.client.get(f"{UI}/static/copy.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert ui.client.get(f"{UI}/static/nope.js").status_code == 404


# -- keys -----------------------------------------------------------------------------------------------------


def test_create_shows_the_secret_once_and_the_secret_works(ui: GatewayHarness) -> None:
    csrf = sign_in(ui)
    created = ui.client.post(
        f"{UI}/keys",
        data={"csrf": csrf, "name": "team-b", "models": "kling-v3-std-*", "rpm": "30", "monthly_budget_usd": "12.5"},
    )
    assert created.status_code == 201
    secret = re.search(r'id="secret" readonly value="([^"]+)"', created.text)
    assert secret is not None
    listed = ui.client.get("/gateway/keys/team-b", headers=ADMIN).json()
    assert listed["models"] == ["kling-v3-std-*"] and listed["rpm"] == 30 and listed["monthly_budget_usd"] == "12.5"
    assert ui.client.get("/gateway/tasks", headers={"Authorization": f"Bearer {secret.group(1)}"}).status_code == 200
    page = ui.client.get(f"{UI}/keys").text
    assert secret.group(1) not in page
    assert "team-b" in page and "12.50" in page


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"name": "bad name!"}, 400, "name"),
        ({"name": "ok", "rpm": "ten"}, 400, "rpm must be a whole number"),
        ({"name": "ok", "monthly_budget_usd": "lots"}, 400, "monthly_budget_usd must be a decimal"),
        ({"name": "team-a"}, 409, "exists already"),
    ],
)
def test_create_refusals_show_the_reason(ui: GatewayHarness, fields: dict[str, str], status: int, message: str) -> None:
    ui.create_key("team-a")
    csrf = sign_in(ui)
    response = ui.client.post(f"{UI}/keys", data={"csrf": csrf, **fields})
    assert response.status_code == status
    assert message in response.text
    assert 'id="secret"' not in response.text


def test_rotate_shows_the_new_secret_and_revoke_refuses_the_key(ui: GatewayHarness) -> None:
    old = ui.create_key("team-a")
    csrf = sign_in(ui)
    rotated = ui.client.post(f"{UI}/keys/team-a/rotate", data={"csrf": csrf})
    assert rotated.status_code == 200
    match = re.search(r'id="secret" readonly value="([^"]+)"', rotated.text)
    assert match is not None and match.group(1) != old
    new = {"Authorization": f"Bearer {match.group(1)}"}
    assert ui.client.get("/gateway/tasks", headers=new).status_code == 200
    revoked = ui.client.post(f"{UI}/keys/team-a/revoke", data={"csrf": csrf})
    assert revoked.status_code == 200 and "Revoked team-a." in revoked.text
    assert ui.client.get("/gateway/tasks", headers=new).status_code == 401
    again = ui.client.post(f"{UI}/keys/team-a/rotate", data={"csrf": csrf})
    assert again.status_code == 409 and "cannot be rotated" in again.text
    assert ui.client.post(f"{UI}/keys/nobody/revoke", data={"csrf": csrf}).status_code == 404


def test_keys_page_shows_month_to_date_spend_and_remaining(ui: GatewayHarness) -> None:
    ui.create_key("team-a", monthly_budget_usd="10")
    seed(
        ui,
        [
            task("t1", "team-a", NOW - 3600, "1.26", "completed", settled="0.84"),
            task("t2", "team-a", NOW - 60, "2.10"),
            task("t3", "team-a", NOW - 40 * 86400, "5.00"),  # last month
        ],
    )
    sign_in(ui)
    page = ui.client.get(f"{UI}/keys").text
    row = page[page.index("team-a") :]
    cells = re.findall(r'<td class="num">([^<]*)</td>', row)[:4]
    assert cells == ["", "10.00", "2.94", "7.06"]


# -- usage and tasks ------------------------------------------------------------------------------------------


def test_usage_totals_equal_the_cli_report_to_the_cent(
    ui: GatewayHarness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Thirds of a cent, so per-row rounding would drift; the report apportions, the UI shows the same cells.
    seed(
        ui,
        [task(f"t{i}", f"team-{i % 3}", NOW - i * 3600, "0.0033", "completed", settled="0.0033") for i in range(10)]
        + [task("p1", "team-1", NOW - 10, "1.2345")],
    )
    sign_in(ui)
    page = ui.client.get(f"{UI}/usage", params={"since": "2026-12-01", "until": "2026-12-31", "by": "key"})
    assert page.status_code == 200
    shown = {name: re.search(rf'id="total-{name}">([^<]+)<', page.text) for name in ("cost", "settled", "tasks")}
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    assert cli_main(["usage", "--since", "2026-12-01", "--until", "2026-12-31", "--by", "key"]) == 0
    total_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("TOTAL"))
    words = total_line.split()
    # TOTAL tasks requested_s settled_s estimated settled cost ...
    assert shown["tasks"] is not None and shown["tasks"].group(1) == words[1] == "11"
    assert shown["settled"] is not None and shown["settled"].group(1) == words[5] == "0.03"
    assert shown["cost"] is not None and shown["cost"].group(1) == words[6] == to_cents(
        Decimal("0.033") + Decimal("1.2345")
    )
    assert page.text.count('class="bar"') == 3


def test_usage_refuses_a_bad_period_with_the_reason(ui: GatewayHarness) -> None:
    sign_in(ui)
    response = ui.client.get(f"{UI}/usage", params={"since": "yesterday"})
    assert response.status_code == 400 and "is not a date" in response.text
    response = ui.client.get(f"{UI}/usage", params={"by": "colour"})
    assert response.status_code == 400 and "unknown dimension" in response.text


def test_tasks_filter_by_key_and_status_and_link_to_content(ui: GatewayHarness) -> None:
    seed(
        ui,
        [
            task("done-a", "team-a", NOW - 100, "1", "completed", settled="1"),
            task("wait-a", "team-a", NOW - 50, "1"),
            task("wait-b", "team-b", NOW - 10, "1"),
        ],
    )
    sign_in(ui)
    every = ui.client.get(f"{UI}/tasks").text
    assert every.index("wait-b") < every.index("wait-a") < every.index("done-a")
    assert f'href="{UI}/tasks/done-a/video"' in every and f"{UI}/tasks/wait-a/video" not in every
    by_key = ui.client.get(f"{UI}/tasks", params={"key": "team-a"}).text
    assert "wait-a" in by_key and "wait-b" not in by_key
    by_status = ui.client.get(f"{UI}/tasks", params={"key": "team-a", "status": "queued"}).text
    assert "wait-a" in by_status and "done-a" not in by_status
    assert ui.client.get(f"{UI}/tasks", params={"cursor": "garbage"}).status_code == 400


def test_the_video_of_an_unknown_task_is_404(ui: GatewayHarness) -> None:
    sign_in(ui)
    response = ui.client.get(f"{UI}/tasks/task_nope/video")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "task_not_found"
    ui.client.cookies.clear()
    assert ui.client.get(f"{UI}/tasks/task_nope/video", follow_redirects=False).status_code == 303


def test_the_status_filter_finds_old_tasks_behind_many_newer_ones(ui: GatewayHarness) -> None:
    """The store filters by status: a failed task behind 2,100 newer queued ones is on the first page."""
    seed(
        ui,
        [task("failed-old", "team-a", NOW - 100_000, "1", "failed", settled="0")]
        + [task(f"q{i:04}", "team-a" if i % 2 else "team-b", NOW - i, "1") for i in range(2100)],
    )
    sign_in(ui)
    page = ui.client.get(f"{UI}/tasks", params={"status": "failed"})
    assert page.status_code == 200
    assert "failed-old" in page.text and "q0000" not in page.text and "Older tasks" not in page.text
    keyed = ui.client.get(f"{UI}/tasks", params={"status": "failed", "key": "team-b"}).text
    assert "failed-old" not in keyed and "No tasks match" in keyed
    queued_b = ui.client.get(f"{UI}/tasks", params={"status": "queued", "key": "team-b"}).text
    assert "q0000" in queued_b and "q0001" not in queued_b and "Older tasks" in queued_b


def test_tasks_page_through_older_tasks(ui: GatewayHarness) -> None:
    seed(ui, [task(f"t{i:03}", "team-a", NOW - i, "1") for i in range(120)])
    sign_in(ui)
    first = ui.client.get(f"{UI}/tasks", params={"status": "queued"}).text
    assert "t000" in first and "t050" not in first
    older = re.search(r'href="(/gateway/ui/tasks\?[^"]+)">Older', first)
    assert older is not None
    second = ui.client.get(older.group(1).replace("&amp;", "&")).text
    assert "t050" in second and "t000" not in second


def test_usage_period_presets_keep_the_grouping(ui: GatewayHarness) -> None:
    seed(ui, [task("old", "team-a", NOW - 10 * 86400, "1"), task("new", "team-a", NOW - 3600, "2")])
    sign_in(ui)
    page = ui.client.get(f"{UI}/usage", params={"by": "model"}).text
    presets = re.findall(r'<a href="(\?since=[^"]*)">([^<]+)</a>', page)
    assert [label for _, label in presets] == ["This month", "Last 24 hours", "Last 7 days", "Last 30 days", "All time"]
    week = ui.client.get(f"{UI}/usage" + presets[2][0].replace("&amp;", "&")).text
    assert re.search(r'id="total-tasks">1<', week) and '<th scope="col">model</th>' in week
    everything = ui.client.get(f"{UI}/usage" + presets[4][0].replace("&amp;", "&")).text
    assert re.search(r'id="total-tasks">2<', everything)


def test_accounts_page_shows_state_and_in_flight_never_the_key(ui: GatewayHarness) -> None:
    seed(ui, [task("t1", "team-a", NOW - 60, "1")])  # unsettled: one in flight on the default account
    sign_in(ui)
    page = ui.client.get(f"{UI}/accounts")
    assert page.status_code == 200
    rows = ui.client.get("/gateway/accounts", headers=ADMIN).json()["data"]
    assert rows, "the gateway has at least its default account"
    for row in rows:
        assert row["name"] in page.text and row["state"] in page.text
        assert f'<td class="num">{row["in_flight"]}</td>' in page.text
    assert ui.settings.upstream_api_key not in page.text


def test_usage_by_account(ui: GatewayHarness) -> None:
    seed(ui, [task("t1", "team-a", NOW - 60, "1.5")])
    sign_in(ui)
    page = ui.client.get(f"{UI}/usage", params={"by": "account"})
    assert page.status_code == 200
    assert '<th scope="col">account</th>' in page.text
    assert re.search(r'id="total-cost">1.50<', page.text)


def test_limits_form_shows_the_current_limits_and_changes_them(ui: GatewayHarness) -> None:
    ui.create_key("team-a", models=["kling-v3-std-*"], rpm=30, monthly_budget_usd="10")
    csrf = sign_in(ui)
    form = ui.client.get(f"{UI}/keys/team-a/limits").text
    for field, value in [("models", "kling-v3-std-*"), ("rpm", "30"), ("monthly_budget_usd", "10")]:
        assert re.search(rf'name="{field}"[^>]*value="{re.escape(value)}"', form), field
    saved = ui.client.post(
        f"{UI}/keys/team-a/limits", data={"csrf": csrf, "models": "", "rpm": "90", "monthly_budget_usd": "2.5"}
    )
    assert saved.status_code == 200 and "Saved the limits of team-a." in saved.text
    key = ui.client.get("/gateway/keys/team-a", headers=ADMIN).json()
    assert (key["models"], key["rpm"], key["monthly_budget_usd"]) == ([], 90, "2.5")


@pytest.mark.parametrize(
    ("name", "fields", "status", "message"),
    [
        ("team-a", {"rpm": "fast"}, 400, "rpm must be a whole number"),
        ("team-a", {"monthly_budget_usd": "-1"}, 400, "monthly_budget_usd"),
        ("team-a", {"models": "no-such-model-*"}, 400, "matches no model"),
        ("nobody", {"rpm": "1"}, 404, "No key named"),
        ("gone", {"rpm": "1"}, 409, "cannot be changed"),
    ],
)
def test_limits_refusals_show_the_reason(
    ui: GatewayHarness, name: str, fields: dict[str, str], status: int, message: str
) -> None:
    ui.create_key("team-a", rpm=30)
    ui.create_key("gone")
    assert ui.client.delete("/gateway/keys/gone", headers=ADMIN).status_code == 200
    csrf = sign_in(ui)
    response = ui.client.post(f"{UI}/keys/{name}/limits", data={"csrf": csrf, **fields})
    assert response.status_code == status
    assert message in response.text
    assert ui.client.get("/gateway/keys/team-a", headers=ADMIN).json()["rpm"] == 30


def test_audit_page_lists_the_uis_own_changes_newest_first(ui: GatewayHarness) -> None:
    csrf = sign_in(ui)
    assert ui.client.post(f"{UI}/keys", data={"csrf": csrf, "name": "team-z"}).status_code == 201
    assert ui.client.post(f"{UI}/keys/team-z/revoke", data={"csrf": csrf}).status_code == 200
    page = ui.client.get(f"{UI}/audit")
    assert page.status_code == 200
    assert page.text.index("key.revoked") < page.text.index("key.created")
    assert "team-z" in page.text
    assert ui.client.get(f"{UI}/audit", params={"cursor": "garbage"}).status_code == 400
