"""End to end through a real loopback upstream: forwarding, header hygiene, error mapping, body limits, ids."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.harness import GatewayFactory
from support.upstream_fake import FakeUpstream, fresh_task, garbage, hang, invalid_json, json, refuse, reset, truncate

SUBMIT = "/v1/video/generations"
TEXT_BODY: dict[str, Any] = {
    "model": "kling-v3-std-silent",
    "prompt": "A wide cinematic shot of a traveler walking through dusty desert ruins.",
    "aspect_ratio": "16:9",
    "duration": 5,
    "extra_body": {"cfg_scale": 0.5, "shot_type": "customize", "negative_prompt": "blur, low detail"},
}
ACCEPTED = {"id": "task_1", "task_id": "task_1", "object": "video.generation.job", "status": "queued", "progress": 0}
UPSTREAM_KEY = "sk-test-upstream"


class TestForwarding:
    def test_key_injected_and_client_headers_cleaned(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The upstream sees the team key, its own Host, and only the client headers it needs (no credentials,
        cookies, hop-by-hop or made-up headers)."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post(
            SUBMIT,
            json=TEXT_BODY,
            headers={
                "Authorization": "Bearer gk_client_secret_value",
                "Connection": "keep-alive, X-Private-Hop",
                "X-Private-Hop": "secret",
                "Proxy-Authorization": "Basic abc",
                "Cookie": "session=1",
                "X-Client-Trace": "keep-me",
            },
        )
        assert response.status_code == 200
        (seen,) = fake_upstream.requests_to("POST", SUBMIT)
        assert seen.header_values("authorization") == [f"Bearer {UPSTREAM_KEY}"]
        assert seen.header("host") == f"127.0.0.1:{fake_upstream.port}"
        for name in ("x-private-hop", "proxy-authorization", "cookie", "x-client-trace"):
            assert seen.header(name) is None, name
        assert seen.header("content-type") == "application/json"
        assert seen.json() == TEXT_BODY

    def test_upstream_answer_passed_through_unchanged(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Status and body bytes of the upstream reach the client unchanged, with the allowlisted headers."""
        body = {**ACCEPTED, "extra": {"nested": [1, 2.5, "x"]}}
        headers = {"X-Upstream-Trace": "u-1", "X-RateLimit-Remaining": "41"}
        fake_upstream.script("POST", SUBMIT, json(200, body, headers=headers))
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post(SUBMIT, json=TEXT_BODY)
        assert response.json() == body
        assert response.headers["x-ratelimit-remaining"] == "41"
        assert "x-upstream-trace" not in response.headers

    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (400, {"error": {"message": "bad prompt", "code": "upstream_says_no"}}),
            (429, {"error": {"message": "slow down", "code": "rate_limit"}}),
            (503, {"error": {"message": "maintenance", "code": "unavailable"}}),
        ],
    )
    def test_upstream_errors_passed_through(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, status: int, error: dict[str, Any]
    ) -> None:
        """Upstream 4xx/5xx answers keep their status and body."""
        fake_upstream.script("POST", SUBMIT, json(status, error, headers={"Retry-After": "7"}))
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post(SUBMIT, json=TEXT_BODY)
        assert (response.status_code, response.json()) == (status, error)
        assert response.headers["retry-after"] == "7"

    def test_status_poll_forwarded(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A status poll goes to /v1/videos/{id} with the team key and comes back with X-Cache."""
        status = {**ACCEPTED, "status": "in_progress", "progress": 40}
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        fake_upstream.script("GET", "/v1/videos/task_1", json(200, status))
        gw = make_gateway(fake_upstream.url)
        assert gw.client.post(SUBMIT, json=TEXT_BODY).status_code == 200
        response = gw.client.get("/v1/videos/task_1")
        assert (response.status_code, response.json()) == (200, status)
        assert response.headers["x-cache"] in ("MISS", "HIT", "STALE")
        assert fake_upstream.requests_to("GET", "/v1/videos/task_1")[0].header("authorization") == (
            f"Bearer {UPSTREAM_KEY}"
        )

    @pytest.mark.parametrize("task_id", ["..", "a b", "x" * 300, "%2e%2e"])
    def test_odd_task_ids_never_forwarded(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, task_id: str
    ) -> None:
        """Task ids outside a safe alphabet are 404 without an upstream call."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.get(f"/v1/videos/{task_id}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] in ("task_not_found", "not_found")
        assert fake_upstream.requests == []


class TestPassthrough:
    def test_other_paths_404_by_default(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """With [proxy] passthrough off, other /v1 paths are 404 and never forwarded."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.get("/v1/models")
        assert (response.status_code, response.json()["error"]["code"]) == (404, "not_found")
        assert fake_upstream.requests == []

    def test_other_paths_forwarded_when_enabled(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """With passthrough on, method, path, query and body go upstream with the team key."""
        fake_upstream.script("POST", "/v1/images/generations", json(201, {"ok": True}))
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_PROXY_PASSTHROUGH": "true"})
        response = gw.client.post(
            "/v1/images/generations?x=1", content=b'{"a": 1}', headers={"Content-Type": "application/json"}
        )
        assert (response.status_code, response.json()) == (201, {"ok": True})
        (seen,) = fake_upstream.requests_to("POST", "/v1/images/generations")
        assert (seen.query, seen.body, seen.header("authorization")) == ("x=1", b'{"a": 1}', f"Bearer {UPSTREAM_KEY}")

    def test_passthrough_refuses_a_transfer_coding_it_would_not_undo(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Transfer codings are hop-by-hop: gzip-coded bytes forwarded without the header would be corrupt."""
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_PROXY_PASSTHROUGH": "true"})
        response = gw.client.post(
            "/v1/images/generations",
            content=b"\x1f\x8b...",
            headers={"Content-Type": "application/json", "Transfer-Encoding": "gzip, chunked"},
        )
        assert (response.status_code, response.json()["error"]["code"]) == (415, "unsupported_encoding")
        assert fake_upstream.requests == []

    @pytest.mark.parametrize("path", ["/v1/%2e%2e/admin", "/v1/x/%2E%2E/%2e%2e/admin", "/v1/a%2F..%2F..%2Fb"])
    def test_dot_segments_never_forwarded(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, path: str
    ) -> None:
        """A passthrough path with (escaped) dot segments is 400 ``invalid_path`` and the team key goes nowhere."""
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_PROXY_PASSTHROUGH": "true"})
        response = gw.client.get(path)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_path")
        assert fake_upstream.requests == []

    def test_task_scoped_paths_keep_tenancy(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """/v1/videos/{id}/... through passthrough needs the task to be the caller's."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        fake_upstream.always("GET", "/v1/videos/task_1/remix", json(200, {"url": "u"}))
        gw = make_gateway(
            fake_upstream.url, env={"KLING_GATEWAY_PROXY_PASSTHROUGH": "true", "KLING_GATEWAY_AUTH_MODE": "keys"}
        )
        owner, other = gw.create_key("team-a"), gw.create_key("team-b")
        assert gw.client.post(SUBMIT, json=TEXT_BODY, headers=gw.as_key(owner)).status_code == 200
        assert gw.client.get("/v1/videos/task_1/remix", headers=gw.as_key(other)).status_code == 404
        assert fake_upstream.calls("GET", "/v1/videos/task_1/remix") == 0
        assert gw.client.get("/v1/videos/task_1/remix", headers=gw.as_key(owner)).status_code == 200


class TestUpstreamFailures:
    @pytest.mark.parametrize(
        ("behaviour", "status", "code", "kind"),
        [
            (reset(), 502, "upstream_unavailable", "invalid_response"),
            (refuse(), 502, "upstream_unavailable", "invalid_response"),
            (garbage(), 502, "upstream_unavailable", "invalid_response"),
            (
                truncate(200, b'{"id": "task_1", "status": "queued"}', 10),
                502,
                "upstream_unavailable",
                "invalid_response",
            ),
            (invalid_json(200), 502, "upstream_unavailable", "invalid_response"),
            (json(200, ["not", "an", "object"]), 502, "upstream_unavailable", "invalid_response"),
        ],
    )
    def test_broken_answers_are_502(
        self,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        behaviour: Any,
        status: int,
        code: str,
        kind: str,
    ) -> None:
        """A reset, refused, garbage, truncated or unusable answer is a clean 502, never a partial 200."""
        fake_upstream.script("POST", SUBMIT, behaviour)
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post(SUBMIT, json=TEXT_BODY)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        assert gw.metric("kling_gateway_upstream_errors_total", {"kind": kind}) == 1
        assert fake_upstream.calls("POST", SUBMIT) == 1

    def test_hang_is_504(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """An upstream that never answers is 504 upstream_timeout within the configured bound."""
        fake_upstream.script("POST", SUBMIT, hang())
        gw = make_gateway(
            fake_upstream.url,
            env={"KLING_GATEWAY_UPSTREAM_TIMEOUT_S": "0.3", "KLING_GATEWAY_UPSTREAM_READ_TIMEOUT_S": "0.3"},
        )
        started = time.monotonic()
        response = gw.client.post(SUBMIT, json=TEXT_BODY)
        assert (response.status_code, response.json()["error"]["code"]) == (504, "upstream_timeout")
        assert time.monotonic() - started < 2.0
        assert gw.metric("kling_gateway_upstream_errors_total", {"kind": "timeout"}) == 1

    def test_unreachable_is_502(self, make_gateway: GatewayFactory) -> None:
        """Nothing listening upstream: 502 upstream_unavailable, counted as a connect error."""
        gw = make_gateway(FakeUpstream.closed_port())
        response = gw.client.post(SUBMIT, json=TEXT_BODY)
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_unavailable")
        assert gw.metric("kling_gateway_upstream_errors_total", {"kind": "connect"}) == 1

    def test_failed_poll_without_cache_still_says_x_cache(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A status poll that fails upstream with nothing cached is 502 and still carries X-Cache: MISS."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        fake_upstream.script("GET", "/v1/videos/task_1", reset(), reset(), reset())
        gw = make_gateway(fake_upstream.url)
        assert gw.client.post(SUBMIT, json=TEXT_BODY).status_code == 200
        response = gw.client.get("/v1/videos/task_1")
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_unavailable")
        assert response.headers["x-cache"] == "MISS"

    def test_pool_healthy_after_failures(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """After a burst of resets and garbage, healthy requests succeed on the same small pool."""
        fake_upstream.script("POST", SUBMIT, reset(), garbage(), reset(), default=fresh_task())
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_UPSTREAM_MAX_CONNECTIONS": "1"})
        statuses = [gw.client.post(SUBMIT, json=TEXT_BODY).status_code for _ in range(6)]
        assert statuses == [502, 502, 502, 200, 200, 200]


class TestBodies:
    def test_declared_length_over_limit_is_413(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A Content-Length over max_body_bytes is refused before the body is read."""
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_SERVER_MAX_BODY_BYTES": "2048"})
        response = gw.client.post(
            SUBMIT, content=b"{" + b" " * 4000 + b"}", headers={"Content-Type": "application/json"}
        )
        assert (response.status_code, response.json()["error"]["code"]) == (413, "payload_too_large")
        assert fake_upstream.requests == []

    def test_streamed_body_over_limit_is_413(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A chunked body with no Content-Length is cut off at the limit."""
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_SERVER_MAX_BODY_BYTES": "2048"})

        def chunks() -> Any:
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        response = gw.client.post(SUBMIT, content=chunks(), headers={"Content-Type": "application/json"})
        assert (response.status_code, response.json()["error"]["code"]) == (413, "payload_too_large")
        assert fake_upstream.requests == []

    @pytest.mark.parametrize(
        ("content_type", "body", "status", "code"),
        [
            ("text/plain", b"{}", 415, "unsupported_media_type"),
            ("application/x-www-form-urlencoded", b"model=x", 415, "unsupported_media_type"),
            (None, b"{}", 415, "unsupported_media_type"),
            ("application/json", b"{not json", 400, "invalid_json"),
            ("application/json", b"", 400, "invalid_json"),
            ("application/json", b"\xff\xfe{}", 400, "invalid_json"),
            ("application/json", b"[1, 2]", 400, "invalid_body"),
            ("application/json", b'"text"', 400, "invalid_body"),
            ("application/json", b"[" * 5000 + b"]" * 5000, 400, "invalid_json"),
            ("application/json", b'{"duration": 1' + b"0" * 400 + b"}", 400, "invalid_json"),
        ],
    )
    def test_unreadable_bodies(
        self,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        content_type: str | None,
        body: bytes,
        status: int,
        code: str,
    ) -> None:
        """Non-JSON content types are 415; unparsable or non-object JSON is 400; nothing is forwarded."""
        gw = make_gateway(fake_upstream.url)
        headers = {"Content-Type": content_type} if content_type else {}
        response = gw.client.post(SUBMIT, content=body, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert fake_upstream.requests == []

    def test_charset_parameter_accepted(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """application/json; charset=utf-8 is JSON."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post(
            SUBMIT, content=orjson_dumps(TEXT_BODY), headers={"Content-Type": "application/json; charset=utf-8"}
        )
        assert response.status_code == 200


class TestValidationAtTheEdge:
    def test_invalid_body_lists_every_problem_and_reaches_nobody(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """One 400 names every problem with its param and code; the upstream sees nothing."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.post(
            SUBMIT, json={"model": "kling-v3-std", "duration": 20, "extra_body": {"shot_type": "custom"}, "sead": 1}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
        assert error["message"].startswith("5 problems:")
        assert {(e["param"], e["code"]) for e in error["errors"]} == {
            ("model", "unknown_model"),
            ("prompt", "missing_field"),
            ("duration", "duration_out_of_range"),
            ("extra_body.shot_type", "invalid_enum"),
            ("sead", "unknown_field"),
        }
        assert "did you mean 'customize'?" in next(e for e in error["errors"] if e["code"] == "invalid_enum")["message"]
        assert fake_upstream.requests == []
        assert gw.metric("kling_gateway_validation_problems_total", {"code": "duration_out_of_range"}) == 1
        # One refused request: counted once by its top-level code, not again under each problem.
        assert gw.metric("kling_gateway_rejections_total", {"code": "invalid_request"}) == 1
        assert gw.metric("kling_gateway_rejections_total", {"code": "duration_out_of_range"}) == 0
        access = [line for line in gw.log_lines() if line.get("route") == SUBMIT]
        assert [(line["status"], line["code"]) for line in access] == [(400, "invalid_request")]

    def test_flattened_sdk_form_forwarded_inside_extra_body(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """OpenAI-SDK flattened fields are moved into extra_body before forwarding."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(fake_upstream.url)
        body = {"model": "kling-v3-std-audio", "prompt": "p", "cfg_scale": 0.4, "shot_type": "intelligence"}
        assert gw.client.post(SUBMIT, json=body).status_code == 200
        (seen,) = fake_upstream.requests_to("POST", SUBMIT)
        assert seen.json() == {
            "model": "kling-v3-std-audio",
            "prompt": "p",
            "extra_body": {"cfg_scale": 0.4, "shot_type": "intelligent"},
        }

    def test_image_mode_aspect_ratio_warning_header(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """An aspect ratio in image mode is forwarded with an X-Gateway-Warning header."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(fake_upstream.url)
        body = {
            "model": "kling-v3-pro-audio",
            "prompt": "p",
            "image": "https://example.com/a.png",
            "aspect_ratio": "1:1",
        }
        response = gw.client.post(SUBMIT, json=body)
        assert response.status_code == 200
        assert response.headers["x-gateway-warning"].startswith("aspect_ratio_not_guaranteed:")

    def test_private_media_rejected(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A loopback image URL is 400 private_media_url and never forwarded."""
        gw = make_gateway(fake_upstream.url)
        body = {"model": "kling-v3-pro-audio", "prompt": "p", "image": "http://0x7f000001/x.png"}
        response = gw.client.post(SUBMIT, json=body)
        assert response.status_code == 400
        assert response.json()["error"]["errors"][0]["code"] == "private_media_url"
        assert fake_upstream.requests == []

    def test_names_resolving_to_private_addresses_rejected(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """With host resolution on, a name that resolves only to private addresses is rejected."""

        async def resolver(host: str) -> list[str]:
            return {"internal.example.com": ["10.0.0.7"], "cdn.example.com": ["93.184.216.34"]}[host]

        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(
            fake_upstream.url, env={"KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "true"}, resolver=resolver
        )
        bad = {"model": "kling-v3-pro-silent", "prompt": "p", "image": "https://internal.example.com/a.png"}
        good = {**bad, "image": "https://cdn.example.com/a.png"}
        response = gw.client.post(SUBMIT, json=bad)
        assert (response.status_code, response.json()["error"]["errors"][0]["code"]) == (400, "private_media_url")
        assert gw.client.post(SUBMIT, json=good).status_code == 200
        assert fake_upstream.calls("POST", SUBMIT) == 1

    def test_validate_endpoint_never_forwards(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """POST /gateway/validate answers valid, errors, warnings, normalized, estimate; never forwards."""
        gw = make_gateway(fake_upstream.url)
        answer = gw.client.post("/gateway/validate", json=TEXT_BODY).json()
        assert answer["valid"] is True and answer["errors"] == [] and answer["normalized"] == TEXT_BODY
        assert answer["estimate"]["seconds"] == 5 and answer["estimate"]["usd"] == "0.4200"
        invalid = gw.client.post(
            "/gateway/validate", json={"model": "kling-v3-std-silent", "prompt": "p", "duration": 2}
        )
        assert invalid.status_code == 200
        assert invalid.json()["valid"] is False
        assert invalid.json()["errors"][0]["code"] == "duration_out_of_range"
        assert fake_upstream.requests == []


class TestRequestIds:
    def test_sane_client_request_id_echoed(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A sane X-Request-ID is echoed, sent upstream and put in error bodies."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(fake_upstream.url)
        ok = gw.client.post(SUBMIT, json=TEXT_BODY, headers={"X-Request-ID": "client-req-42"})
        assert ok.headers["x-request-id"] == "client-req-42"
        assert fake_upstream.requests[0].header("x-request-id") == "client-req-42"
        bad = gw.client.post(SUBMIT, json={}, headers={"X-Request-ID": "client-req-43"})
        assert bad.json()["error"]["request_id"] == "client-req-43"

    @pytest.mark.parametrize("given", ["", "x" * 200, "a b", "<script>", "é"])
    def test_insane_request_id_replaced(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, given: str
    ) -> None:
        """An empty, long or odd X-Request-ID is replaced by a generated one."""
        gw = make_gateway(fake_upstream.url)
        response = gw.client.get("/healthz", headers={"X-Request-ID": given.encode("utf-8")})  # type: ignore[dict-item]
        assert response.headers["x-request-id"] != given and len(response.headers["x-request-id"]) == 32

    def test_every_response_has_one(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """404s, 405s and health checks carry X-Request-ID too, and errors are JSON."""
        gw = make_gateway(fake_upstream.url)
        for response in (gw.client.get("/nope"), gw.client.delete("/healthz"), gw.client.get("/healthz")):
            assert response.headers["x-request-id"]
        assert gw.client.get("/nope").json()["error"]["code"] == "not_found"
        assert gw.client.delete("/healthz").json()["error"]["code"] == "method_not_allowed"


class TestAccessLog:
    def test_one_line_per_request(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Each request writes one JSON line with request id, route, model, status and durations."""
        fake_upstream.script("POST", SUBMIT, json(200, ACCEPTED))
        gw = make_gateway(fake_upstream.url)
        gw.client.post(SUBMIT, json=TEXT_BODY, headers={"X-Request-ID": "rid-log"})
        (line,) = [entry for entry in gw.log_lines() if entry.get("event") == "request"]
        assert line["request_id"] == "rid-log" and line["route"] == SUBMIT and line["status"] == 200
        assert line["model"] == "kling-v3-std-silent" and line["mode"] == "text"
        assert line["duration_ms"] >= 0 and line["upstream_ms"] >= 0


class TestHealth:
    def test_healthz_and_readyz(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """/healthz and /readyz answer without a key."""
        gw = make_gateway(fake_upstream.url)
        assert gw.client.get("/healthz").json() == {"status": "ok"}
        assert gw.client.get("/readyz").status_code == 200


def orjson_dumps(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)
