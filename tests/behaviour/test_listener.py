"""The listener against raw sockets: head deadline and cap, keep-alive idle timeout, request-line and Host rules.

The gateway runs as ``kling-gateway serve`` runs it: uvicorn with the gateway's protocol built from the same
``[server]`` settings (``listener_protocol(ListenerLimits.of(...))`` and ``timeout_keep_alive``), in front of a
``FakeUpstream``. Each case asserts the exact status and, where the listener answers, its error ``code``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry
from support.upstream_fake import Behaviour, FakeUpstream, RecordedRequest, ServerThread, dynamic, json, slow

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.web.listener import ListenerLimits
from gateway.web.server_protocol import listener_protocol

SUBMIT = "/v1/video/generations"
BODY = b'{"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}'
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
FOLLOW_UP = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
HEADER_TIMEOUT_S = 0.5


def accept_slowly(request: RecordedRequest) -> Behaviour:
    """The upstream accepts each submission after a moment, so requests pipelined behind it are read first."""
    task_id = f"task_{time.monotonic_ns()}"
    return slow(0.3, json(200, {"id": task_id, "task_id": task_id, "status": "queued"}))


@dataclass
class Served:
    port: int
    upstream: FakeUpstream
    settings: Settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve(data_dir: Path, transport: str = "lean", **server: str) -> Iterator[Served]:
    """The gateway (open auth) behind uvicorn with the gateway's protocol, ``[server]`` settings overridden."""
    with FakeUpstream() as upstream:
        upstream.always("POST", SUBMIT, dynamic(accept_slowly))
        env = {
            "UNIALL_BASE_URL": upstream.url,
            "UNIALL_API_KEY": "sk-listener-upstream",
            "KLING_GATEWAY_AUTH_MODE": "open",
            "KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir),
            "KLING_GATEWAY_SETTLER_ENABLED": "false",
            "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
            "KLING_GATEWAY_SERVER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "KLING_GATEWAY_SERVER_KEEP_ALIVE_TIMEOUT_S": "0.5",
            "KLING_GATEWAY_UPSTREAM_TRANSPORT": transport,
        }
        env.update({f"KLING_GATEWAY_SERVER_{name.upper()}": value for name, value in server.items()})
        settings = load_settings(env=env)
        app = create_app(settings, registry=CollectorRegistry(), log_stream=io.StringIO())
        http = listener_protocol(ListenerLimits.of(settings.server))
        with ServerThread(app, lifespan="on", http=http, timeout_keep_alive=settings.server.keep_alive_timeout_s) as s:
            yield Served(s.port, upstream, settings)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("listener")) as gateway:
        yield gateway


# -- raw HTTP/1.1 -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def code(self) -> str:
        code: str = orjson.loads(self.body)["error"]["code"]
        return code


def parse(data: bytes) -> list[Answer]:
    """Every complete Content-Length framed response in ``data``; strict."""
    answers = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        assert len(data) >= length, f"truncated body: {data[:200]!r}"
        answers.append(Answer(int(status_line.split(" ")[1]), headers, data[:length]))
        data = data[length:]
    return answers


def read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed within ``timeout_s``."""
    sock.settimeout(timeout_s)
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {timeout_s} s; received {bytes(received[:200])!r}")
    return bytes(received)


def exchange(port: int, data: bytes) -> list[Answer]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return parse(read_until_closed(sock))


def trickle(sock: socket.socket, data: bytes, stop: threading.Event, interval_s: float = 0.05) -> None:
    """Send ``data`` a byte at a time until it is all sent, the server hangs up or ``stop`` is set."""
    for byte in data:
        if stop.wait(interval_s):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return


# -- slow heads ---------------------------------------------------------------------------------------------------


class TestHeadDeadline:
    def test_slow_head_gets_408(self, served: Served) -> None:
        """A head sent a byte at a time is cut off after header_timeout_s: 408 request_timeout, then closed."""
        stop = threading.Event()
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sender = threading.Thread(
                target=trickle, args=(sock, HEALTHZ.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * 200), stop)
            )
            started = time.monotonic()
            sender.start()
            try:
                [answer] = parse(read_until_closed(sock))
            finally:
                stop.set()
                sender.join()
            elapsed = time.monotonic() - started
        assert (answer.status, answer.code()) == (408, "request_timeout")
        assert answer.headers["connection"] == "close"
        assert answer.headers["x-request-id"]
        assert HEADER_TIMEOUT_S * 0.8 <= elapsed < HEADER_TIMEOUT_S + 2

    def test_silent_connection_is_closed_without_an_answer(self, served: Served) -> None:
        """A connection that sends nothing is closed after header_timeout_s, with nothing written to it."""
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            started = time.monotonic()
            assert read_until_closed(sock) == b""
            assert HEADER_TIMEOUT_S * 0.8 <= time.monotonic() - started < HEADER_TIMEOUT_S + 2

    def test_head_spread_over_reads_is_counted(self, served: Served) -> None:
        """An unfinished header line that grows past max_header_bytes over many reads: 431 before it ends."""
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: ")
            for _ in range(20):
                time.sleep(0.005)
                try:
                    sock.sendall(b"a" * 1024)
                except OSError:
                    break
            [answer] = parse(read_until_closed(sock))
        assert (answer.status, answer.code()) == (431, "headers_too_large")


class TestHeadCap:
    def test_slow_heads_cannot_crowd_out_healthz(self, tmp_path: Path) -> None:
        """Past max_connections_reading_headers, the longest-waiting head is cut off (408) and /healthz gets in."""
        with serve(
            tmp_path, HEADER_TIMEOUT_S="30", MAX_CONNECTIONS_READING_HEADERS="4", KEEP_ALIVE_TIMEOUT_S="30"
        ) as gateway:
            established = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            established.sendall(HEALTHZ)
            assert established.recv(65536).startswith(b"HTTP/1.1 200 ")
            slow_heads: list[socket.socket] = []
            try:
                for _ in range(12):
                    slow_heads.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
                    slow_heads[-1].sendall(b"GET /healthz HTTP/1.1\r\nHo")
                    time.sleep(0.01)
                started = time.monotonic()
                assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
                established.sendall(FOLLOW_UP)  # a kept-alive connection is not reading a head: untouched
                assert [a.status for a in parse(read_until_closed(established))] == [200]
                # The 8 oldest were cut off by the newer 4, and the newest by the /healthz connections.
                for sock in slow_heads[:9]:
                    [answer] = parse(read_until_closed(sock))
                    assert (answer.status, answer.code()) == (408, "request_timeout")
                assert time.monotonic() - started < 5  # long before the 30 s header timeout
            finally:
                established.close()
                for sock in slow_heads:
                    sock.close()


class TestKeepAlive:
    def test_idle_connection_closed_after_keep_alive_timeout(self, served: Served) -> None:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(HEALTHZ)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.2)  # within keep_alive_timeout_s the connection still serves
            sock.sendall(HEALTHZ)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            assert read_until_closed(sock) == b""
            assert 0.4 <= time.monotonic() - started < 3


# -- requests read before a refusal -------------------------------------------------------------------------------


def submission() -> bytes:
    head = f"POST {SUBMIT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
    return head.encode() + b"\r\n" + BODY


@pytest.fixture(params=["lean", "aiohttp"])
def served_by_transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """The gateway on each upstream transport (what is forwarded must be what is answered, on both)."""
    with serve(tmp_path, request.param) as gateway:
        yield gateway


MALFORMED_AFTER = {
    "invalid-header-line": (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nNo colon here\r\n\r\n", 400, "invalid_http_request"),
    "no-host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "invalid_host"),
    "target-too-long": (b"GET /" + b"a" * 64_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414, "uri_too_long"),
}


class TestAnsweredInOrder:
    @pytest.mark.parametrize("shape", sorted(MALFORMED_AFTER))
    def test_submission_before_a_refusal_is_answered(self, served_by_transport: Served, shape: str) -> None:
        """A forwarded (and billed) submission is answered with its task id before the refusal that follows it."""
        gateway = served_by_transport
        malformed, status, code = MALFORMED_AFTER[shape]
        before = len(gateway.upstream.requests)
        answers = exchange(gateway.port, submission() + malformed)
        assert [a.status for a in answers] == [200, status]
        assert orjson.loads(answers[0].body)["id"].startswith("task_")
        assert answers[1].code() == code
        assert answers[1].headers["connection"] == "close"
        assert len(gateway.upstream.requests) == before + 1


# -- the request line and Host ------------------------------------------------------------------------------------

REFUSED_HEADS = {
    "http-1.1-without-host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "invalid_host"),
    "two-hosts": (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nHost: other\r\n\r\n", 400, "invalid_host"),
    "http-1.0-with-two-hosts": (b"GET /healthz HTTP/1.0\r\nHost: gw\r\nHost: gw\r\n\r\n", 400, "invalid_host"),
    "http-2.0": (b"GET /healthz HTTP/2.0\r\nHost: gw\r\n\r\n", 505, "http_version_not_supported"),
    "http-0.9": (b"GET /healthz HTTP/0.9\r\nHost: gw\r\n\r\n", 505, "http_version_not_supported"),
    "64000-byte-target": (b"GET /healthz?" + b"a" * 64_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414, "uri_too_long"),
    "target-and-headers-over-the-limit": (
        b"GET /healthz?" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"b" * 7_000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    "upgrade-with-a-body": (
        b"POST /gateway/validate HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 5\r\n\r\nGET /",
        400,
        "invalid_upgrade",
    ),
}


class TestRequestLine:
    @pytest.mark.parametrize("shape", sorted(REFUSED_HEADS))
    def test_refused(self, served: Served, shape: str) -> None:
        """Refused with the gateway's JSON error, the connection closed, the pipelined request not parsed."""
        data, status, code = REFUSED_HEADS[shape]
        answers = exchange(served.port, data + FOLLOW_UP)
        assert [(a.status, a.code()) for a in answers] == [(status, code)]
        assert answers[0].headers["connection"] == "close"

    @pytest.mark.parametrize(
        "data",
        [
            b"GET /healthz HTTP/1.0\r\n\r\n",  # Host is optional in HTTP/1.0
            b"GET /healthz?" + b"a" * 15_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",  # under the limit
        ],
    )
    def test_controls_accepted(self, served: Served, data: bytes) -> None:
        assert [a.status for a in exchange(served.port, data)] == [200]

    def test_request_after_an_upgrade_request_is_answered(self, served: Served) -> None:
        """Upgrades are ignored (RFC 9110 section 7.8): the upgrade request and the one after it both answered."""
        upgrade = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        assert [a.status for a in exchange(served.port, upgrade + FOLLOW_UP)] == [200, 200]
