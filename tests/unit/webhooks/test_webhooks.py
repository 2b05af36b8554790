"""Completion webhooks: signatures, callback URL rules, and background delivery with retries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io

import httpx
import orjson
import pytest
from support.httpx_transport import HttpxTransport

from gateway.logs import make_logger
from gateway.validation.media_guard import MediaGuard
from gateway.webhooks.sender import WebhookSender, check_webhook_url, sign, verify

SECRET = b"whsec-test"
BODY = orjson.dumps({"id": "task_1", "status": "completed", "video_url": "https://cdn.example.com/v.mp4"})
NOW = 1_767_225_600


class TestSignature:
    """The X-Gateway-Signature header and its verification."""

    def test_format_is_timestamp_and_hmac(self) -> None:
        """The header is t=<ts>,v1=<hex HMAC-SHA256 of "<ts>." + body>."""
        expected = hmac.new(SECRET, f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
        assert sign(SECRET, NOW, BODY) == f"t={NOW},v1={expected}"

    def test_signature_verifies(self) -> None:
        """A fresh signature over the exact body verifies."""
        assert verify(SECRET, sign(SECRET, NOW, BODY), BODY, now=NOW + 10)

    @pytest.mark.parametrize(
        ("secret", "body", "now"),
        [
            (SECRET, BODY + b" ", NOW),  # tampered body
            (SECRET, BODY.replace(b"completed", b"failed"), NOW),
            (b"other-secret", BODY, NOW),  # wrong secret
            (SECRET, BODY, NOW + 301),  # too old
            (SECRET, BODY, NOW - 301),  # from the future
        ],
    )
    def test_tampered_or_old_fails(self, secret: bytes, body: bytes, now: int) -> None:
        """Another body, another secret or a timestamp outside the tolerance fails."""
        assert not verify(secret, sign(SECRET, NOW, BODY), body, now=now)

    @pytest.mark.parametrize(
        "header",
        [
            "",
            "garbage",
            f"t={NOW}",
            "v1=abc",
            f"t=-{NOW},v1=abc",
            f"t={NOW},t={NOW},v1=abc",
            "t=\uff11\uff12\uff13,v1=abc",  # full-width digits
            "t=1e9,v1=abc",
        ],
    )
    def test_malformed_headers_fail(self, header: str) -> None:
        """Headers without exactly one numeric timestamp and a v1 value fail (never raise)."""
        assert not verify(SECRET, header, BODY, now=NOW)

    def test_any_v1_may_match_for_rotation(self) -> None:
        """Several v1 values are accepted, so signatures with an old and a new secret both verify."""
        old = sign(b"old-secret", NOW, BODY).split(",")[1]
        header = f"{sign(SECRET, NOW, BODY)},{old}"
        assert verify(SECRET, header, BODY, now=NOW)
        assert verify(b"old-secret", header, BODY, now=NOW)

    def test_custom_tolerance(self) -> None:
        """The tolerance window is the receiver's choice."""
        header = sign(SECRET, NOW, BODY)
        assert verify(SECRET, header, BODY, now=NOW + 500, tolerance_s=600)
        assert not verify(SECRET, header, BODY, now=NOW + 61, tolerance_s=60)


class TestCallbackUrl:
    """Callback URLs follow the private-media rules."""

    @pytest.mark.parametrize(
        "url",
        [
            "https://hooks.example.com/kling?token=abc",
            "http://hooks.example.com:8443/x",
            "https://8.8.8.8/hook",
            "https://[2001:4860:4860::8888]/hook",
        ],
    )
    def test_public_urls_accepted(self, url: str) -> None:
        """Absolute http(s) URLs on public hosts pass."""
        assert check_webhook_url(url) is None

    @pytest.mark.parametrize(
        ("url", "words"),
        [
            ("http://127.0.0.1/hook", "private"),
            ("http://2130706433/hook", "private"),
            ("http://0x7f.1/hook", "private"),
            ("http://10.1.2.3/hook", "private"),
            ("http://169.254.169.254/latest/meta-data", "private"),
            ("http://[::1]/hook", "private"),
            ("http://[::ffff:192.168.0.1]/hook", "private"),
            ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/hook", "private"),  # full-width 127.0.0.1
            ("http://localhost:8080/hook", "local"),
            ("http://printer.local/hook", "local"),
            ("http://metadata.google.internal/", "local"),
            ("http://intranet/hook", "single-label"),
            ("https://user:pass@hooks.example.com/", "credentials"),
            ("https://token@hooks.example.com/", "credentials"),
            ("ftp://hooks.example.com/", "http"),
            ("file:///etc/passwd", "http"),
            ("//hooks.example.com/x", "http"),
            ("hooks.example.com/x", "http"),
            ("https://hooks.example.com:99999/", "port"),
            ("https://hooks example.com/", "whitespace"),
            ("https://hooks.example.com\\@evil/", "backslash"),
            ("https://hooks.example.com/x#frag", "fragment"),
            ("https://[::1/", "parsed"),
            ("https://exa$mple.com/", "host name"),
            ("", "non-empty"),
            (None, "string"),
            ("https://example.com/" + "a" * 3000, "longer"),
        ],
    )
    def test_rejected_with_reason(self, url: object, words: str) -> None:
        """Private, local, credentialed and non-http(s) URLs are refused with a reason naming the problem."""
        problem = check_webhook_url(url)
        assert problem is not None and words in problem


class Receiver:
    """A webhook receiver behind httpx.MockTransport: answers from a script, records every request."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"ok": answer < 300})


class Delays:
    """A fake sleep that records the backoff delays."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def make_sender(receiver: Receiver, logs: io.StringIO, **kwargs: object) -> WebhookSender:
    options: dict[str, object] = {
        "log": make_logger(stream=logs),
        "clock": lambda: float(NOW),
        "sleep": Delays(),
        "jitter": lambda: 1.0,
    }
    options.update(kwargs)
    return WebhookSender(SECRET, HttpxTransport(httpx.MockTransport(receiver)), **options)  # type: ignore[arg-type]


def events(logs: io.StringIO) -> list[str]:
    return [orjson.loads(line)["event"] for line in logs.getvalue().splitlines()]


async def settle(sender: WebhookSender) -> None:
    assert await sender.drain(timeout_s=5)


class TestDelivery:
    """Background POSTs, signed, retried with capped backoff until a 2xx."""

    async def test_delivery_is_signed_and_retried_until_2xx(self) -> None:
        """503, a connection error, then 200: three signed POSTs with one delivery id and growing delays."""
        receiver = Receiver(503, httpx.ConnectError("refused"), 200)
        logs, sleep = io.StringIO(), Delays()
        sender = make_sender(receiver, logs, sleep=sleep)
        assert sender.deliver("https://hooks.example.com/kling?token=s3cret", BODY) is True
        await settle(sender)
        assert len(receiver.requests) == 3
        ids = set()
        for request in receiver.requests:
            assert request.method == "POST" and request.content == BODY
            assert request.headers["content-type"] == "application/json"
            assert request.headers["x-gateway-event"] == "task.terminal"
            assert verify(SECRET, request.headers["x-gateway-signature"], request.content, now=NOW)
            ids.add(request.headers["x-gateway-delivery"])
        assert len(ids) == 1
        assert sleep.delays == [1.0, 2.0]
        assert events(logs).count("webhook_attempt_failed") == 2 and "webhook_delivered" in events(logs)
        assert "s3cret" not in logs.getvalue()  # the URL's token never reaches a log line
        await sender.aclose()

    async def test_gives_up_after_max_attempts(self) -> None:
        """A receiver that always fails gets max_attempts tries with capped delays, then the delivery is dropped."""
        receiver = Receiver(500)
        logs, sleep = io.StringIO(), Delays()
        sender = make_sender(receiver, logs, sleep=sleep, max_attempts=6, base_delay_s=1.0, max_delay_s=5.0)
        sender.deliver("https://hooks.example.com/", BODY)
        await settle(sender)
        assert len(receiver.requests) == 6
        assert sleep.delays == [1.0, 2.0, 4.0, 5.0, 5.0]
        assert "webhook_abandoned" in events(logs)
        await sender.aclose()

    async def test_jitter_spreads_delays(self) -> None:
        """Delays are jittered between half and all of the capped exponential step."""
        sleep = Delays()
        sender = make_sender(Receiver(500, 500, 200), io.StringIO(), sleep=sleep, jitter=lambda: 0.0)
        sender.deliver("https://hooks.example.com/", BODY)
        await settle(sender)
        assert sleep.delays == [0.5, 1.0]
        await sender.aclose()

    async def test_unexpected_client_error_is_a_failed_attempt(self) -> None:
        """An exception outside the transport tree counts as a failed attempt and is retried."""
        receiver, logs = Receiver(RuntimeError("client library refused"), 204), io.StringIO()
        sender = make_sender(receiver, logs)
        sender.deliver("https://hooks.example.com/", BODY)
        await settle(sender)
        assert len(receiver.requests) == 2 and "webhook_delivered" in events(logs)
        await sender.aclose()

    async def test_private_url_is_refused_without_a_request(self) -> None:
        """A private callback URL is never contacted."""
        receiver, logs = Receiver(200), io.StringIO()
        sender = make_sender(receiver, logs)
        sender.deliver("http://169.254.169.254/latest", BODY)
        await settle(sender)
        assert receiver.requests == [] and "webhook_refused" in events(logs)
        await sender.aclose()

    async def test_name_resolving_privately_is_refused(self) -> None:
        """With a MediaGuard, a host name that resolves only to private addresses is never contacted."""

        async def resolve(host: str) -> list[str]:
            return ["10.0.0.7"]

        receiver, logs = Receiver(200), io.StringIO()
        sender = make_sender(receiver, logs, guard=MediaGuard(resolve))
        sender.deliver("https://hooks.example.com/", BODY)
        await settle(sender)
        assert receiver.requests == [] and "webhook_refused" in events(logs)
        await sender.aclose()

    async def test_pending_deliveries_are_bounded(self) -> None:
        """Beyond max_pending, new deliveries are dropped with an error log."""
        receiver, logs = Receiver(200), io.StringIO()
        receiver.gate = asyncio.Event()
        sender = make_sender(receiver, logs, max_pending=2, concurrency=1)
        assert sender.deliver("https://hooks.example.com/1", BODY)
        assert sender.deliver("https://hooks.example.com/2", BODY)
        assert not sender.deliver("https://hooks.example.com/3", BODY)
        await asyncio.sleep(0.01)
        assert len(receiver.requests) == 1  # concurrency 1: the second waits for a slot
        receiver.gate.set()
        await settle(sender)
        assert len(receiver.requests) == 2 and "webhook_dropped" in events(logs)
        await sender.aclose()

    async def test_aclose_waits_then_cancels(self) -> None:
        """aclose gives deliveries a moment, cancels those still hanging, and refuses new ones."""
        receiver, logs = Receiver(200), io.StringIO()
        receiver.gate = asyncio.Event()
        sender = make_sender(receiver, logs)
        sender.deliver("https://hooks.example.com/", BODY)
        await asyncio.sleep(0)
        await sender.aclose(timeout_s=0.05)
        assert sender.pending == 0 and "webhooks_cancelled" in events(logs)
        assert not sender.deliver("https://hooks.example.com/", BODY)

    @pytest.mark.parametrize(
        "kwargs",
        [{"max_attempts": 0}, {"concurrency": 0}, {"max_pending": 0}, {"base_delay_s": 10.0, "max_delay_s": 1.0}],
    )
    def test_rejects_bad_settings(self, kwargs: dict[str, object]) -> None:
        """Nonsense settings fail at construction."""
        transport = HttpxTransport(httpx.MockTransport(Receiver(200)))
        with pytest.raises(ValueError):
            WebhookSender(SECRET, transport, log=make_logger(), **kwargs)  # type: ignore[arg-type]
