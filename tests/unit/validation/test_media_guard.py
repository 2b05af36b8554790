"""Tests of ``gateway.validation.media_guard``, the DNS half of the private-media rule, on a fake resolver and clock."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping

import pytest

from gateway.errors import Problem
from gateway.validation.checks import ValidRequest, validate
from gateway.validation.media_guard import MediaGuard, private_only, system_resolver


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """Answers from a table (a list of addresses, or an exception to raise), counting calls per name."""

    def __init__(self, answers: Mapping[str, list[str] | BaseException], *, gate: asyncio.Event | None = None):
        self.answers = dict(answers)
        self.gate = gate
        self.calls: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(answer, BaseException):
            raise answer
        return answer


async def never_answers(host: str) -> list[str]:
    """A resolver that hangs forever."""
    await asyncio.Event().wait()
    return []


def request(image: str = "https://a.example/x.png", last_image: str | None = None) -> ValidRequest:
    """A validated image-mode request with these media URLs."""
    body = {"model": "kling-v3-pro-silent", "prompt": "a fox", "image": image}
    if last_image is not None:
        body["last_image"] = last_image
    result = validate(body)
    assert result.request is not None, result.problems
    return result.request


def pairs(problems: tuple[Problem, ...]) -> list[tuple[str, str]]:
    """The (param, code) of each problem."""
    return [(p.param, p.code) for p in problems]


class TestVerdicts:
    @pytest.mark.parametrize(
        ("addresses", "rejected"),
        [
            (["127.0.0.1"], True),
            (["10.0.0.1", "192.168.1.1"], True),
            (["169.254.169.254"], True),
            (["100.64.0.1"], True),
            (["::1"], True),
            (["fe80::1%eth0"], True),
            (["fd00::1", "10.0.0.1"], True),
            (["::ffff:127.0.0.1"], True),
            (["8.8.8.8"], False),
            (["2001:4860:4860::8888"], False),
            (["127.0.0.1", "8.8.8.8"], False),  # mixed: some public address, so allowed
            (["10.0.0.1", "2606:4700::1111"], False),
            ([], False),
            (["not-an-address"], False),
            (["not-an-address", "10.0.0.1"], True),
        ],
    )
    async def test_resolution_table(self, addresses: list[str], rejected: bool) -> None:
        """A name is rejected only when every address it resolves to is private."""
        guard = MediaGuard(FakeResolver({"a.example": addresses}))
        problems = await guard.check(request())
        assert pairs(problems) == ([("image", "private_media_url")] if rejected else [])

    @pytest.mark.parametrize(
        ("addresses", "private"), [(["127.0.0.1"], True), (["127.0.0.1", "1.1.1.1"], False), ([], False)]
    )
    def test_private_only(self, addresses: list[str], private: bool) -> None:
        """private_only needs at least one address and no public one."""
        assert private_only(addresses) is private

    async def test_message_names_host(self) -> None:
        """The problem message names the host and why it is refused."""
        guard = MediaGuard(FakeResolver({"a.example": ["10.0.0.7"]}))
        (problem,) = await guard.check(request())
        assert "'a.example'" in problem.message and "private" in problem.message


class TestParams:
    async def test_only_the_private_one(self) -> None:
        """Only the media param whose host resolves privately is named."""
        resolver = FakeResolver({"a.example": ["8.8.8.8"], "b.example": ["192.168.0.10"]})
        problems = await MediaGuard(resolver).check(request("https://a.example/1.png", "https://b.example/2.png"))
        assert pairs(problems) == [("last_image", "private_media_url")]

    async def test_both_on_one_host(self) -> None:
        """image and last_image on one private host are both named, from one lookup."""
        resolver = FakeResolver({"a.example": ["127.0.0.1"]})
        problems = await MediaGuard(resolver).check(request("https://a.example/1.png", "https://A.example./2.png"))
        assert pairs(problems) == [("image", "private_media_url"), ("last_image", "private_media_url")]
        assert resolver.calls == ["a.example"]

    async def test_no_names_no_lookup(self) -> None:
        """A request whose media are IP literals (or absent) needs no lookup."""
        resolver = FakeResolver({})
        guard = MediaGuard(resolver)
        assert await guard.check(request("https://8.8.8.8/x.png")) == ()
        text = validate({"model": "kling-v3-std-silent", "prompt": "a fox"}).request
        assert text is not None and await guard.check(text) == ()
        assert resolver.calls == []


class TestFailures:
    @pytest.mark.parametrize(
        "error",
        [
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            OSError("network unreachable"),
            RuntimeError("resolver bug"),
            TimeoutError(),
        ],
    )
    async def test_failure_does_not_reject(self, error: BaseException) -> None:
        """A lookup that fails lets the request through."""
        guard = MediaGuard(FakeResolver({"a.example": error}))
        assert await guard.check(request()) == ()

    async def test_timeout_does_not_reject(self) -> None:
        """A lookup slower than timeout_s is abandoned, and the request goes through quickly."""
        guard = MediaGuard(never_answers, timeout_s=0.02)
        started = time.monotonic()
        assert await guard.check(request()) == ()
        assert time.monotonic() - started < 1.0

    async def test_bounded_per_lookup(self) -> None:
        """Two slow names time out concurrently, not one after the other."""
        guard = MediaGuard(never_answers, timeout_s=0.25)
        started = time.monotonic()
        assert await guard.check(request("https://a.example/1.png", "https://b.example/2.png")) == ()
        assert time.monotonic() - started < 0.45  # one after the other would take 0.5 s

    @pytest.mark.parametrize("kwargs", [{"timeout_s": 0}, {"timeout_s": -1}, {"cache_ttl_s": -1}, {"cache_size": -1}])
    def test_bad_settings(self, kwargs: dict[str, float]) -> None:
        """Nonsensical settings are refused at construction."""
        with pytest.raises(ValueError):
            MediaGuard(FakeResolver({}), **kwargs)  # type: ignore[arg-type]


class TestCache:
    async def test_answers_cached(self) -> None:
        """A second check of the same name within the TTL does not resolve again, and answers the same."""
        resolver = FakeResolver({"a.example": ["127.0.0.1"]})
        guard = MediaGuard(resolver, clock=FakeClock())
        first = await guard.check(request())
        second = await guard.check(request())
        assert first == second and pairs(second) == [("image", "private_media_url")]
        assert resolver.calls == ["a.example"]

    async def test_public_answers_cached(self) -> None:
        """Public answers are cached too."""
        resolver = FakeResolver({"a.example": ["8.8.8.8"]})
        guard = MediaGuard(resolver, clock=FakeClock())
        for _ in range(3):
            assert await guard.check(request()) == ()
        assert resolver.calls == ["a.example"]

    @pytest.mark.parametrize(("elapsed", "lookups"), [(299.0, 1), (300.0, 2), (1000.0, 2)])
    async def test_ttl_expiry(self, elapsed: float, lookups: int) -> None:
        """An answer is reused until cache_ttl_s has passed on the injected clock, then resolved again."""
        clock = FakeClock()
        resolver = FakeResolver({"a.example": ["127.0.0.1"]})
        guard = MediaGuard(resolver, cache_ttl_s=300.0, clock=clock)
        await guard.check(request())
        clock.now += elapsed
        await guard.check(request())
        assert len(resolver.calls) == lookups

    async def test_answer_changes_after_expiry(self) -> None:
        """After expiry the new answer counts: a name that became private is then rejected."""
        clock = FakeClock()
        resolver = FakeResolver({"a.example": ["8.8.8.8"]})
        guard = MediaGuard(resolver, cache_ttl_s=60.0, clock=clock)
        assert await guard.check(request()) == ()
        resolver.answers["a.example"] = ["10.0.0.1"]
        assert await guard.check(request()) == ()  # still cached
        clock.now += 61
        assert pairs(await guard.check(request())) == [("image", "private_media_url")]

    @pytest.mark.parametrize(("elapsed", "lookups"), [(29.0, 1), (30.0, 2)])
    async def test_failures_cached_briefly(self, elapsed: float, lookups: int) -> None:
        """Failed lookups are cached too, for the shorter failure_ttl_s."""
        clock = FakeClock()
        resolver = FakeResolver({"a.example": OSError("down")})
        guard = MediaGuard(resolver, cache_ttl_s=300.0, failure_ttl_s=30.0, clock=clock)
        await guard.check(request())
        clock.now += elapsed
        await guard.check(request())
        assert len(resolver.calls) == lookups

    async def test_timeouts_cached_as_failures(self) -> None:
        """A timed-out lookup is not retried within failure_ttl_s."""
        calls: list[str] = []

        async def slow(host: str) -> list[str]:
            calls.append(host)
            await asyncio.sleep(10)
            return ["127.0.0.1"]

        guard = MediaGuard(slow, timeout_s=0.01, clock=FakeClock())
        assert await guard.check(request()) == ()
        assert await guard.check(request()) == ()
        assert calls == ["a.example"]

    async def test_lru_bound(self) -> None:
        """The cache holds at most cache_size names, evicting the least recently used."""
        resolver = FakeResolver({f"{n}.example": ["8.8.8.8"] for n in "abc"})
        guard = MediaGuard(resolver, cache_size=2, clock=FakeClock())
        for name in ("a", "b", "a", "c", "a", "b"):  # c evicts b (a was used more recently); b evicts c
            await guard.check(request(f"https://{name}.example/x.png"))
        assert resolver.calls == ["a.example", "b.example", "c.example", "b.example"]

    async def test_cache_disabled(self) -> None:
        """cache_size 0 resolves every time."""
        resolver = FakeResolver({"a.example": ["8.8.8.8"]})
        guard = MediaGuard(resolver, cache_size=0, clock=FakeClock())
        await guard.check(request())
        await guard.check(request())
        assert len(resolver.calls) == 2


class TestSharing:
    async def test_concurrent_checks_share_one_lookup(self) -> None:
        """Concurrent checks of one name wait for a single lookup and all get its answer."""
        gate = asyncio.Event()
        resolver = FakeResolver({"a.example": ["10.0.0.1"]}, gate=gate)
        guard = MediaGuard(resolver, clock=FakeClock())
        checks = [asyncio.create_task(guard.check(request())) for _ in range(10)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*checks)
        assert all(pairs(r) == [("image", "private_media_url")] for r in results)
        assert resolver.calls == ["a.example"]

    async def test_different_names_resolved_separately(self) -> None:
        """Different names get their own lookups, concurrently."""
        gate = asyncio.Event()
        resolver = FakeResolver({"a.example": ["8.8.8.8"], "b.example": ["8.8.4.4"]}, gate=gate)
        guard = MediaGuard(resolver, clock=FakeClock())
        check = asyncio.create_task(guard.check(request("https://a.example/1.png", "https://b.example/2.png")))
        await asyncio.sleep(0.01)
        assert sorted(resolver.calls) == ["a.example", "b.example"]
        gate.set()
        assert await check == ()

    async def test_cancelled_caller_does_not_cancel_lookup(self) -> None:
        """A caller that gives up does not cancel the lookup others are waiting on."""
        gate = asyncio.Event()
        resolver = FakeResolver({"a.example": ["127.0.0.1"]}, gate=gate)
        guard = MediaGuard(resolver, clock=FakeClock())
        impatient = asyncio.create_task(guard.check(request()))
        patient = asyncio.create_task(guard.check(request()))
        await asyncio.sleep(0)
        impatient.cancel()
        await asyncio.sleep(0)
        gate.set()
        assert pairs(await patient) == [("image", "private_media_url")]
        assert impatient.cancelled()
        assert resolver.calls == ["a.example"]

    async def test_lookup_after_completion_uses_cache(self) -> None:
        """Once the shared lookup is done, later checks hit the cache instead of a new lookup."""
        resolver = FakeResolver({"a.example": ["8.8.8.8"]})
        guard = MediaGuard(resolver, clock=FakeClock())
        await asyncio.gather(*(guard.check(request()) for _ in range(3)))
        await guard.check(request())
        assert resolver.calls == ["a.example"]


class TestSystemResolver:
    async def test_resolves_localhost(self) -> None:
        """The default resolver (getaddrinfo, no network for localhost) returns loopback addresses."""
        addresses = await system_resolver("localhost")
        assert addresses and set(addresses) <= {"127.0.0.1", "::1"}

    async def test_default_guard_rejects_name_for_loopback(self) -> None:
        """With the default resolver, a name that resolves only to loopback is refused."""
        body_request = request()
        as_localhost = ValidRequest(
            body={**body_request.body, "image": "https://localhost/x.png"},
            model=body_request.model,
            tier=body_request.tier,
            audio=body_request.audio,
            mode=body_request.mode,
            duration=body_request.duration,
            media_hosts=("localhost",),
        )
        assert pairs(await MediaGuard(timeout_s=2.0).check(as_localhost)) == [("image", "private_media_url")]
