"""The choice of account, account states and the reading of upstream refusals, as tables."""

from __future__ import annotations

import pytest

from gateway.accounts.policy import (
    AccountView,
    all_unauthorized,
    candidates,
    capacity_retry_after,
    refusal,
    retry_after_s,
)
from gateway.catalog import AccountState, RefusalReason

NOW = 1000.0
STD = "kling-v3-std-silent"
PRO = "kling-v3-pro-audio"


def v(name: str, in_flight: int = 0, limit: int = 0, **kw: object) -> AccountView:
    return AccountView(name, in_flight, limit, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("views", "model", "exclude", "expected"),
    [
        ([v("a"), v("b")], STD, (), ["a", "b"]),  # equal: by name
        ([v("a", 3, 10), v("b", 1, 10)], STD, (), ["b", "a"]),  # least loaded first
        ([v("a", 4, 10, weight=2.0), v("b", 3, 10)], STD, (), ["a", "b"]),  # 4/20 < 3/10
        ([v("a", 1, 2), v("b", 5, 100)], STD, (), ["b", "a"]),  # relative to the limit
        ([v("a", 5, 10), v("b", 50)], STD, (), ["b", "a"]),  # no limit: load 0
        ([v("a", 2, 2), v("b", 9, 10)], STD, (), ["b", "a"]),  # believed full: last, still asked
        ([v("a", models=("kling-v3-pro-*",)), v("b")], STD, (), ["b"]),  # does not serve the model
        ([v("a", models=("kling-v3-pro-*",)), v("b")], PRO, (), ["a", "b"]),
        ([v("a", unauthorized=True), v("b")], STD, (), ["b"]),
        ([v("a", set_aside_until=NOW + 1), v("b")], STD, (), ["b"]),
        ([v("a", set_aside_until=NOW), v("b", 1)], STD, (), ["a", "b"]),  # set-aside time passed
        ([v("a", removed=True)], STD, (), []),
        ([v("a"), v("b")], STD, ("a",), ["b"]),  # tried already
    ],
)
def test_candidates(views: list[AccountView], model: str, exclude: tuple[str, ...], expected: list[str]) -> None:
    """Accounts serving the model, usable, least loaded relative to max_in_flight x weight first."""
    assert candidates(views, model, NOW, exclude) == expected


@pytest.mark.parametrize(
    ("view", "state"),
    [
        (v("a"), AccountState.OK),
        (v("a", 1, 2), AccountState.OK),
        (v("a", 2, 2), AccountState.FULL),
        (v("a", set_aside_until=NOW + 5), AccountState.FULL),
        (v("a", unauthorized=True, set_aside_until=NOW + 5), AccountState.UNAUTHORIZED),
        (v("a", removed=True, unauthorized=True), AccountState.REMOVED),
    ],
)
def test_state(view: AccountView, state: AccountState) -> None:
    """ok, full (no room or set aside), unauthorized, removed."""
    assert view.state(NOW) is state


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (401, b"{}", RefusalReason.UNAUTHORIZED),
        (403, b"", RefusalReason.UNAUTHORIZED),
        (429, b'{"error": {"message": "slow down"}}', RefusalReason.RATE_LIMITED),
        (429, b'{"code": 1303, "message": "parallel task over resource pack limit"}', RefusalReason.CAPACITY),
        (400, b'{"error": {"code": "1303", "message": "x"}}', RefusalReason.CAPACITY),
        (400, b'{"data": {"code": 1303}}', RefusalReason.CAPACITY),
        (400, b'{"message": "Parallel task over resource pack limit"}', RefusalReason.CAPACITY),
        (400, b"parallel task over resource pack limit", RefusalReason.CAPACITY),
        (400, b'{"error": {"code": "invalid_request"}}', None),
        (404, b"[]", None),
        (500, b'{"code": 1303}', None),
        (200, b'{"task_id": "t"}', None),
    ],
)
def test_refusal(status: int, body: bytes, reason: RefusalReason | None) -> None:
    """401/403 unauthorized; 1303 capacity; other 429 rate_limited; anything else passes through."""
    assert refusal(status, body) is reason


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("7", 7.0), (" 2.5 ", 2.5), ("-1", None), ("soon", None), ("nan", None), ("99999", 3600.0)],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    """Delta seconds only, capped at an hour."""
    assert retry_after_s(header) == seconds


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        ([v("a", 2, 2)], 5),  # nobody set aside: the default
        ([v("a", set_aside_until=NOW + 2.2)], 3),
        ([v("a", set_aside_until=NOW + 2.2), v("b", set_aside_until=NOW + 0.1)], 1),
        # set aside with nothing in flight here: only its Retry-After brings it back, so not sooner
        ([v("a", set_aside_until=NOW + 60)], 60),
        ([v("a", 1, set_aside_until=NOW + 60)], 5),  # one of its tasks may end sooner
        ([v("a", set_aside_until=NOW + 60), v("b", 2, 2)], 5),  # b is full by count: may free at any time
        ([v("a", set_aside_until=NOW + 60), v("b", unauthorized=True)], 60),  # b never comes back by waiting
        ([v("a", set_aside_until=NOW + 2, models=("kling-v3-pro-*",))], 5),  # not this model's account
        ([v("a", set_aside_until=NOW + 99_999)], 3600),  # capped at an hour
    ],
)
def test_capacity_retry_after(views: list[AccountView], expected: int) -> None:
    """The soonest an account of the model could take a task again, at least 1 s, at most an hour."""
    assert capacity_retry_after(views, STD, NOW, 5) == expected


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        ([v("a", unauthorized=True), v("b", unauthorized=True)], True),
        ([v("a", unauthorized=True), v("b", 2, 2)], False),  # b may take it later: capacity wins
        ([v("a", unauthorized=True), v("b", set_aside_until=NOW + 9)], False),
        ([v("a", unauthorized=True), v("b", models=("kling-v3-pro-*",))], True),  # b does not serve the model
        ([v("a", unauthorized=True), v("old", removed=True)], True),
        ([v("a", models=("kling-v3-pro-*",))], False),  # no account serves it: not a key problem
        ([], False),
    ],
)
def test_all_unauthorized(views: list[AccountView], expected: bool) -> None:
    """Every account serving the model has its key rejected: an operator problem, not capacity."""
    assert all_unauthorized(views, STD) is expected
