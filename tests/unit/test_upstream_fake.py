"""The scripted fake upstream: every behaviour as a plain httpx client sees it, and request recording."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support.upstream_fake import (
    FakeUpstream,
    RecordedRequest,
    ServerThread,
    dynamic,
    garbage,
    hang,
    huge,
    invalid_json,
    json,
    raw,
    refuse,
    reset,
    slow,
    text,
    truncate,
)

BROKEN = (httpx.ReadError, httpx.RemoteProtocolError)


@pytest.fixture
def client(fake_upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_upstream.url, timeout=2.0) as c:
        yield c


class TestWellBehaved:
    def test_json(self, fake_upstream: FakeUpstream) -> None:
        """json() answers with the status, a JSON body and extra headers."""
        fake_upstream.script("POST", "/v1/video/generations", json(201, {"id": "t1"}, headers={"X-Up": "1"}))
        response = httpx.post(f"{fake_upstream.url}/v1/video/generations", json={})
        assert response.status_code == 201
        assert response.json() == {"id": "t1"}
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-up"] == "1"

    def test_text(self, fake_upstream: FakeUpstream) -> None:
        """text() answers any body with its content type."""
        fake_upstream.script("GET", "/", text(502, "<html>bad gateway</html>", "text/html"))
        response = httpx.get(f"{fake_upstream.url}/x")
        assert (response.status_code, response.text) == (502, "<html>bad gateway</html>")
        assert response.headers["content-type"] == "text/html"

    def test_keep_alive_reuses_the_connection(self, fake_upstream: FakeUpstream) -> None:
        """Well-behaved responses keep the connection open for the next request."""
        fake_upstream.always("GET", "/v1/videos/", json(200, {"status": "queued"}))
        with httpx.Client(base_url=fake_upstream.url) as c:
            for _ in range(5):
                assert c.get("/v1/videos/t1").status_code == 200
        assert fake_upstream.calls("GET", "/v1/videos/t1") == 5
        assert fake_upstream.connections == 1

    def test_connection_close_is_honoured(self, fake_upstream: FakeUpstream) -> None:
        """A client asking for Connection: close gets a fresh connection per request."""
        fake_upstream.always("GET", "/", json(200, {}))
        with httpx.Client(base_url=fake_upstream.url, headers={"Connection": "close"}) as c:
            c.get("/a")
            c.get("/b")
        assert fake_upstream.connections == 2

    def test_invalid_json(self, fake_upstream: FakeUpstream) -> None:
        """invalid_json() is a complete response whose JSON body does not parse."""
        fake_upstream.script("GET", "/", invalid_json(200))
        response = httpx.get(fake_upstream.url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        with pytest.raises(ValueError):
            response.json()

    def test_huge(self, fake_upstream: FakeUpstream) -> None:
        """huge() sends exactly n bytes of (valid) JSON."""
        fake_upstream.script("GET", "/", huge(200, 3_000_000))
        response = httpx.get(fake_upstream.url)
        assert len(response.content) == 3_000_000
        assert response.json()["pad"].startswith("xxx")

    def test_huge_can_be_abandoned(self, fake_upstream: FakeUpstream) -> None:
        """A client that stops reading a huge body mid-way leaves the fake working."""
        fake_upstream.script("GET", "/big", huge(200, 50_000_000))
        fake_upstream.script("GET", "/small", json(200, {"ok": True}))
        with httpx.Client(base_url=fake_upstream.url) as c, c.stream("GET", "/big") as response:
            next(response.iter_bytes())
        assert httpx.get(f"{fake_upstream.url}/small").json() == {"ok": True}

    def test_raw(self, fake_upstream: FakeUpstream) -> None:
        """raw() sends exactly the given bytes, then closes."""
        fake_upstream.script("GET", "/", raw(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 2\r\n\r\nhi"))
        response = httpx.get(fake_upstream.url)
        assert (response.status_code, response.content) == (418, b"hi")

    def test_dynamic(self, fake_upstream: FakeUpstream) -> None:
        """dynamic() builds the answer from the request."""
        fake_upstream.always("GET", "/v1/videos/", dynamic(lambda r: json(200, {"id": r.path.rsplit("/", 1)[1]})))
        assert httpx.get(f"{fake_upstream.url}/v1/videos/task_9").json() == {"id": "task_9"}


class TestMisbehaviour:
    def test_reset_before_response(self, fake_upstream: FakeUpstream, client: httpx.Client) -> None:
        """reset() with nothing sent makes the client's request fail."""
        fake_upstream.script("GET", "/", reset())
        with pytest.raises(BROKEN):
            client.get("/")

    def test_reset_mid_response(self, fake_upstream: FakeUpstream, client: httpx.Client) -> None:
        """reset(partial) sends part of a response, then a RST the client reads as an error."""
        fake_upstream.script("GET", "/", reset(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"id"'))
        with pytest.raises(BROKEN):
            client.get("/")

    def test_hang_times_out(self, fake_upstream: FakeUpstream) -> None:
        """hang() never answers, so the client's read timeout fires."""
        fake_upstream.script("GET", "/", hang())
        with httpx.Client(timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
            c.get(fake_upstream.url)
        assert fake_upstream.calls("GET", "/") == 1

    def test_slow_answers_late(self, fake_upstream: FakeUpstream, client: httpx.Client) -> None:
        """slow() waits, then behaves as its follow-up."""
        fake_upstream.script("GET", "/", slow(0.3, then=json(200, {"ok": 1})))
        started = time.monotonic()
        assert client.get("/").json() == {"ok": 1}
        assert time.monotonic() - started >= 0.3

    def test_slow_beyond_the_timeout(self, fake_upstream: FakeUpstream) -> None:
        """A slow answer longer than the read timeout is a timeout."""
        fake_upstream.script("GET", "/", slow(1.0, then=json(200, {})))
        with httpx.Client(timeout=0.1) as c, pytest.raises(httpx.ReadTimeout):
            c.get(fake_upstream.url)

    def test_truncate(self, fake_upstream: FakeUpstream, client: httpx.Client) -> None:
        """truncate() promises more body than it sends; the client sees a protocol error."""
        fake_upstream.script("GET", "/", truncate(200, b'{"id": "task_1", "status": "queued"}', 10))
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/")

    def test_garbage(self, fake_upstream: FakeUpstream, client: httpx.Client) -> None:
        """garbage() is not HTTP; the client fails to parse it."""
        fake_upstream.script("GET", "/", garbage())
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/")

    def test_refuse(self, fake_upstream: FakeUpstream, client: httpx.Client) -> None:
        """refuse() closes without answering: the server disconnected."""
        fake_upstream.script("GET", "/", refuse())
        with pytest.raises(BROKEN):
            client.get("/")

    def test_closed_port_refuses_connections(self) -> None:
        """closed_port() is a URL where connecting fails."""
        with pytest.raises(httpx.ConnectError):
            httpx.get(FakeUpstream.closed_port(), timeout=1)

    def test_stop_and_start_listening(self, fake_upstream: FakeUpstream) -> None:
        """A running fake can take its port down and bring it back."""
        fake_upstream.always("GET", "/", json(200, {"up": True}))
        fake_upstream.stop_listening()
        with pytest.raises(httpx.ConnectError):
            httpx.get(fake_upstream.url, timeout=1)
        fake_upstream.start_listening()
        assert httpx.get(fake_upstream.url).json() == {"up": True}

    def test_survives_a_non_http_client(self, fake_upstream: FakeUpstream) -> None:
        """A client sending garbage gets a 400 and the fake keeps serving."""
        with socket.create_connection(("127.0.0.1", fake_upstream.port), timeout=2) as sock:
            sock.sendall(b"\x00\x01 not http\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        fake_upstream.script("GET", "/", json(200, {}))
        assert httpx.get(fake_upstream.url).status_code == 200


class TestScript:
    def test_queue_then_default_then_not_scripted(self, fake_upstream: FakeUpstream) -> None:
        """Queued behaviours are used once each in order, then the default, then a 404."""
        fake_upstream.script("GET", "/v1/videos/", json(200, {"n": 1}), json(200, {"n": 2}))
        with httpx.Client(base_url=fake_upstream.url) as c:
            assert [c.get("/v1/videos/t").json()["n"] for _ in range(2)] == [1, 2]
            fake_upstream.script("GET", "/v1/videos/", default=json(200, {"n": 0}))
            assert [c.get("/v1/videos/t").json()["n"] for _ in range(2)] == [0, 0]
            missing = c.post("/v1/videos/t")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_scripted"

    def test_longest_prefix_wins(self, fake_upstream: FakeUpstream) -> None:
        """A more specific path prefix takes precedence over a shorter one."""
        fake_upstream.always("GET", "/v1/", json(200, {"route": "v1"}))
        fake_upstream.always("GET", "/v1/videos/task_7", json(200, {"route": "task_7"}))
        with httpx.Client(base_url=fake_upstream.url) as c:
            assert c.get("/v1/videos/task_7").json() == {"route": "task_7"}
            assert c.get("/v1/videos/task_8").json() == {"route": "v1"}

    def test_wildcard_method(self, fake_upstream: FakeUpstream) -> None:
        """Method '*' matches any method."""
        fake_upstream.always("*", "/", json(200, {}))
        with httpx.Client(base_url=fake_upstream.url) as c:
            assert {c.request(m, "/x").status_code for m in ("GET", "POST", "DELETE")} == {200}


class TestRecording:
    def test_records_method_path_headers_and_body(self, fake_upstream: FakeUpstream) -> None:
        """Each request is recorded with case-preserving, duplicate-keeping headers and the exact body."""
        fake_upstream.always("POST", "/", json(200, {}))
        headers = [("X-Trace", "a"), ("x-trace", "b"), ("Authorization", "Bearer sk-up")]
        httpx.post(f"{fake_upstream.url}/v1/video/generations?x=1", content=b'{"a": 1}', headers=headers)
        (request,) = fake_upstream.requests
        assert isinstance(request, RecordedRequest)
        assert (request.method, request.path, request.query) == ("POST", "/v1/video/generations", "x=1")
        assert ("X-Trace", "a") in request.headers
        assert ("x-trace", "b") in request.headers
        assert request.header_values("X-TRACE") == ["a", "b"]
        assert request.header("authorization") == "Bearer sk-up"
        assert request.body == b'{"a": 1}'
        assert request.json() == {"a": 1}

    def test_chunked_request_bodies(self, fake_upstream: FakeUpstream) -> None:
        """A chunked request body is recorded de-chunked."""
        fake_upstream.always("POST", "/", json(200, {}))
        httpx.post(fake_upstream.url, content=iter([b"hello ", b"world"]))
        assert fake_upstream.requests[0].body == b"hello world"

    def test_calls_count_per_method_and_path(self, fake_upstream: FakeUpstream) -> None:
        """calls() counts exact method + path, ignoring the query string."""
        fake_upstream.always("*", "/", json(200, {}))
        with httpx.Client(base_url=fake_upstream.url) as c:
            c.get("/v1/videos/t1")
            c.get("/v1/videos/t1?again=1")
            c.get("/v1/videos/t2")
            c.post("/v1/videos/t1")
        assert fake_upstream.calls("GET", "/v1/videos/t1") == 2
        assert fake_upstream.calls("get", "/v1/videos/t2") == 1
        assert fake_upstream.calls("POST", "/v1/videos/t1") == 1
        assert fake_upstream.calls("GET", "/v1/videos/t3") == 0
        assert len(fake_upstream.requests_to("GET", "/v1/videos/t1")) == 2

    def test_wait_for_calls(self, fake_upstream: FakeUpstream) -> None:
        """wait_for_calls returns once enough calls arrived and fails after its deadline otherwise."""
        fake_upstream.always("GET", "/", json(200, {}))
        httpx.get(fake_upstream.url)
        fake_upstream.wait_for_calls("GET", "/", 1, within_s=1)
        with pytest.raises(AssertionError):
            fake_upstream.wait_for_calls("GET", "/", 2, within_s=0.05)


class TestAsync:
    async def test_async_client_and_waiting(self, fake_upstream: FakeUpstream) -> None:
        """From an async test, a hanging request can be observed arriving before it times out."""
        fake_upstream.script("GET", "/v1/videos/t1", hang())
        async with httpx.AsyncClient(base_url=fake_upstream.url, timeout=0.5) as c:
            pending = asyncio.create_task(c.get("/v1/videos/t1"))
            await fake_upstream.wait_for_calls_async("GET", "/v1/videos/t1", 1, within_s=2)
            with pytest.raises(httpx.ReadTimeout):
                await pending

    def test_close_drops_hanging_connections(self) -> None:
        """Closing the fake ends hanging connections instead of waiting for them."""
        fake = FakeUpstream()
        fake.start()
        fake.always("GET", "/", hang())
        with httpx.Client(timeout=5) as c:
            errors: list[BaseException] = []

            def call() -> None:
                try:
                    c.get(fake.url)
                except httpx.HTTPError as exc:
                    errors.append(exc)

            thread = threading.Thread(target=call)
            thread.start()
            fake.wait_for_calls("GET", "/")
            started = time.monotonic()
            fake.close()
            thread.join(5)
        assert time.monotonic() - started < 2
        assert len(errors) == 1
        fake.close()  # idempotent


class TestServerThread:
    def test_serves_an_asgi_app(self) -> None:
        """ServerThread serves any ASGI app on loopback until closed."""

        async def hello(request: Request) -> PlainTextResponse:
            return PlainTextResponse("hello")

        app = Starlette(routes=[Route("/", hello)])
        with ServerThread(app) as server:
            assert httpx.get(server.url).text == "hello"
            url = server.url
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=1)
