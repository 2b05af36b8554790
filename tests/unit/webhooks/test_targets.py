"""Callback URL rules and DNS pinning: refuse a name with any private address, connect to the checked one."""

from __future__ import annotations

import pytest

from gateway.webhooks.targets import Target, TargetRefused, check_webhook_url, pin

PUBLIC = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


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

    @pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://localhost:9000/hook"])
    def test_development_setting_allows_private_hosts(self, url: str) -> None:
        """allow_private drops the private-host rule (and only that one)."""
        assert check_webhook_url(url, allow_private=True) is None
        assert check_webhook_url("ftp://127.0.0.1/", allow_private=True) is not None


class Resolver:
    """A scripted resolver: one answer per call (the last one repeats), every call recorded."""

    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class TestPin:
    """One resolution per attempt; every address checked; the checked address is the one to connect to."""

    async def test_public_name_is_pinned_to_its_address(self) -> None:
        """The Target carries the checked address, the name for Host/SNI, the port and the path with query."""
        target = await pin("https://hooks.example.com:8443/k?token=t", Resolver([PUBLIC]), timeout_s=1)
        assert target == Target(
            "https://hooks.example.com:8443/k?token=t", "https", "hooks.example.com", 8443, PUBLIC, "/k?token=t"
        )
        assert target.host_header == "hooks.example.com:8443"

    @pytest.mark.parametrize(
        "answer",
        [
            [PUBLIC, "127.0.0.1"],  # public first, loopback next
            ["127.0.0.1", PUBLIC],
            [PUBLIC_V6, "::1"],
            [PUBLIC, "10.0.0.7"],
            [PUBLIC, "169.254.169.254"],
            [PUBLIC, "::ffff:127.0.0.1"],
            ["10.0.0.7"],
        ],
    )
    async def test_any_private_address_refuses_the_name(self, answer: list[str]) -> None:
        """Mixed answers are refused: one private address is enough to steer a delivery inside."""
        with pytest.raises(TargetRefused, match="private"):
            await pin("https://hooks.example.com/", Resolver(answer), timeout_s=1)

    async def test_each_pin_resolves_once_and_is_checked_again(self) -> None:
        """A name answering public, then loopback (rebinding) passes the first attempt and is refused the next."""
        resolver = Resolver([PUBLIC], ["127.0.0.1"])
        first = await pin("https://hooks.example.com/", resolver, timeout_s=1)
        assert first.address == PUBLIC
        with pytest.raises(TargetRefused):
            await pin("https://hooks.example.com/", resolver, timeout_s=1)
        assert resolver.calls == ["hooks.example.com", "hooks.example.com"]

    @pytest.mark.parametrize(
        ("answer", "words"),
        [(OSError("no such host"), "could not be resolved"), ([], "no address"), (["not-an-ip"], "no address")],
    )
    async def test_unresolvable_name_is_refused(self, answer: list[str] | Exception, words: str) -> None:
        """No usable answer: this attempt fails (a later one resolves again)."""
        with pytest.raises(TargetRefused, match=words):
            await pin("https://hooks.example.com/", Resolver(answer), timeout_s=1)

    async def test_slow_resolver_times_out(self) -> None:
        """A lookup beyond timeout_s fails the attempt."""

        async def slow(host: str) -> list[str]:
            import asyncio

            await asyncio.sleep(5)
            return [PUBLIC]

        with pytest.raises(TargetRefused, match="TimeoutError"):
            await pin("https://hooks.example.com/", slow, timeout_s=0.05)

    async def test_ip_literal_is_not_resolved(self) -> None:
        """An IP literal host is its own pinned address (checked by the URL rule)."""
        resolver = Resolver([PUBLIC])
        target = await pin("https://[2001:4860:4860::8888]/h", resolver, timeout_s=1)
        assert target.address == "2001:4860:4860::8888" and target.host_header == "[2001:4860:4860::8888]"
        assert resolver.calls == []
        with pytest.raises(TargetRefused, match="private"):
            await pin("http://0x7f.1/h", resolver, timeout_s=1)

    async def test_development_setting_pins_private_addresses(self) -> None:
        """With allow_private, loopback answers are allowed, still resolved once and pinned."""
        target = await pin("http://hooks.example.com:9000/h", Resolver(["127.0.0.1"]), timeout_s=1, allow_private=True)
        assert target.address == "127.0.0.1" and target.host_header == "hooks.example.com:9000"

    async def test_url_rule_applies_on_every_attempt(self) -> None:
        """A URL the static rule refuses is never resolved."""
        resolver = Resolver([PUBLIC])
        with pytest.raises(TargetRefused, match="local"):
            await pin("http://localhost/h", resolver, timeout_s=1)
        assert resolver.calls == []
