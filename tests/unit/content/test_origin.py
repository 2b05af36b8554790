"""Which video URL may be fetched with which credentials (pure, one row per rule)."""

from __future__ import annotations

import pytest

from gateway.content.answer import content_url, rewrite_video_url, video_state
from gateway.content.origin import Hop, Origin, origin_of, plan_hop, redirect_target

UPSTREAM = origin_of("https://api.uniall.ai")


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://api.uniall.ai", Origin("https", "api.uniall.ai", 443)),
        ("https://API.UniAll.ai:443/x", Origin("https", "api.uniall.ai", 443)),
        ("http://127.0.0.1:8080/v1", Origin("http", "127.0.0.1", 8080)),
        ("http://h.example", Origin("http", "h.example", 80)),
        ("ftp://h.example", None),
        ("not a url", None),
    ],
)
def test_origin_of(url: str, origin: Origin | None) -> None:
    assert origin_of(url) == origin


@pytest.mark.parametrize(
    ("url", "credentials"),
    [
        ("https://api.uniall.ai/files/v.mp4", True),
        ("https://api.uniall.ai:443/files/v.mp4", True),
        ("https://cdn.example.com/v.mp4", False),
        ("http://api.uniall.ai/files/v.mp4", False),  # another scheme is another origin
        ("https://api.uniall.ai:8443/files/v.mp4", False),  # another port too
        ("https://files.api.uniall.ai/v.mp4", False),  # and a subdomain
        ("https://93.184.216.34/v.mp4", False),
    ],
)
def test_credentials_only_on_the_upstream_origin(url: str, credentials: bool) -> None:
    hop = plan_hop(url, UPSTREAM)
    assert isinstance(hop, Hop)
    assert hop.credentials is credentials


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/v.mp4", "private"),
        ("http://0x7f.1/v.mp4", "private"),
        ("http://169.254.169.254/latest", "private"),
        ("http://[::ffff:10.0.0.1]/v.mp4", "private"),
        ("http://localhost/v.mp4", "local"),
        ("http://storage.internal/v.mp4", "local"),
        ("http://intranet/v.mp4", "single-label"),
        ("https://user:pw@cdn.example.com/v.mp4", "credentials"),
        ("https://user:pw@api.uniall.ai/v.mp4", "credentials"),
        ("file:///etc/passwd", "unusable"),
        ("gopher://cdn.example.com/", "unusable"),
        ("https://cdn.example.com\\@evil/", "unusable"),
    ],
)
def test_refused(url: str, reason: str) -> None:
    refusal = plan_hop(url, UPSTREAM)
    assert isinstance(refusal, str)
    assert reason in refusal


@pytest.mark.parametrize(
    ("current", "location", "target"),
    [
        ("https://a.example/x/y", "/z", "https://a.example/z"),
        ("https://a.example/x/y", "z", "https://a.example/x/z"),
        ("https://a.example/x", "http://b.example/", "http://b.example/"),
        ("https://a.example/x", "//c.example/p", "https://c.example/p"),
        ("https://a.example/x", None, None),
        ("https://a.example/x", "", None),
    ],
)
def test_redirect_target(current: str, location: str | None, target: str | None) -> None:
    assert redirect_target(current, location) == target


@pytest.mark.parametrize(
    ("body", "state"),
    [
        (b'{"status": "completed", "video_url": "https://x/v.mp4"}', ("completed", "https://x/v.mp4")),
        (b'{"status": "in_progress"}', ("in_progress", None)),
        (b'{"status": "completed", "video_url": 5}', ("completed", None)),
        (b"[]", ("unknown", None)),
        (b"not json", ("unknown", None)),
        (None, ("unknown", None)),
    ],
)
def test_video_state(body: bytes | None, state: tuple[str, str | None]) -> None:
    assert video_state(body) == state


@pytest.mark.parametrize(
    ("body", "rewritten"),
    [
        (b'{"status":"completed","video_url":"https://u/v.mp4"}', True),
        (b'{"status":"in_progress","progress":5}', False),
        (b'{"status":"completed"}', False),
        (b"oops", False),
    ],
)
def test_rewrite_video_url(body: bytes, rewritten: bool) -> None:
    result = rewrite_video_url(body, "https://gw.example/", "task:1")
    if rewritten:
        assert video_state(result)[1] == "https://gw.example/v1/videos/task%3A1/content"
    else:
        assert result == body


def test_content_url() -> None:
    assert content_url("https://gw.example", "t_1") == "https://gw.example/v1/videos/t_1/content"
