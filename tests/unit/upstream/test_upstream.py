"""The upstream client: header hygiene, key injection, GET-only connect retries, and error mapping (MockTransport)."""

from __future__ import annotations

import io

import httpx
import pytest
from support.httpx_transport import HttpxTransport

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.logs import make_logger
from gateway.metrics import create_metrics
from gateway.upstream.client import UpstreamClient, inbound_headers, outbound_headers

KEY = "sk-upstream-canary"


def sample(metrics: object, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return value or 0.0


def client_for(handler: httpx.MockTransport, **settings: object) -> tuple[UpstreamClient, object, list[float]]:
    metrics = create_metrics()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    cfg = UpstreamSettings(base_url="http://upstream.test", **settings)  # type: ignore[arg-type]
    client = UpstreamClient(
        cfg,
        KEY,
        HttpxTransport(handler, cfg),
        metrics,
        sleep=sleep,
        jitter=lambda: 1.0,
        log=make_logger(stream=io.StringIO()),
    )
    return client, metrics, sleeps


class TestHeaders:
    def test_outbound_strips_client_credentials_and_hop_by_hop(self) -> None:
        """The client's Authorization, Host and hop-by-hop headers (also those named in Connection) never go up."""
        headers = outbound_headers(
            [
                ("Authorization", "Bearer gk_client"),
                ("Host", "gateway.local"),
                ("Connection", "keep-alive, X-Secret-Hop"),
                ("X-Secret-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic x"),
                ("Content-Length", "10"),
                ("Cookie", "a=b"),
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "abc"),
                ("X-Request-ID", "client-id"),
            ],
            KEY,
            "rid-1",
        )
        names = [k.lower() for k, _ in headers]
        for dropped in (
            "host",
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "content-length",
            "cookie",
        ):
            assert dropped not in names
        assert ("Authorization", f"Bearer {KEY}") in headers
        assert names.count("authorization") == 1
        assert ("Content-Type", "application/json") in headers
        assert "idempotency-key" not in names  # a client's own key never goes up unscoped
        assert ("X-Request-ID", "rid-1") in headers and names.count("x-request-id") == 1

    def test_inbound_strips_hop_by_hop_and_recomputed(self) -> None:
        """Upstream hop-by-hop, length/encoding and unlisted headers are dropped; the content type passes."""
        headers = inbound_headers(
            [
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("Content-Length", "5"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Type", "application/json"),
                ("X-Upstream-Trace", "t1"),
                ("Server", "nginx"),
            ]
        )
        assert headers == [("Content-Type", "application/json")]


class TestRequests:
    async def test_key_injected_and_body_passed(self) -> None:
        """The upstream sees the team key, the path and the exact body; the response comes back unchanged."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(201, content=b'{"id":"t"}', headers={"X-Up": "1"})

        client, _, _ = client_for(httpx.MockTransport(handler))
        response = await client.request(
            "POST",
            "/v1/video/generations",
            route="r",
            request_id="rid",
            client_headers=[("Authorization", "Bearer gk_x")],
            body=b'{"a":1}',
        )
        assert (response.status, response.body, response.header("x-up")) == (201, b'{"id":"t"}', "1")
        assert seen[0].url == "http://upstream.test/v1/video/generations"
        assert seen[0].headers["authorization"] == f"Bearer {KEY}"
        assert seen[0].content == b'{"a":1}'
        await client.aclose()

    async def test_get_retried_on_connect_error_with_capped_backoff(self) -> None:
        """A GET that cannot connect is retried get_retries times with capped backoff, then succeeds."""
        calls = 0

        def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise httpx.ConnectError("refused")
            return httpx.Response(200, json={"status": "queued"})

        client, _, sleeps = client_for(httpx.MockTransport(handler), retry_backoff_s=0.1, retry_backoff_max_s=0.15)
        response = await client.request("GET", "/v1/videos/t", route="r", request_id="rid")
        assert response.status == 200 and calls == 3
        assert sleeps == [0.1, 0.15]
        await client.aclose()

    async def test_get_gives_up_with_502(self) -> None:
        """When every attempt fails to connect: 502 upstream_unavailable and one connect error counted."""
        client, metrics, _ = client_for(httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("x"))))
        with pytest.raises(UpstreamUnavailable) as info:
            await client.request("GET", "/v1/videos/t", route="r", request_id="rid")
        assert (info.value.status, info.value.code) == (502, "upstream_unavailable")
        assert sample(metrics, "kling_gateway_upstream_errors_total", {"kind": "connect"}) == 1
        await client.aclose()

    async def test_post_never_retried(self) -> None:
        """A submission is sent once even on a connect error (it could cost money twice)."""
        calls = 0

        def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            raise httpx.ConnectError("refused")

        client, _, sleeps = client_for(httpx.MockTransport(handler))
        with pytest.raises(UpstreamUnavailable):
            await client.request("POST", "/v1/video/generations", route="r", request_id="rid", body=b"{}")
        assert calls == 1 and sleeps == []
        await client.aclose()

    @pytest.mark.parametrize(
        ("exc", "status", "code", "kind"),
        [
            (httpx.ReadTimeout("slow"), 504, "upstream_timeout", "timeout"),
            (httpx.WriteTimeout("slow"), 504, "upstream_timeout", "timeout"),
            (httpx.RemoteProtocolError("garbage"), 502, "upstream_unavailable", "invalid_response"),
            (httpx.ReadError("reset"), 502, "upstream_unavailable", "invalid_response"),
        ],
    )
    async def test_error_mapping(self, exc: Exception, status: int, code: str, kind: str) -> None:
        """Timeouts map to 504, broken answers to 502, each counted by kind; never retried."""
        calls = 0

        def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            raise exc

        client, metrics, _ = client_for(httpx.MockTransport(handler))
        with pytest.raises((UpstreamTimeout, UpstreamUnavailable)) as info:
            await client.request("GET", "/v1/videos/t", route="r", request_id="rid")
        assert (info.value.status, info.value.code, calls) == (status, code, 1)
        assert sample(metrics, "kling_gateway_upstream_errors_total", {"kind": kind}) == 1
        assert KEY not in info.value.message
        await client.aclose()

    async def test_5xx_passed_through_and_counted(self) -> None:
        """An upstream 5xx is returned as is (passed through) and counted as status_5xx."""
        client, metrics, _ = client_for(httpx.MockTransport(lambda r: httpx.Response(503, content=b"busy")))
        response = await client.request("GET", "/v1/videos/t", route="/v1/videos/{task_id}", request_id="rid")
        assert (response.status, response.body) == (503, b"busy")
        assert sample(metrics, "kling_gateway_upstream_errors_total", {"kind": "status_5xx"}) == 1
        assert (
            sample(
                metrics,
                "kling_gateway_upstream_request_duration_seconds_count",
                {"route": "/v1/videos/{task_id}", "status": "503"},
            )
            == 1
        )
        await client.aclose()


class TestAccountKeys:
    async def test_each_call_carries_its_accounts_key(self) -> None:
        """With a key per account, every call sends the named account's key; an unknown account sends nothing."""
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers["authorization"])
            return httpx.Response(200, json={})

        cfg = UpstreamSettings(base_url="http://upstream.test")
        keys = {"a": "sk-a", "b": "sk-b"}
        client = UpstreamClient(
            cfg,
            keys.get,
            HttpxTransport(httpx.MockTransport(handler), cfg),
            create_metrics(),
            log=make_logger(stream=io.StringIO()),
        )
        for account in ("a", "b", "a"):
            await client.request("GET", "/v1/videos/t", route="status", request_id="r", account=account)
        assert seen == ["Bearer sk-a", "Bearer sk-b", "Bearer sk-a"]
        with pytest.raises(UpstreamUnavailable) as info:
            await client.request("GET", "/v1/videos/t", route="status", request_id="r", account="gone")
        assert info.value.request_sent is False and "gone" in str(info.value)
        assert len(seen) == 3
        await client.aclose()


class TestSeveralAccounts:
    async def test_every_accounts_key_is_masked_and_401_is_502(self) -> None:
        """With several accounts, an answer echoing any account's key (the one sent or another) is masked; a 401
        is 502 upstream_auth_failed, unless the caller takes refusals itself (a submission trying accounts)."""
        keys = {"a": "sk-account-a-0123456789", "b": "sk-account-b-9876543210"}

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/denied"):
                return httpx.Response(401, json={"error": request.headers["authorization"]})
            echo = f"{request.headers['authorization']} and {keys['b']}"
            return httpx.Response(200, json={"echo": echo}, headers={"X-RateLimit-Key": keys["a"]})

        cfg = UpstreamSettings(base_url="http://upstream.test")
        client = UpstreamClient(
            cfg,
            keys.get,
            HttpxTransport(httpx.MockTransport(handler), cfg),
            create_metrics(),
            log=make_logger(stream=io.StringIO()),
            secrets=keys.values(),
        )
        response = await client.request("GET", "/v1/models", route="r", request_id="rid", account="a")
        assert response.body == b'{"echo":"Bearer sk-*** and sk-***"}'
        assert response.header("x-ratelimit-key") == "sk-***"
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.request("GET", "/v1/denied", route="r", request_id="rid", account="b")
        assert (caught.value.status, caught.value.code) == (502, "upstream_auth_failed")
        refused = await client.request(
            "GET", "/v1/denied", route="r", request_id="rid", account="b", auth_refusal_to_caller=True
        )
        assert refused.status == 401 and keys["b"].encode() not in refused.body
