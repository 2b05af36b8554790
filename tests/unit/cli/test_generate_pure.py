"""The pure parts of ``kling-gateway generate``: Retry-After, the next delay, progress lines, errors, the body."""

from __future__ import annotations

import argparse
import email.utils
from typing import Any

import pytest

from gateway.cli.generate import (
    MAX_ATTEMPTS,
    MAX_BACKOFF_S,
    Failure,
    format_elapsed,
    gateway_failure,
    next_delay,
    parse_retry_after,
    progress_line,
    request_body,
    resume_command,
)

NOW = 1_800_000_000.0


class TestParseRetryAfter:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (None, None),
            ("", None),
            ("0", 0.0),
            ("3", 3.0),
            (" 12 ", 12.0),
            ("-1", None),
            ("1.5", None),
            ("soon", None),
            (email.utils.formatdate(NOW + 7, usegmt=True), 7.0),
            (email.utils.formatdate(NOW - 60, usegmt=True), 0.0),
            ("Sun, 06 Nov 1994 08:49:37", None),  # no zone: not an HTTP date
        ],
    )
    def test_table(self, value: str | None, expected: float | None) -> None:
        """Delta-seconds and HTTP dates are read; anything else is as if absent; past dates mean now."""
        assert parse_retry_after(value, NOW) == expected


class TestNextDelay:
    @pytest.mark.parametrize(
        ("status", "retry_after", "attempt", "expected"),
        [
            (429, 5.0, 0, 5.0),
            (503, 1.0, 0, 2.0),  # never sooner than the poll interval
            (429, None, 0, 2.0),
            (429, None, 2, 8.0),
            (429, 121.0, 0, None),  # a budget exhausted for the month: report it, do not wait
            (429, 5.0, MAX_ATTEMPTS, None),
            (None, None, 0, 2.0),  # no answer at all
            (None, None, 3, 16.0),
            (None, None, 10, None),
            (502, None, 1, 4.0),
            (504, None, 5, MAX_BACKOFF_S),
            (500, 9.0, 0, 2.0),  # Retry-After only counts on 429/503
            (400, None, 0, None),
            (401, None, 0, None),
            (404, None, 0, None),
            (409, None, 0, None),
            (422, None, 0, None),
        ],
    )
    def test_table(self, status: int | None, retry_after: float | None, attempt: int, expected: float | None) -> None:
        """Busy answers wait for Retry-After; failures back off; client errors and long waits give up."""
        assert next_delay(status, retry_after, interval=2.0, attempt=attempt) == expected


class TestProgressLine:
    @pytest.mark.parametrize(
        ("status", "progress", "elapsed", "expected"),
        [
            ("queued", 0, 0.4, "queued         0%  0:00:00"),
            ("in_progress", 42, 3.9, "in_progress   42%  0:00:03"),
            ("completed", 100, 3725.0, "completed    100%  1:02:05"),
            ("in_progress", None, 61.0, "in_progress     -  0:01:01"),
            ("in_progress", True, 0.0, "in_progress     -  0:00:00"),
            ("in_progress", 12.7, 0.0, "in_progress   12%  0:00:00"),
        ],
    )
    def test_table(self, status: str, progress: object, elapsed: float, expected: str) -> None:
        """Status, percentage (or '-' when unknown) and elapsed time, aligned for a log."""
        assert progress_line(status, progress, elapsed) == expected

    @pytest.mark.parametrize(("seconds", "text"), [(-1.0, "0:00:00"), (59.9, "0:00:59"), (86399.0, "23:59:59")])
    def test_elapsed(self, seconds: float, text: str) -> None:
        """Elapsed time reads H:MM:SS."""
        assert format_elapsed(seconds) == text


class TestGatewayFailure:
    @pytest.mark.parametrize(
        ("status", "body", "code", "message", "n_errors"),
        [
            (
                400,
                b'{"error": {"message": "2 problems", "code": "invalid_request", "type": "invalid_request_error",'
                b' "errors": [{"param": "duration", "code": "duration_out_of_range", "message": "m"}, "junk"]}}',
                "invalid_request",
                "2 problems",
                1,
            ),
            (
                401,
                b'{"error": {"message": "No key.", "type": "authentication_error"}}',
                "authentication_error",
                "No key.",
                0,
            ),
            (429, b'{"error": {"code": "budget_exceeded"}}', "budget_exceeded", "the gateway answered HTTP 429", 0),
            (502, b"<html>Bad Gateway</html>", "http_502", "<html>Bad Gateway</html>", 0),
            (500, b"", "http_500", "the gateway answered HTTP 500", 0),
            (404, b"[1, 2]", "http_404", "[1, 2]", 0),
        ],
    )
    def test_table(self, status: int, body: bytes, code: str, message: str, n_errors: int) -> None:
        """The gateway's JSON error shape is read; anything else becomes http_<status> with a snippet."""
        failure = gateway_failure(status, body)
        assert (failure.code, failure.message, len(failure.errors), failure.http_status) == (
            code,
            message,
            n_errors,
            status,
        )

    def test_lines(self) -> None:
        """A failure reads as its message with code and status, then one line per problem."""
        failure = Failure("invalid_request", "bad", ({"param": "duration", "code": "c", "message": "m"},), 400)
        assert failure.lines() == ["error: bad [invalid_request, HTTP 400]", "  - duration: m [c]"]


def namespace(**given: Any) -> argparse.Namespace:
    flags = ("model", "prompt", "image", "last_image", "duration", "aspect_ratio", "negative_prompt", "cfg_scale")
    return argparse.Namespace(**{name: given.get(name) for name in flags})


class TestRequestBody:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ({"model": "m", "prompt": "p"}, {"model": "m", "prompt": "p"}),
            ({"model": "m", "prompt": "p", "duration": "5"}, {"model": "m", "prompt": "p", "duration": 5}),
            ({"model": "m", "prompt": "p", "duration": "5.0"}, {"model": "m", "prompt": "p", "duration": 5.0}),
            ({"model": "m", "prompt": "p", "duration": "five"}, {"model": "m", "prompt": "p", "duration": "five"}),
            (
                {"model": "m", "prompt": "p", "cfg_scale": "0.5", "negative_prompt": "blur"},
                {"model": "m", "prompt": "p", "extra_body": {"negative_prompt": "blur", "cfg_scale": 0.5}},
            ),
            (
                {"model": "m", "prompt": "p", "image": "https://a/1.png", "last_image": "https://a/2.png"},
                {"model": "m", "prompt": "p", "image": "https://a/1.png", "last_image": "https://a/2.png"},
            ),
            (
                {"model": "m", "prompt": "p", "aspect_ratio": "1:1"},
                {"model": "m", "prompt": "p", "aspect_ratio": "1:1"},
            ),
        ],
    )
    def test_table(self, given: dict[str, str], expected: dict[str, Any]) -> None:
        """Only the flags given appear; numbers become JSON numbers, anything else stays text for validate to judge."""
        assert request_body(namespace(**given)) == expected


@pytest.mark.parametrize(
    ("out", "command"),
    [
        (None, "kling-gateway generate --resume task_1 --wait"),
        ("v.mp4", "kling-gateway generate --resume task_1 --wait --out v.mp4"),
    ],
)
def test_resume_command(out: str | None, command: str) -> None:
    """The resume hint names the task, and the output file when there was one."""
    assert resume_command("task_1", out) == command
