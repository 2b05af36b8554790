"""Hostile input against a real uvicorn server: smuggling shapes, header injection, oversized and malformed bodies.

The gateway runs as ``kling-gateway serve`` runs it (uvicorn with the httptools parser, lifespan on) on a loopback
port, in front of a ``FakeUpstream`` that accepts everything; malformed requests are written as raw bytes on a
socket, since no HTTP client will send them. Every case asserts the exact status, the gateway's ``code`` where the
gateway (not the HTTP parser) answers, and that nothing reached the upstream.

The SSRF corpus (every IPv4 spelling, IPv6 forms, userinfo tricks, non-http schemes, names resolving to private
addresses) is shared by the media URL check (``POST /gateway/validate`` and submissions with ``image``) and the
webhook URL check (``check_webhook_url`` and ``POST /gateway/keys`` with ``webhook_url``).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry
from support.harness import ADMIN, ADMIN_TOKEN, GatewayFactory
from support.upstream_fake import Behaviour, FakeUpstream, RecordedRequest, ServerThread, dynamic, json

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.webhooks.targets import Target, TargetRefused, check_webhook_url, pin

SUBMIT = "/v1/video/generations"
VALIDATE = "/gateway/validate"
UPSTREAM_KEY = "sk-hostile-upstream"
MAX_BODY = 64 * 1024
BODY = b'{"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}'
SANE_REQUEST_ID = "req-0123456789abcdef"
# A complete, harmless request pipelined after a hostile one: answering it would mean the server lost its place.
FOLLOW_UP = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"


# -- a served gateway ---------------------------------------------------------------------------------------------


def accept(request: RecordedRequest) -> Behaviour:
    """The upstream accepts every submission."""
    task_id = f"task_{time.monotonic_ns()}"
    return json(200, {"id": task_id, "task_id": task_id, "status": "queued"})


@dataclass
class Served:
    """A gateway behind a real uvicorn server, its upstream, and its logs and metrics."""

    port: int
    upstream: FakeUpstream
    logs: io.StringIO
    registry: CollectorRegistry
    settings: Settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def uvicorn_error_log_off() -> Iterator[None]:
    """Silence uvicorn's error log (the gateway's own log, which the tests read, is unaffected).

    Hostile requests make uvicorn log tracebacks from its thread. Python 3.11 formats tracebacks with
    ``ast.parse``, whose converter keeps its recursion counter in interpreter-wide state: one racing with
    pytest's own ``ast.parse`` (formatting a failure or an xfail) fails with "SystemError: AST constructor
    recursion depth mismatch" and aborts the session.
    """
    logger = logging.getLogger("uvicorn.error")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


@contextlib.contextmanager
def serve_gateway(data_dir: Path, transport: str = "lean") -> Iterator[Served]:
    """The gateway (open auth, admin API on, 64 KiB body limit) served by uvicorn on loopback, reaching its upstream
    through ``transport`` (``[upstream] transport``)."""
    with uvicorn_error_log_off(), FakeUpstream() as upstream:
        upstream.always("POST", SUBMIT, dynamic(accept))
        settings = load_settings(
            env={
                "UNIALL_BASE_URL": upstream.url,
                "UNIALL_API_KEY": UPSTREAM_KEY,
                "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "KLING_GATEWAY_AUTH_MODE": "open",
                "KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir),
                "KLING_GATEWAY_SERVER_MAX_BODY_BYTES": str(MAX_BODY),
                "KLING_GATEWAY_SETTLER_ENABLED": "false",
                "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
                "KLING_GATEWAY_UPSTREAM_TRANSPORT": transport,
            }
        )
        logs, registry = io.StringIO(), CollectorRegistry()
        app = create_app(settings, registry=registry, log_stream=logs)
        with ServerThread(app, lifespan="on") as server:
            yield Served(server.port, upstream, logs, registry, settings)


TRANSPORTS = ["lean", "aiohttp"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One served gateway per upstream transport for the module (each test checks only what it added to the
    upstream's record): every hostile case runs on both upstream clients."""
    with serve_gateway(tmp_path_factory.mktemp("hostile"), request.param) as gateway:
        yield gateway


@pytest.fixture(params=TRANSPORTS)
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """A served gateway of the test's own, for tests that read its metrics and logs (on each upstream transport)."""
    with serve_gateway(tmp_path, request.param) as gateway:
        yield gateway


# -- raw HTTP/1.1 -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    """One response as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def code(self) -> str:
        """The gateway's error code."""
        code: str = orjson.loads(self.body)["error"]["code"]
        return code


def exchange(port: int, data: bytes | list[bytes], *, timeout_s: float = 5.0) -> bytes:
    """Write ``data`` (pieces in order, stopping if the server hangs up) and read until the server closes."""
    pieces = [data] if isinstance(data, bytes) else data
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered early and closed: read what it said
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return bytes(received)


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in ``data`` (Content-Length framed, as uvicorn frames these); strict."""
    responses = []
    rest = data
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        assert len(rest) >= length, f"truncated body: {rest[:200]!r}"
        responses.append(RawResponse(int(status_line.split(" ")[1]), headers, rest[:length]))
        rest = rest[length:]
    return responses


def request_bytes(
    method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"", *, length: bool = True
) -> bytes:
    """A well-formed HTTP/1.1 request (Host and, unless ``length`` is False, Content-Length added)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gw"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 16) -> bytes:
    """``body`` in Transfer-Encoding: chunked framing."""
    pieces = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\n\r\n"


@contextlib.contextmanager
def nothing_forwarded(upstream: FakeUpstream) -> Iterator[None]:
    """Assert that the block sends nothing to the upstream."""
    before = len(upstream.requests)
    yield
    assert upstream.requests[before:] == []


# -- request smuggling --------------------------------------------------------------------------------------------

JSON_HEAD = "POST /v1/video/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
SMUGGLE_PREFIX = (
    b"GET /gateway/keys HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n\r\n"
)
SMUGGLING: dict[str, bytes] = {
    # CL.TE: a front end honouring Content-Length and a back end honouring chunked disagree on where the body ends.
    "content-length-and-chunked": (
        f"{JSON_HEAD}Content-Length: {len(chunked(BODY))}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + chunked(BODY)
    ),
    "chunked-and-content-length": (
        f"{JSON_HEAD}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n".encode() + chunked(BODY)
    ),
    "cl-te-with-smuggled-request": (
        f"{JSON_HEAD}Content-Length: {5 + len(SMUGGLE_PREFIX)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"0\r\n\r\n"
        + SMUGGLE_PREFIX
    ),
    "duplicate-content-length-conflicting": (
        f"{JSON_HEAD}Content-Length: {len(BODY)}\r\nContent-Length: 5\r\n\r\n".encode() + BODY
    ),
    "duplicate-content-length-equal": (
        f"{JSON_HEAD}Content-Length: {len(BODY)}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    ),
    "content-length-list": f"{JSON_HEAD}Content-Length: {len(BODY)}, {len(BODY)}\r\n\r\n".encode() + BODY,
    "content-length-signed": f"{JSON_HEAD}Content-Length: +{len(BODY)}\r\n\r\n".encode() + BODY,
    "content-length-negative": f"{JSON_HEAD}Content-Length: -1\r\n\r\n".encode() + BODY,
    "content-length-hex": f"{JSON_HEAD}Content-Length: 0x{len(BODY):x}\r\n\r\n".encode() + BODY,
    "content-length-overflow": f"{JSON_HEAD}Content-Length: {10**30}\r\n\r\n".encode() + BODY,
    "content-length-space-before-colon": f"{JSON_HEAD}Content-Length : {len(BODY)}\r\n\r\n".encode() + BODY,
    "transfer-encoding-space-before-colon": (
        f"{JSON_HEAD}Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n".encode() + chunked(BODY)
    ),
    "transfer-encoding-unknown": (
        f"{JSON_HEAD}Transfer-Encoding: xchunked\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    ),
    "transfer-encoding-folded": (
        f"{JSON_HEAD}Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n".encode() + chunked(BODY)
    ),
    "chunk-size-not-hex": f"{JSON_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
    + b"zz\r\n"
    + BODY
    + b"\r\n0\r\n\r\n",
    "chunk-size-overflow": (
        f"{JSON_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode() + b"1" + b"0" * 40 + b"\r\n" + BODY + b"\r\n0\r\n\r\n"
    ),
    "chunk-size-negative": f"{JSON_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
    + b"-5\r\n"
    + BODY
    + b"\r\n0\r\n\r\n",
    "chunk-longer-than-declared": (
        f"{JSON_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode() + b"4\r\n" + BODY + b"\r\n0\r\n\r\n"
    ),
    "chunk-missing-crlf": f"{JSON_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode() + b"4\r\nabcdXX0\r\n\r\n",
}
# Shapes where the parser only notices the problem after the app has started reading the body.
MID_BODY = frozenset({"chunk-size-not-hex", "chunk-size-overflow", "chunk-longer-than-declared", "chunk-missing-crlf"})


class TestSmuggling:
    """Ambiguous framing is refused by the server, never forwarded, and never desynchronizes the connection."""

    def test_pipelining_control(self, served: Served) -> None:
        """Control: a well-framed submission and a pipelined request get two answers (the harness sees both)."""
        data = request_bytes("POST", SUBMIT, [("Content-Type", "application/json")], BODY) + FOLLOW_UP
        before = len(served.upstream.requests)
        assert [r.status for r in parse_responses(exchange(served.port, data))] == [200, 200]
        assert len(served.upstream.requests) == before + 1

    def test_chunked_control(self, served: Served) -> None:
        """Control: a well-formed chunked submission is accepted and forwarded once."""
        head = request_bytes("POST", SUBMIT, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")])
        data = head.replace(b"Content-Length: 0\r\n", b"") + chunked(BODY) + FOLLOW_UP
        before = len(served.upstream.requests)
        assert [r.status for r in parse_responses(exchange(served.port, data))] == [200, 200]
        assert orjson.loads(served.upstream.requests[before].body)["prompt"] == "a red fox in the snow"

    @pytest.mark.parametrize("shape", sorted(SMUGGLING))
    def test_refused_without_desync(self, served: Served, shape: str) -> None:
        """One 400 from the server, the connection closed, the pipelined request never answered, nothing forwarded."""
        with nothing_forwarded(served.upstream):
            responses = parse_responses(exchange(served.port, SMUGGLING[shape] + FOLLOW_UP))
        assert [r.status for r in responses] == [400]
        assert responses[0].header_values("connection") == ["close"]
        assert httpx.get(f"{served.url}/healthz").status_code == 200

    @pytest.mark.parametrize("shape", sorted(MID_BODY))
    def test_mid_body_refusal_is_not_a_gateway_error(self, fresh: Served, shape: str) -> None:
        """A request the parser refuses mid-body is not logged or counted as a gateway failure (500)."""
        parse_responses(exchange(fresh.port, SMUGGLING[shape]))
        assert_no_gateway_failure(fresh)

    def test_client_gone_mid_body_is_not_a_gateway_error(self, fresh: Served) -> None:
        """A client that promises 100 bytes, sends 10 and hangs up is not a gateway failure (500)."""
        head = request_bytes("POST", SUBMIT, [("Content-Type", "application/json")], length=False)
        with socket.create_connection(("127.0.0.1", fresh.port), timeout=5) as sock:
            sock.sendall(head.replace(b"\r\n\r\n", b"\r\nContent-Length: 100\r\n\r\n") + b'{"model": ')
            sock.shutdown(socket.SHUT_WR)
            assert_no_gateway_failure(fresh)


def assert_no_gateway_failure(gateway: Served) -> None:
    """Once the request is counted in kling_gateway_requests_total: no unhandled error logged, no 500 counted."""
    deadline = time.monotonic() + 5
    while not (statuses := submit_statuses(gateway)):
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.01)
    assert "unhandled_error" not in [e.get("event") for e in gateway.log_events()]
    assert "500" not in statuses


def submit_statuses(gateway: Served) -> dict[str, float]:
    """kling_gateway_requests_total for POST submissions, by status."""
    return {
        sample.labels["status"]: sample.value
        for metric in gateway.registry.collect()
        for sample in metric.samples
        if sample.name == "kling_gateway_requests_total"
        and sample.labels.get("route") == SUBMIT
        and sample.labels.get("method") == "POST"
        and sample.value
    }


# -- header injection ---------------------------------------------------------------------------------------------

MALFORMED_HEADERS: dict[str, bytes] = {
    "bare-cr-in-value": b"X-Note: a\rSet-Cookie: injected=1",
    "bare-lf-in-value": b"X-Note: a\nSet-Cookie: injected=1",
    "bare-lf-in-request-id": b"X-Request-ID: abc\nSet-Cookie: injected=1",
    "nul-in-value": b"X-Note: a\x00b",
    "vertical-tab-in-request-id": b"X-Request-ID: abc\x0bdef",
    "obs-fold": b"X-Note: a\r\n folded",
    "space-in-name": b"X Note: a",
    "no-colon": b"X-Note a",
}


class TestHeaderInjection:
    """CR/LF and control characters in headers; X-Request-ID is echoed only when sane."""

    @pytest.mark.parametrize("shape", sorted(MALFORMED_HEADERS))
    def test_malformed_header_refused(self, served: Served, shape: str) -> None:
        """The server refuses the request with 400 and closes; nothing is forwarded, nothing is injected."""
        data = b"POST /v1/video/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        data += MALFORMED_HEADERS[shape] + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY + FOLLOW_UP
        with nothing_forwarded(served.upstream):
            responses = parse_responses(exchange(served.port, data))
        assert [r.status for r in responses] == [400]
        assert responses[0].header_values("set-cookie") == []

    @pytest.mark.parametrize(
        "request_id",
        [
            b"abc%0d%0aSet-Cookie:%20injected=1",
            b"abc\\r\\nSet-Cookie: injected=1",
            b"caf\xc3\xa9",
            b"caf\xe9",
            b"a b",
            b"<script>",
            b"x" * 129,
            b"",
        ],
    )
    def test_insane_request_id_replaced(self, served: Served, request_id: bytes) -> None:
        """An unsafe X-Request-ID is never echoed nor sent upstream: both get one fresh, sane id instead."""
        head = b"POST /v1/video/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        data = head + b"X-Request-ID: " + request_id + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY + FOLLOW_UP
        before = len(served.upstream.requests)
        response = parse_responses(exchange(served.port, data))[0]
        assert response.status == 200
        [echoed] = response.header_values("x-request-id")
        assert echoed.encode() != request_id.strip()
        assert len(echoed) == 32 and echoed.isalnum()
        assert response.header_values("set-cookie") == []
        assert served.upstream.requests[before].header_values("x-request-id") == [echoed]

    def test_sane_request_id_kept(self, served: Served) -> None:
        """Control: a sane id of the maximum length (128) is echoed and sent upstream unchanged."""
        request_id = "a-Z0._:@/+=" + "x" * 117
        before = len(served.upstream.requests)
        headers = [("Content-Type", "application/json"), ("X-Request-ID", request_id)]
        response = parse_responses(exchange(served.port, request_bytes("POST", SUBMIT, headers, BODY) + FOLLOW_UP))[0]
        assert response.header_values("x-request-id") == [request_id]
        assert served.upstream.requests[before].header_values("x-request-id") == [request_id]


# -- oversized headers and bodies ---------------------------------------------------------------------------------

OVERSIZED_HEADERS: dict[str, list[tuple[str, str]]] = {
    "one-20-kib-header": [("X-Big", "a" * 20 * 1024)],
    "200-small-headers": [(f"X-H{i}", "v" * 100) for i in range(200)],
    "1-mib-header": [("X-Big", "a" * 1024 * 1024)],
}


class TestOversized:
    """Header blocks over 16 KiB and bodies over [server] max_body_bytes."""

    @pytest.mark.parametrize("shape", sorted(OVERSIZED_HEADERS))
    def test_header_block_over_16_kib_refused(self, served: Served, shape: str) -> None:
        """A header block over 16 KiB is refused: 431 (from the server or the gateway), or the parser's 400."""
        headers = [("Content-Type", "application/json"), ("Connection", "close"), *OVERSIZED_HEADERS[shape]]
        responses = parse_responses(exchange(served.port, request_bytes("POST", SUBMIT, headers, BODY)))
        assert [r.status for r in responses] in ([431], [400])
        if responses[0].status == 400:  # the parser's refusal, not an upstream 400 passed through by the gateway
            assert responses[0].header_values("x-request-id") == []

    @pytest.mark.parametrize("shape", sorted(OVERSIZED_HEADERS))
    def test_oversized_headers_do_not_crash(self, served: Served, shape: str) -> None:
        """Whatever the answer to a huge header block, it is not a 5xx and the server keeps serving."""
        data = request_bytes("GET", "/healthz", OVERSIZED_HEADERS[shape]) + FOLLOW_UP
        statuses = [r.status for r in parse_responses(exchange(served.port, data))]
        assert statuses and all(status < 500 for status in statuses)
        assert httpx.get(f"{served.url}/healthz").status_code == 200

    @pytest.mark.parametrize("path", [SUBMIT, VALIDATE])
    def test_declared_too_large_refused_before_the_body(self, served: Served, path: str) -> None:
        """A Content-Length over the limit gets 413 payload_too_large without the body ever being sent."""
        head = request_bytes("POST", path, [("Content-Type", "application/json")], length=False)
        head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        with nothing_forwarded(served.upstream), socket.create_connection(("127.0.0.1", served.port), 5) as sock:
            sock.sendall(head)  # and no body: the answer must not wait for it
            received = bytearray()
            while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, "closed without an answer"
                received += chunk
        [response] = parse_responses(bytes(received))
        assert (response.status, response.code()) == (413, "payload_too_large")

    @pytest.mark.parametrize("path", [SUBMIT, VALIDATE])
    def test_chunked_too_large_refused(self, served: Served, path: str) -> None:
        """A chunked body that grows past the limit is cut off with 413 payload_too_large, framing intact.

        The server may close after the 413 or read past the rest of the body; either way a pipelined request
        after it is answered as itself or not at all, never parsed out of the body's bytes.
        """
        head = request_bytes("POST", path, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")])
        head = head.replace(b"Content-Length: 0\r\n", b"")
        piece = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
        pieces = [head, *[piece] * (MAX_BODY // 8192 + 2), b"0\r\n\r\n", FOLLOW_UP]
        with nothing_forwarded(served.upstream):
            responses = parse_responses(exchange(served.port, pieces))
        assert (responses[0].status, responses[0].code()) == (413, "payload_too_large")
        assert [r.status for r in responses[1:]] in ([], [200])

    def test_exactly_the_limit_accepted(self, served: Served) -> None:
        """Control: a body of exactly max_body_bytes is read (and judged on its content)."""
        body = BODY[:-1] + b" " * (MAX_BODY - len(BODY)) + b"}"
        response = httpx.post(f"{served.url}{VALIDATE}", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        assert response.json()["valid"] is True


# -- malformed JSON -----------------------------------------------------------------------------------------------


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def with_value(raw: str) -> bytes:
    """The valid body with a raw JSON literal as the duration."""
    return b'{"model": "kling-v3-std-silent", "prompt": "a fox", "duration": ' + raw.encode() + b"}"


INVALID_JSON: dict[str, bytes] = {
    "nested-arrays-30k": nested(30_000),
    "nested-objects-2k": ('{"a":' * 2000 + "1" + "}" * 2000).encode(),
    "nested-inside-extra-body": b'{"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"x": '
    + nested(1100)
    + b"}}",
    "invalid-utf8": b'{"model": "kling-v3-std-silent", "prompt": "\xff\xfe"}',
    "latin-1": '{"model": "kling-v3-std-silent", "prompt": "café"}'.encode("latin-1"),
    "overlong-utf8": b'{"model": "kling-v3-std-silent", "prompt": "\xc0\xaf"}',
    "utf-16": BODY.decode().encode("utf-16"),
    "utf-8-bom": b"\xef\xbb\xbf" + BODY,
    "lone-surrogate-escape": b'{"model": "kling-v3-std-silent", "prompt": "\\ud800"}',
    "float-overflow": with_value("1e400"),
    "negative-float-overflow": with_value("-1e400"),
    "integer-400-digits": with_value("1" + "0" * 400),
    "cfg-scale-overflow": b'{"model": "kling-v3-std-silent", "prompt": "x", "cfg_scale": 1e309}',
    "nan": with_value("NaN"),
    "infinity": with_value("Infinity"),
    "negative-infinity": with_value("-Infinity"),
    "empty": b"",
    "whitespace": b" \r\n\t ",
    "truncated": BODY[:-1],
    "trailing-garbage": BODY + b"x",
    "two-documents": BODY + BODY,
}


class TestMalformedBodies:
    """Bodies the JSON parser refuses are 400 invalid_json; odd but parseable values get a precise code."""

    @pytest.mark.parametrize("path", [SUBMIT, VALIDATE])
    @pytest.mark.parametrize("shape", sorted(INVALID_JSON))
    def test_invalid_json(self, served: Served, shape: str, path: str) -> None:
        """400 invalid_json (param body), nothing forwarded."""
        with nothing_forwarded(served.upstream):
            response = httpx.post(
                f"{served.url}{path}", content=INVALID_JSON[shape], headers={"Content-Type": "application/json"}
            )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_json"
        assert response.json()["error"]["param"] == "body"

    @pytest.mark.parametrize(
        ("body", "param", "code"),
        [
            (with_value(str(2**64)), "duration", "invalid_type"),  # beyond 64 bits: parsed as a float
            (with_value("5.0"), "duration", "invalid_type"),
            (with_value("1e1"), "duration", "invalid_type"),
            (with_value(str(2**63)), "duration", "duration_out_of_range"),  # still a 64-bit unsigned integer
            (with_value(str(2**63 - 1)), "duration", "duration_out_of_range"),
            (with_value("-" + str(2**63)), "duration", "duration_out_of_range"),
            (with_value('"' + "9" * 10_000 + '"'), "duration", "duration_out_of_range"),
            (
                b'{"model": "kling-v3-std-silent", "prompt": "x", "cfg_scale": 1e308}',
                "cfg_scale",
                "cfg_scale_out_of_range",
            ),
            (b'{"model": "kling-v3-std-silent", "prompt": "x", "cfg_scale": 1e-400}', None, None),  # underflows to 0
            (
                b'{"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"x": ' + nested(500) + b"}}",
                "extra_body.x",
                "unknown_field",
            ),
        ],
    )
    def test_parseable_extremes(self, served: Served, body: bytes, param: str | None, code: str | None) -> None:
        """Huge, fractional and deep-but-parseable values: a validation problem naming the field, never a crash."""
        response = httpx.post(f"{served.url}{VALIDATE}", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        verdict = response.json()
        if code is None:
            assert verdict["valid"] is True
        else:
            assert {"param": param, "code": code} in [
                {"param": e["param"], "code": e["code"]} for e in verdict["errors"]
            ]

    @pytest.mark.parametrize(
        ("headers", "status", "code"),
        [
            ({"Content-Encoding": "gzip"}, 415, "unsupported_encoding"),
            ({"Content-Encoding": "identity, br"}, 415, "unsupported_encoding"),
            ({"Content-Encoding": "identity"}, 200, None),
        ],
    )
    def test_content_encodings(self, served: Served, headers: dict[str, str], status: int, code: str | None) -> None:
        """A compressed body is refused by name (415), not misread as broken JSON; identity is fine."""
        response = httpx.post(
            f"{served.url}{SUBMIT}", content=BODY, headers={"Content-Type": "application/json", **headers}
        )
        assert response.status_code == status
        if code is not None:
            assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, "content-encoding")

    def test_transfer_coding_other_than_chunked(self, served: Served) -> None:
        """``Transfer-Encoding: gzip, chunked`` frames like chunked but the body stays gzip: 415, nothing forwarded."""
        head = request_bytes(
            "POST", SUBMIT, [("Content-Type", "application/json"), ("Transfer-Encoding", "gzip, chunked")]
        )
        data = head.replace(b"Content-Length: 0\r\n", b"") + chunked(gzip.compress(BODY)) + FOLLOW_UP
        with nothing_forwarded(served.upstream):
            responses = parse_responses(exchange(served.port, data))
        assert responses[0].status == 415
        assert orjson.loads(responses[0].body)["error"]["code"] == "unsupported_encoding"

    @pytest.mark.parametrize(
        ("content_type", "status", "code"),
        [
            (None, 415, "unsupported_media_type"),
            ("text/plain", 415, "unsupported_media_type"),
            ("application/x-www-form-urlencoded", 415, "unsupported_media_type"),
            ("application/json; charset=utf-16", 400, "invalid_json"),  # declared, but the bytes are still UTF-8 JSON
        ],
    )
    def test_content_types(self, served: Served, content_type: str | None, status: int, code: str) -> None:
        """Only JSON content types are read; the charset parameter does not make non-UTF-8 JSON acceptable."""
        headers = {"Content-Type": content_type} if content_type else {}
        content = BODY.decode().encode("utf-16") if content_type and "utf-16" in content_type else BODY
        with nothing_forwarded(served.upstream):
            response = httpx.post(f"{served.url}{SUBMIT}", content=content, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)


class TestAdminInput:
    """Out-of-range admin input is a 400, not a 500."""

    @pytest.mark.parametrize("rpm", [2**63, 2**64 - 1])
    def test_huge_rpm(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, rpm: int) -> None:
        """An rpm beyond any sane limit is refused with 400 invalid_key_request."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post("/gateway/keys", json={"name": "huge", "rpm": rpm}, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_key_request")

    @pytest.mark.parametrize(
        "models", [["kling-v3-*" + "?" * 10_000], [f"kling-v3-{n}" for n in range(1_000)]], ids=["long", "many"]
    )
    def test_oversized_model_allowlist(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, models: list[str]
    ) -> None:
        """A model allowlist too long to match on every request is refused with 400 invalid_key_request."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post("/gateway/keys", json={"name": "globs", "models": models}, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_key_request")

    @pytest.mark.parametrize(
        ("method", "target"),
        [("GET", "/gateway/tasks?limit=%C2%B2"), ("POST", "/gateway/keys/someone/rotate?grace_s=%C2%B2")],
    )
    def test_unicode_digit_parameter(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, method: str, target: str
    ) -> None:
        """A superscript digit in an integer parameter is 400 invalid_parameter."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.request(method, target, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_parameter")


# -- SSRF -----------------------------------------------------------------------------------------------------------

PRIVATE, INVALID = "private_media_url", "invalid_url"
# One corpus for media and webhook URLs: (url, the media check's code).
SSRF_CORPUS: list[tuple[str, str]] = [
    # IPv4 loopback in every spelling parsers accept
    ("http://127.0.0.1/a.png", PRIVATE),
    ("http://2130706433/a.png", PRIVATE),  # decimal integer
    ("http://017700000001/a.png", PRIVATE),  # octal integer
    ("http://0x7f000001/a.png", PRIVATE),  # hex integer
    ("http://0177.0.0.1/a.png", PRIVATE),  # octal dotted
    ("http://0x7f.0x0.0x0.0x1/a.png", PRIVATE),  # hex dotted
    ("http://0x7f.1/a.png", PRIVATE),  # mixed, short
    ("http://0177.0.1/a.png", PRIVATE),  # octal, three parts
    ("http://127.1/a.png", PRIVATE),  # short form
    ("http://127.000.000.001/a.png", PRIVATE),  # zero-padded
    ("http://00000177.0.0.1/a.png", PRIVATE),
    ("http://127.0.0.1.:8080/a.png", PRIVATE),  # trailing dot and a port
    ("http://%31%32%37.0.0.1/a.png", PRIVATE),  # percent-encoded
    ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/a.png", PRIVATE),  # full-width digits and dots
    ("HTTP://127.0.0.1/a.png", PRIVATE),  # scheme case
    ("http://0/a.png", PRIVATE),  # 0.0.0.0
    ("http://0.0.0.0/a.png", PRIVATE),
    # other private, link-local (cloud metadata), CGNAT, reserved and multicast ranges
    ("http://169.254.169.254/latest/meta-data/", PRIVATE),
    ("http://2852039166/latest/meta-data/", PRIVATE),  # metadata, decimal
    ("http://0xa9fea9fe/latest/meta-data/", PRIVATE),  # metadata, hex
    ("http://0251.0376.0251.0376/", PRIVATE),  # metadata, octal
    ("http://10.0.0.1/a.png", PRIVATE),
    ("http://10.1/a.png", PRIVATE),
    ("http://172.16.0.1/a.png", PRIVATE),
    ("http://192.168.1.1/a.png", PRIVATE),
    ("http://100.64.0.1/a.png", PRIVATE),
    ("http://198.18.0.1/a.png", PRIVATE),
    ("http://224.0.0.1/a.png", PRIVATE),
    ("http://255.255.255.255/a.png", PRIVATE),
    # not addresses at all
    ("http://256.0.0.1/a.png", INVALID),
    ("http://1.2.3.4.5/a.png", INVALID),
    ("http://0x100000000/a.png", INVALID),
    ("http://127.0.0.1:99999/a.png", INVALID),
    # IPv6
    ("http://[::1]/a.png", PRIVATE),
    ("http://[::]/a.png", PRIVATE),
    ("http://[0:0:0:0:0:0:0:1]/a.png", PRIVATE),
    ("http://[::ffff:127.0.0.1]/a.png", PRIVATE),  # IPv4-mapped, dotted
    ("http://[::ffff:7f00:1]/a.png", PRIVATE),  # IPv4-mapped, hex
    ("http://[::ffff:169.254.169.254]/a.png", PRIVATE),
    ("http://[::127.0.0.1]/a.png", PRIVATE),  # IPv4-compatible
    ("http://[64:ff9b::7f00:1]/a.png", PRIVATE),  # NAT64 of 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/a.png", PRIVATE),  # NAT64 of the metadata address
    ("http://[2002:7f00:1::]/a.png", PRIVATE),  # 6to4 of 127.0.0.1
    ("http://[fe80::1%25eth0]/a.png", PRIVATE),  # link-local with a zone id
    ("http://[fe80::1]/a.png", PRIVATE),
    ("http://[fc00::1]/a.png", PRIVATE),  # unique local fc00::/7
    ("http://[fd12:3456:789a::1]/a.png", PRIVATE),
    ("http://[ff02::1]/a.png", PRIVATE),  # multicast
    ("http://[2001:db8::1]/a.png", PRIVATE),  # documentation
    ("http://[::1/a.png", INVALID),
    ("http://[not-an-address]/a.png", INVALID),
    # userinfo tricks
    ("http://example.com@127.0.0.1/a.png", PRIVATE),
    ("http://example.com:80@169.254.169.254/", PRIVATE),
    ("http://127.0.0.1#@example.com/a.png", PRIVATE),
    ("http://user:pass@example.com/a.png", PRIVATE),  # credentials at all
    ("http://127.0.0.1%23@example.com/a.png", PRIVATE),
    ("http://127.0.0.1\\@example.com/a.png", INVALID),  # backslash: parsers disagree
    ("http://example.com\t@127.0.0.1/a.png", INVALID),  # tab: dropped by some parsers
    ("http://example.com /a.png", INVALID),
    # local and internal names
    ("http://localhost/a.png", PRIVATE),
    ("http://LOCALHOST./a.png", PRIVATE),
    ("http://app.localhost/a.png", PRIVATE),
    ("http://printer.local/a.png", PRIVATE),
    ("http://metadata.google.internal/computeMetadata/v1/", PRIVATE),
    ("http://intranet/a.png", PRIVATE),  # single label
    ("http://router.home.arpa/a.png", PRIVATE),
    # other schemes
    ("file:///etc/passwd", INVALID),
    ("gopher://127.0.0.1:6379/_FLUSHALL", INVALID),
    ("ftp://example.com/a.png", INVALID),
    ("data:image/png;base64,iVBORw0KGgo=", INVALID),
    ("javascript:alert(1)", INVALID),
    ("dict://127.0.0.1:11211/stats", INVALID),
    ("//127.0.0.1/a.png", INVALID),  # scheme-relative
    ("/a.png", INVALID),
]
# Names that resolve only to private addresses: (name, its addresses); media code is private_media_url.
PRIVATE_NAMES: dict[str, list[str]] = {
    "internal.example.com": ["10.0.0.5"],
    "rebind.example.net": ["127.0.0.1"],
    "metadata.example.org": ["169.254.169.254"],
    "v6-loopback.example.com": ["::1"],
    "v6-mapped.example.com": ["::ffff:127.0.0.1"],
    "mixed-private.example.com": ["192.168.0.7", "fd00::7"],
}
PUBLIC_NAMES: dict[str, list[str]] = {
    "cdn.example.com": ["93.184.216.34"],
    "partly-public.example.com": ["10.0.0.1", "93.184.216.34"],  # "only" private addresses are refused
}
MEDIA_BODY = {"model": "kling-v3-std-silent", "prompt": "a red fox in the snow"}


def media_errors(gw: Any, url: str) -> list[dict[str, str]]:
    """The problems /gateway/validate finds in ``image``."""
    response = gw.client.post(VALIDATE, json={**MEDIA_BODY, "image": url})
    assert response.status_code == 200
    return [{"param": e["param"], "code": e["code"]} for e in response.json()["errors"]]


class FakeResolver:
    """Answers from a table; unknown names fail as the system resolver would."""

    def __init__(self, answers: Mapping[str, list[str]]) -> None:
        self.answers = dict(answers)

    async def __call__(self, host: str) -> list[str]:
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


class TestSsrfCorpus:
    """Every spelling of a private destination is refused for media and for webhooks."""

    @pytest.mark.parametrize(("url", "code"), SSRF_CORPUS)
    def test_media_url_refused(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, url: str, code: str
    ) -> None:
        """/gateway/validate names image with the exact code, and a submission is 400 and never forwarded."""
        gw = make_gateway(fake_upstream.url)
        assert media_errors(gw, url) == [{"param": "image", "code": code}]
        response = gw.client.post(SUBMIT, json={**MEDIA_BODY, "image": url})
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_request")
        assert response.json()["error"]["errors"][0]["code"] == code
        assert fake_upstream.requests == []

    @pytest.mark.parametrize(("url", "code"), SSRF_CORPUS)
    def test_webhook_url_refused(self, url: str, code: str) -> None:
        """check_webhook_url gives a reason for every corpus URL."""
        assert check_webhook_url(url) is not None

    @pytest.mark.parametrize(("url", "code"), SSRF_CORPUS[::7])
    def test_webhook_url_refused_by_admin_api(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, url: str, code: str
    ) -> None:
        """A key cannot be created with such a webhook URL: 400 invalid_key_request (a sample of the corpus)."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post("/gateway/keys", json={"name": "hooked", "webhook_url": url}, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_key_request")

    @pytest.mark.parametrize(
        "url",
        [
            "https://cdn.example.com/a.png",
            "http://93.184.216.34/a.png",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/a.png",
        ],
    )
    def test_public_controls_pass(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, url: str) -> None:
        """Control: public names and addresses pass both checks."""
        assert media_errors(make_gateway(fake_upstream.url), url) == []
        assert check_webhook_url(url) is None


class TestNamesResolvingPrivately:
    """Names whose every address is private (DNS half of the rule), with an injected resolver."""

    @pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
    def test_media_refused(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, name: str) -> None:
        """With media host resolution on, image on such a name is private_media_url."""
        gw = make_gateway(
            fake_upstream.url,
            env={"KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "true"},
            resolver=FakeResolver({**PRIVATE_NAMES, **PUBLIC_NAMES}),
        )
        assert media_errors(gw, f"https://{name}/a.png") == [{"param": "image", "code": PRIVATE}]

    @pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
    def test_media_public_names_pass(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, name: str
    ) -> None:
        """Control: a name with any public address passes."""
        gw = make_gateway(
            fake_upstream.url,
            env={"KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "true"},
            resolver=FakeResolver({**PRIVATE_NAMES, **PUBLIC_NAMES}),
        )
        assert media_errors(gw, f"https://{name}/a.png") == []

    @pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
    async def test_webhook_attempt_refuses(self, name: str) -> None:
        """Every webhook attempt resolves the callback host and refuses such a name before any request."""
        with pytest.raises(TargetRefused, match="private"):
            await pin(f"https://{name}/hook", FakeResolver(PRIVATE_NAMES), timeout_s=1.0)


WEBHOOK_SECRET = "whsec_" + "aG9zdGlsZS10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5"  # base64 of 30 bytes


@dataclass
class HookRecorder:
    """Webhook deliveries the gateway attempted."""

    urls: list[str]

    def transport(self) -> HookRecorder:
        return self

    async def post(self, target: Target, headers: list[tuple[str, str]], body: bytes) -> int:
        """The webhook transport's one call: record where the attempt would have gone."""
        self.urls.append(target.url)
        return 200

    async def aclose(self) -> None:
        pass


def run_to_terminal(
    fake_upstream: FakeUpstream, make_gateway: GatewayFactory, host: str, recorder: HookRecorder
) -> Callable[[], list[dict[str, Any]]]:
    """A key with a webhook on ``host``, one task polled to completion; returns the gateway's log reader."""
    fake_upstream.script("POST", SUBMIT, json(200, {"id": "task_hook", "status": "queued"}))
    fake_upstream.always("GET", "/v1/videos/task_hook", json(200, {"id": "task_hook", "status": "completed"}))
    gw = make_gateway(
        fake_upstream.url,
        env={
            "KLING_GATEWAY_AUTH_MODE": "keys",
            "KLING_GATEWAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "true",
        },
        resolver=FakeResolver({**PRIVATE_NAMES, **PUBLIC_NAMES}),
        webhook_transport=recorder.transport(),
    )
    secret = gw.create_key("hooked", webhook_url=f"https://{host}/kling-hook")
    submitted = gw.client.post(SUBMIT, content=BODY, headers={**gw.as_key(secret), "Content-Type": "application/json"})
    assert submitted.status_code == 200, submitted.text
    assert gw.client.get("/v1/videos/task_hook", headers=gw.as_key(secret)).json()["status"] == "completed"
    return gw.log_lines


def wait_for_webhook_outcome(recorder: HookRecorder, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """Until a delivery was attempted or refused (5 s at most)."""
    deadline = time.monotonic() + 5
    while not recorder.urls and not any(e.get("event") == "webhook_refused" for e in log_lines()):
        assert time.monotonic() < deadline, "the webhook was neither delivered nor refused"
        time.sleep(0.01)


class TestWebhookDestinations:
    """The gateway's own webhook deliveries, end to end."""

    def test_public_name_delivered(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Control: a webhook on a publicly resolving name is delivered when the task completes."""
        recorder = HookRecorder([])
        wait_for_webhook_outcome(recorder, run_to_terminal(fake_upstream, make_gateway, "cdn.example.com", recorder))
        assert recorder.urls == ["https://cdn.example.com/kling-hook"]

    def test_name_resolving_privately_not_delivered(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A webhook on a name that resolves only to private addresses is refused at delivery, never sent."""
        recorder = HookRecorder([])
        wait_for_webhook_outcome(
            recorder, run_to_terminal(fake_upstream, make_gateway, "internal.example.com", recorder)
        )
        assert recorder.urls == []
