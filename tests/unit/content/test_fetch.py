"""The guarded fetch against real loopback servers: who gets credentials, which hops are allowed, what is refused.

The "public" host names resolve (through the injected resolver) to a public address; the injected dial then
connects that checked address to the loopback fake, as a CDN on the internet would be reached in production.
"""

from __future__ import annotations

import pytest
from support.upstream_fake import FakeUpstream, huge, redirect, video, video_bytes

from gateway.config import ContentSettings
from gateway.content.fetch import VideoFetcher
from gateway.content.origin import origin_of
from gateway.errors import GatewayError

PUBLIC_IP = "93.184.216.34"


def fetcher_for(upstream: FakeUpstream, cdn: FakeUpstream, **settings: object) -> VideoFetcher:
    cdn_port = int(cdn.url.rsplit(":", 1)[1])

    async def resolve(host: str) -> list[str]:
        return {"cdn.example.com": [PUBLIC_IP], "evil.example.com": ["10.1.2.3"]}.get(host, [])

    def dial(address: str, port: int) -> tuple[str, int]:
        return ("127.0.0.1", cdn_port) if address == PUBLIC_IP else (address, port)

    content = ContentSettings(**settings)  # type: ignore[arg-type]
    return VideoFetcher(content, origin_of(upstream.url), resolver=resolve, dial=dial)


async def read_all(fetcher: VideoFetcher, url: str, key: str = "sk-account") -> bytes:
    fetched = await fetcher.open(url, key)
    return b"".join([chunk async for chunk in fetched.chunks(10**9)])


async def test_public_cdn_fetched_without_credentials() -> None:
    """A public origin other than the upstream's: fetched, with no Authorization at all."""
    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        cdn.always("*", "/", video(5000))
        fetcher = fetcher_for(upstream, cdn)
        try:
            port = cdn.url.rsplit(":", 1)[1]
            assert await read_all(fetcher, f"http://cdn.example.com:{port}/v.mp4") == video_bytes(0, 5000)
        finally:
            await fetcher.aclose()
        assert cdn.requests[0].header("authorization") is None
        assert upstream.requests == []


async def test_upstream_origin_gets_the_account_key_and_redirects_drop_it() -> None:
    """The upstream's origin gets the key; its redirect to a public CDN is followed without it."""
    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        port = cdn.url.rsplit(":", 1)[1]
        upstream.always("GET", "/files/", redirect(f"http://cdn.example.com:{port}/signed"))
        cdn.always("*", "/", video(100))
        fetcher = fetcher_for(upstream, cdn)
        try:
            assert await read_all(fetcher, f"{upstream.url}/files/v.mp4") == video_bytes(0, 100)
        finally:
            await fetcher.aclose()
        assert upstream.requests[0].header("authorization") == "Bearer sk-account"
        assert cdn.requests[0].header("authorization") is None


@pytest.mark.parametrize("target", ["http://evil.example.com:{port}/x", "http://127.0.0.1:{port}/x"])
async def test_public_hop_redirecting_to_private_is_refused(target: str) -> None:
    """Every hop is checked again: a public CDN's redirect to a private address is refused there."""
    with FakeUpstream() as upstream, FakeUpstream() as cdn, FakeUpstream() as private:
        port = cdn.url.rsplit(":", 1)[1]
        cdn.always("GET", "/", redirect(target.format(port=private.url.rsplit(":", 1)[1])))
        private.always("*", "/", video(10))
        fetcher = fetcher_for(upstream, cdn)
        try:
            with pytest.raises(GatewayError) as caught:
                await fetcher.open(f"http://cdn.example.com:{port}/v.mp4", "sk-account")
        finally:
            await fetcher.aclose()
        assert (caught.value.status, caught.value.code) == (502, "video_unavailable")
        assert private.requests == []


async def test_more_than_three_redirects_refused() -> None:
    """Three redirects are followed, a fourth is refused; counts span origins."""
    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        port = cdn.url.rsplit(":", 1)[1]
        for n in range(4):
            cdn.always("GET", f"/r{n}", redirect(f"http://cdn.example.com:{port}/r{n + 1}"))
        cdn.always("*", "/r4", video(10))
        cdn.always("*", "/r3x", video(10))
        fetcher = fetcher_for(upstream, cdn)
        try:
            with pytest.raises(GatewayError) as caught:
                await fetcher.open(f"http://cdn.example.com:{port}/r0", "")
            assert await read_all(fetcher, f"http://cdn.example.com:{port}/r1") == video_bytes(0, 10)
        finally:
            await fetcher.aclose()
        assert "more than 3" in caught.value.message
        assert cdn.calls("GET", "/r4") == 1  # only from the second, 3-redirect fetch


async def test_unresolvable_name_is_refused() -> None:
    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        fetcher = fetcher_for(upstream, cdn)
        try:
            with pytest.raises(GatewayError) as caught:
                await fetcher.open("http://nowhere.example.com/v.mp4", "")
        finally:
            await fetcher.aclose()
        assert caught.value.code == "video_unavailable"
        assert cdn.requests == []


async def test_size_cap_while_streaming() -> None:
    """A body longer than the limit aborts the stream with video_unavailable."""
    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        upstream.always("GET", "/big", huge(200, 300_000))
        fetcher = fetcher_for(upstream, cdn)
        try:
            fetched = await fetcher.open(f"{upstream.url}/big", "k")
            with pytest.raises(GatewayError) as caught:
                async for _chunk in fetched.chunks(100_000):
                    pass
        finally:
            await fetcher.aclose()
        assert caught.value.code == "video_unavailable"


async def test_declared_length_over_cap_refused_before_reading() -> None:
    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        upstream.always("GET", "/big", video(5000))
        fetcher = fetcher_for(upstream, cdn, max_bytes=4999)
        try:
            with pytest.raises(GatewayError) as caught:
                await fetcher.open(f"{upstream.url}/big", "k")
        finally:
            await fetcher.aclose()
        assert caught.value.code == "video_unavailable"


async def test_silent_origin_times_out_as_504() -> None:
    from support.upstream_fake import hang

    with FakeUpstream() as upstream, FakeUpstream() as cdn:
        upstream.always("GET", "/slow", hang())
        fetcher = fetcher_for(upstream, cdn, read_timeout_s=0.2)
        try:
            with pytest.raises(GatewayError) as caught:
                await fetcher.open(f"{upstream.url}/slow", "k")
        finally:
            await fetcher.aclose()
        assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")
