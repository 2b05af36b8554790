"""Session cookies and CSRF tokens (gateway/ui/session.py) and the chart's geometry: pure tables."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.ui.chart import HEIGHT, MAX_BARS, WIDTH, bars
from gateway.ui.session import Session, SessionSigner

T0 = 1_800_000_000.0


def test_a_fresh_cookie_verifies_until_it_expires() -> None:
    signer = SessionSigner("token-a", ttl_s=600)
    cookie = signer.issue(T0)
    session = signer.verify(cookie, T0 + 599)
    assert session is not None and session.expires_at == int(T0) + 600
    assert signer.verify(cookie, T0 + 600) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"),  # the MAC changed
        lambda c: str(int(c.split(".")[0]) + 60) + c[c.index(".") :],  # a later expiry
        lambda c: c.split(".")[0] + ".other-id." + c.split(".")[2],  # another id
        lambda c: c + ".x",
        lambda c: "",
        lambda c: "x" * 500,
        lambda c: "-1." + c.split(".", 1)[1],
    ],
)
def test_a_tampered_cookie_is_refused(mangle: object) -> None:
    signer = SessionSigner("token-a", ttl_s=600)
    cookie = signer.issue(T0)
    assert callable(mangle)
    assert signer.verify(mangle(cookie), T0 + 1) is None


def test_sessions_cross_processes_sharing_the_token_but_not_another_token() -> None:
    cookie = SessionSigner("token-a", ttl_s=600).issue(T0)
    assert SessionSigner("token-a", ttl_s=600).verify(cookie, T0 + 1) is not None
    assert SessionSigner("token-b", ttl_s=600).verify(cookie, T0 + 1) is None


def test_an_expiry_beyond_the_lifetime_is_refused() -> None:
    """A cookie signed for a longer lifetime (an older setting) does not outlive this one."""
    cookie = SessionSigner("token-a", ttl_s=86400).issue(T0)
    assert SessionSigner("token-a", ttl_s=600).verify(cookie, T0 + 1) is None


def test_the_csrf_token_is_bound_to_its_session() -> None:
    signer = SessionSigner("token-a", ttl_s=600)
    one = signer.verify(signer.issue(T0), T0)
    two = signer.verify(signer.issue(T0), T0)
    assert one is not None and two is not None
    assert signer.csrf_ok(one, signer.csrf_token(one))
    assert not signer.csrf_ok(one, signer.csrf_token(two))
    assert not signer.csrf_ok(one, None)
    assert not signer.csrf_ok(one, "")
    assert not signer.csrf_ok(Session(one.session_id, one.expires_at), signer.csrf_token(two))


@pytest.mark.parametrize(
    ("values", "heights"),
    [
        ([], []),
        ([Decimal(0), Decimal(0)], [0.0, 0.0]),
        ([Decimal(1), Decimal(4)], [35.0, 140.0]),
        ([Decimal(-1), Decimal(2)], [0.0, 140.0]),
    ],
)
def test_bars_scale_to_the_largest(values: list[Decimal], heights: list[float]) -> None:
    drawn = bars([(str(i), v, str(v)) for i, v in enumerate(values)])
    assert [b.height for b in drawn] == heights
    for bar in drawn:
        assert bar.x >= 0 and bar.x + bar.width <= WIDTH and 0 <= bar.y <= HEIGHT


def test_bars_stop_at_the_maximum() -> None:
    assert len(bars([(str(i), Decimal(i), "") for i in range(MAX_BARS + 5)])) == MAX_BARS
