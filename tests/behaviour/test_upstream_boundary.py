"""The upstream boundary under a hostile scripted upstream: what it answers must not bill, leak, move or steer.

Each class is one kind of attack from the upstream's side (or through it): unbounded reported seconds, a task id
handed out twice, the team key echoed back, response headers the client must not get, and pass-through paths
spelled to slip past the ownership check. Everything that talks to the upstream runs on both upstream transports
(``[upstream] transport``: the lean client and aiohttp).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from support.harness import ADMIN, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, RecordedRequest, dynamic, fresh_task, json, redirect, text

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}
UPSTREAM_KEY = "sk-boundary-upstream-0123456789"
TRANSPORTS = ["lean", "aiohttp"]
KEYS_MODE = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0"}


def gateway(make_gateway: GatewayFactory, fake: FakeUpstream, transport: str, **env: str) -> GatewayHarness:
    return make_gateway(
        fake.url,
        upstream_key=UPSTREAM_KEY,
        env={"KLING_GATEWAY_UPSTREAM_TRANSPORT": transport, "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0", **env},
    )


def events(gw: GatewayHarness, name: str) -> list[dict[str, Any]]:
    return [line for line in gw.log_lines() if line.get("event") == name]


# -- 1. reported seconds drive billing only within bounds ---------------------------------------------------------

# completed body extras -> (settled seconds, anomaly reason or None); requested 5 s of std-silent at $0.084/s
COMPLETIONS: dict[str, tuple[dict[str, Any] | bytes, str, str | None]] = {
    "reported within the request": ({"seconds": 4}, "4", None),
    "reported as a plain decimal string": ({"seconds": "4.5"}, "4.5", None),
    "huge integer": ({"seconds": 10**30}, "5", "above_requested"),
    "largest double": ({"seconds": 1.7976931348623157e308}, "5", "above_requested"),
    "huge under usage": ({"usage": {"output_seconds": 10**18}, "seconds": 4}, "5", "above_requested"),
    "string with separators": ({"seconds": "1_000"}, "5", "not_a_number"),
    "string with an exponent": ({"seconds": "1e999999"}, "5", "not_a_number"),
    "string of 400 digits": ({"seconds": "9" * 400}, "5", "not_a_number"),
    "NaN string": ({"seconds": "NaN"}, "5", "not_a_number"),
    "boolean": ({"seconds": True}, "5", "not_a_number"),
    "object": ({"seconds": {"value": 3}}, "5", "not_a_number"),
    "negative": ({"seconds": -3}, "5", "below_minimum"),
    "zero": ({"seconds": 0}, "5", "below_minimum"),
    "huge progress too": ({"seconds": 3, "progress": 10**30}, "3", None),
}


class TestReportedSeconds:
    @pytest.mark.parametrize("transport", TRANSPORTS)
    @pytest.mark.parametrize("case", list(COMPLETIONS))
    def test_settles_once_within_bounds(
        self, case: str, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Whatever the upstream reports, the task settles exactly once at a bounded amount; anomalies are counted
        and logged once per task, however often it is polled."""
        extra, seconds, reason = COMPLETIONS[case]
        fake_upstream.script("POST", SUBMIT, json(200, {"id": "t_1", "task_id": "t_1", "status": "queued"}))
        completed = {"id": "t_1", "task_id": "t_1", "status": "completed", "progress": 100, **extra}  # type: ignore[dict-item]
        fake_upstream.always("GET", "/v1/videos/t_1", json(200, completed))
        gw = gateway(make_gateway, fake_upstream, transport)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        for _ in range(3):
            assert gw.client.get("/v1/videos/t_1").status_code == 200
        (task,) = gw.client.get("/gateway/tasks").json()["data"]
        usd = Decimal("0.084") * Decimal(seconds)
        assert task["settled"]["seconds"] == seconds
        assert Decimal(task["settled"]["usd"]) == usd.quantize(Decimal("0.0001"))
        assert (
            gw.metric(
                "kling_gateway_tasks_settled_total", {"model": BODY["model"], "outcome": "completed", "key": "open"}
            )
            == 1
        )
        anomalies = events(gw, "settlement_anomaly")
        if reason is None:
            assert anomalies == []
        else:
            assert gw.metric("kling_gateway_settlement_anomalies_total", {"reason": reason}) == 1
            assert [(e["task_id"], e["reason"]) for e in anomalies] == [("t_1", reason)]


# -- 2. a task id handed out twice; client headers --------------------------------------------------------------


class TestDuplicateTaskId:
    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_second_submission_refused_and_owner_keeps_the_task(
        self, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The upstream answers two keys' submissions with one id: the second gets 502, its intent stays as outcome
        unknown, the first key keeps her task (memory and store agree), the second key cannot see it."""
        accepted = json(200, {"id": "dup_1", "task_id": "dup_1", "status": "queued"})
        fake_upstream.script("POST", SUBMIT, accepted, accepted)
        fake_upstream.always("GET", "/v1/videos/dup_1", json(200, {"id": "dup_1", "status": "in_progress"}))
        gw = gateway(make_gateway, fake_upstream, transport, **KEYS_MODE)
        alice, mallory = gw.as_key(gw.create_key("alice")), gw.as_key(gw.create_key("mallory"))
        assert gw.client.post(SUBMIT, json=BODY, headers=alice).status_code == 200
        second = gw.client.post(SUBMIT, json=BODY, headers=mallory)
        assert (second.status_code, second.json()["error"]["code"]) == (502, "upstream_unavailable")
        assert gw.client.get("/v1/videos/dup_1", headers=alice).status_code == 200
        denied = gw.client.get("/v1/videos/dup_1", headers=mallory)
        assert (denied.status_code, denied.json()["error"]["code"]) == (404, "task_not_found")
        (row,) = gw.client.get("/gateway/tasks", headers=ADMIN).json()["data"]
        assert (row["task_id"], row["key"]) == ("dup_1", "alice")
        (unknown,) = gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"]
        assert unknown["key"] == "mallory"
        (logged,) = events(gw, "upstream_task_id_reused")
        assert (logged["level"], logged["task_id"], logged["same_key"]) == ("error", "dup_1", False)
        assert (
            gw.metric(
                "kling_gateway_generations_total",
                {"model": BODY["model"], "tier": "std", "audio": "false", "mode": "text", "key": "mallory"},
            )
            == 0
        )

    def test_id_recorded_by_another_process_is_refused(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The first owner's task is in the shared store but not in this process's memory: the task insert itself
        finds it, so the second submission still gets 502 and its intent stays as outcome unknown."""
        accepted = json(200, {"id": "dup_3", "task_id": "dup_3", "status": "queued"})
        fake_upstream.script("POST", SUBMIT, accepted, accepted)
        first = gateway(make_gateway, fake_upstream, "lean", **KEYS_MODE)
        second = gateway(make_gateway, fake_upstream, "lean", **KEYS_MODE)  # same data dir: one SQLite ledger
        alice = first.as_key(first.create_key("alice"))
        mallory = second.as_key(second.create_key("mallory"))
        assert first.client.post(SUBMIT, json=BODY, headers=alice).status_code == 200
        refused = second.client.post(SUBMIT, json=BODY, headers=mallory)
        assert (refused.status_code, refused.json()["error"]["code"]) == (502, "upstream_unavailable")
        (row,) = second.client.get("/gateway/tasks", headers=ADMIN).json()["data"]
        assert (row["task_id"], row["key"]) == ("dup_3", "alice")
        (unknown,) = second.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"]
        assert unknown["key"] == "mallory"
        (logged,) = events(second, "upstream_task_id_reused")
        assert (logged["task_id"], logged["same_key"]) == ("dup_3", False)

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_same_key_twice_is_refused_too(
        self, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """One key, one id twice: the second submission would never be billed, so it is refused the same way."""
        accepted = json(200, {"id": "dup_2", "task_id": "dup_2", "status": "queued"})
        fake_upstream.script("POST", SUBMIT, accepted, accepted)
        gw = gateway(make_gateway, fake_upstream, transport)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        second = gw.client.post(SUBMIT, json=BODY)
        assert (second.status_code, second.json()["error"]["code"]) == (502, "upstream_unavailable")
        assert len(gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"]) == 1


class TestClientHeaders:
    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_only_needed_headers_go_up_and_idempotency_keys_are_scoped(
        self, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Two keys sending the same Idempotency-Key reach the upstream with different derived keys, never their
        own; made-up, cookie and forwarding headers stay behind."""
        fake_upstream.always("POST", SUBMIT, fresh_task())
        gw = gateway(make_gateway, fake_upstream, transport, **KEYS_MODE)
        extra = {"Idempotency-Key": "order-42", "Cookie": "s=1", "X-Forwarded-For": "10.0.0.1", "X-Note": "hi"}
        for name in ("alice", "bob"):
            headers = {**gw.as_key(gw.create_key(name)), **extra}
            assert gw.client.post(SUBMIT, json=BODY, headers=headers).status_code == 200
        seen = fake_upstream.requests_to("POST", SUBMIT)
        keys = [request.header("idempotency-key") for request in seen]
        assert len(set(keys)) == 2 and "order-42" not in keys and all(k and k.startswith("gw-") for k in keys)
        for request in seen:
            for name in ("cookie", "x-forwarded-for", "x-note"):
                assert request.header(name) is None, name


# -- 3. the team key echoed back; the team key rejected -----------------------------------------------------------


def echo_key(status: int, where: str) -> Any:
    """An upstream that quotes the Authorization header it received, in its body or in a header."""

    def answer(request: RecordedRequest) -> Any:
        auth = request.header("authorization") or ""
        task_id = f"echo_{request.path.count('/')}_{status}"
        body: dict[str, Any] = {"id": task_id, "task_id": task_id, "status": "queued"}
        if where == "body":
            body["debug"] = {"received": auth, "escaped": auth.replace("/", "\\/")}
        headers = {"X-RateLimit-Debug": auth} if where == "header" else {}
        if status >= 400:
            body = {"error": {"message": f"bad request with {auth}", "code": "nope"}}
        return json(status, body, headers=headers)

    return dynamic(answer)


class TestKeyNeverEchoed:
    @pytest.mark.parametrize("transport", TRANSPORTS)
    @pytest.mark.parametrize(("status", "where"), [(200, "body"), (400, "body"), (200, "header"), (429, "header")])
    def test_submission_answer_masked(
        self, status: int, where: str, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The team key in a passed-through body or header (success or error) reaches the client masked."""
        fake_upstream.always("POST", SUBMIT, echo_key(status, where))
        gw = gateway(make_gateway, fake_upstream, transport)
        response = gw.client.post(SUBMIT, json=BODY)
        assert response.status_code == status
        raw = response.content + b"".join(k + v for k, v in response.headers.raw)
        assert UPSTREAM_KEY.encode() not in raw
        assert b"sk-***" in raw

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_status_poll_masked(
        self, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A status answer quoting the key is masked, in the answer and in the ledger's stored final body."""
        fake_upstream.script("POST", SUBMIT, json(200, {"id": "t_k", "task_id": "t_k", "status": "queued"}))
        done = {"id": "t_k", "status": "completed", "note": f"key={UPSTREAM_KEY}"}
        fake_upstream.always("GET", "/v1/videos/t_k", json(200, done))
        gw = gateway(make_gateway, fake_upstream, transport)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        for _ in range(2):  # the second answer comes from the cache / the ledger
            response = gw.client.get("/v1/videos/t_k")
            assert response.status_code == 200 and response.json()["note"] == "key=sk-***"

    @pytest.mark.parametrize("transport", TRANSPORTS)
    @pytest.mark.parametrize("status", [401, 403])
    def test_rejected_team_key_is_502_upstream_auth_failed(
        self, status: int, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """An upstream 401/403 is the team key's problem, not the client's: 502, an error log line, a count, and no
        intent left behind (nothing was created)."""
        fake_upstream.always("POST", SUBMIT, echo_key(status, "body"))
        gw = gateway(make_gateway, fake_upstream, transport)
        response = gw.client.post(SUBMIT, json=BODY)
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert UPSTREAM_KEY not in response.text
        assert gw.metric("kling_gateway_upstream_auth_failures_total", {"route": SUBMIT}) == 1
        (logged,) = events(gw, "upstream_auth_failed")
        assert (logged["level"], logged["upstream_status"]) == ("error", status)
        assert gw.client.get("/gateway/submissions/unknown", headers=ADMIN).json()["data"] == []
        assert UPSTREAM_KEY not in gw.logs.getvalue()


# -- 4. response headers: an allowlist, bounded ---------------------------------------------------------------------


class TestResponseHeaders:
    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_only_allowlisted_headers_pass(
        self, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Cookies, redirects, HSTS and unknown headers stay behind; Retry-After is capped; rate-limit headers and
        the upstream's request id pass."""
        hostile = {
            "Set-Cookie": "session=upstream; Domain=.example.com",
            "Location": "https://evil.example/",
            "Strict-Transport-Security": "max-age=63072000; includeSubDomains; preload",
            "Content-Security-Policy": "default-src 'none'",
            "Access-Control-Allow-Origin": "*",
            "Retry-After": "999999999",
            "X-RateLimit-Remaining": "7",
            "X-Request-ID": "up-123",
            "X-Internal-Host": "10.0.0.5",
        }
        fake_upstream.always("POST", SUBMIT, json(429, {"error": {"message": "slow"}}, headers=hostile))
        gw = gateway(make_gateway, fake_upstream, transport)
        response = gw.client.post(SUBMIT, json=BODY)
        assert response.status_code == 429
        for name in (
            "set-cookie",
            "location",
            "strict-transport-security",
            "content-security-policy",
            "access-control-allow-origin",
            "x-internal-host",
        ):
            assert name not in response.headers, name
        assert response.headers["retry-after"] == "3600"
        assert response.headers["x-ratelimit-remaining"] == "7"
        assert response.headers["x-upstream-request-id"] == "up-123"
        assert response.headers["x-request-id"] != "up-123"

    @pytest.mark.parametrize("transport", TRANSPORTS)
    @pytest.mark.parametrize("size", [2_000, 60_000])
    def test_oversized_header_never_reaches_the_client(
        self, size: int, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A long allowlisted header is dropped (or the whole answer refused); it never reaches the client."""
        fake_upstream.always("POST", SUBMIT, json(429, {"error": {}}, headers={"X-RateLimit-Policy": "p" * size}))
        gw = gateway(make_gateway, fake_upstream, transport)
        response = gw.client.post(SUBMIT, json=BODY)
        assert "x-ratelimit-policy" not in response.headers
        assert sum(len(k) + len(v) for k, v in response.headers.raw) < 4096
        # aiohttp refuses a header line over 8 KiB outright (502); the lean client reads it and the gateway drops it
        assert response.status_code == (502 if (transport, size) == ("aiohttp", 60_000) else 429)

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_retry_after_as_a_date_or_garbage_is_dropped(
        self, transport: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Only a number of seconds is passed on (an HTTP date or junk is dropped rather than trusted)."""
        fake_upstream.script("POST", SUBMIT, json(503, {"error": {}}, headers={"Retry-After": "-1"}))
        fake_upstream.script(
            "POST", SUBMIT, json(503, {"error": {}}, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
        )
        gw = gateway(make_gateway, fake_upstream, transport)
        for _ in range(2):
            response = gw.client.post(SUBMIT, json=BODY)
            assert response.status_code == 503 and "retry-after" not in response.headers


# -- 3 and 4 for the video download (/v1/videos/{id}/content): the upstream's own origin gets the account's key --


def video_task(fake: FakeUpstream, task_id: str) -> str:
    """A completed task whose video is on the upstream's own origin (so the download carries the team key)."""
    fake.script("POST", SUBMIT, json(200, {"id": task_id, "task_id": task_id, "status": "queued"}))
    done = {"id": task_id, "status": "completed", "video_url": f"{fake.url}/files/{task_id}.mp4"}
    fake.always("GET", f"/v1/videos/{task_id}", json(200, done))
    return f"/v1/videos/{task_id}/content"


def echoing_origin(respond: Any) -> Any:
    """A video origin answering ``respond(the Authorization it received)``."""
    return dynamic(lambda request: respond(request.header("authorization") or ""))


def client_visible(response: Any) -> bytes:
    return response.content + b"".join(k + v for k, v in response.headers.raw)


class TestVideoDownload:
    @pytest.mark.parametrize(
        ("name", "value", "default"),
        [("ETag", '"{key}"', 'W/"t_v-5"'), ("Content-Type", "video/{key}", "video/mp4")],
    )
    def test_the_key_echoed_in_a_passed_header_is_not_passed(
        self, name: str, value: str, default: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """ETag and Content-Type are the origin's own values passed on: one quoting the key is replaced."""
        path = video_task(fake_upstream, "t_v")

        def answer(auth: str) -> Any:
            echoed = value.format(key=auth.split(" ")[-1])
            if name == "Content-Type":
                return text(200, b"12345", content_type=echoed)
            return text(200, b"12345", content_type="video/mp4", headers={name: echoed})

        fake_upstream.always("GET", "/files/", echoing_origin(answer))
        gw = gateway(make_gateway, fake_upstream, "lean")
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        response = gw.client.get(path)
        assert response.status_code == 200 and response.headers[name] == default
        assert UPSTREAM_KEY.encode() not in client_visible(response)

    @pytest.mark.parametrize(
        "location",
        [
            "http://cdn example/v.mp4?sig={key}",  # unusable: the message would quote it
            "http://127.0.0.1/v.mp4?sig={key}",  # a private address: refused, never fetched
            "http://{host}.internal/v.mp4",  # a local name: the message names the host
        ],
    )
    def test_a_refused_redirect_quoting_the_key_is_masked(
        self, location: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The origin that got the key redirects to a URL holding it: 502 video_unavailable, the key masked."""
        path = video_task(fake_upstream, "t_r")

        def answer(auth: str) -> Any:
            key = auth.split(" ")[-1]
            return redirect(location.format(key=key, host=key))

        fake_upstream.always("GET", "/files/", echoing_origin(answer))
        gw = gateway(make_gateway, fake_upstream, "lean")
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        response = gw.client.get(path)
        assert (response.status_code, response.json()["error"]["code"]) == (502, "video_unavailable")
        assert UPSTREAM_KEY.encode() not in client_visible(response)
        assert UPSTREAM_KEY not in gw.logs.getvalue()

    def test_the_origin_rejecting_the_team_key_is_502_upstream_auth_failed(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A 401 from the upstream's own origin (the key sent) is the team key's problem, as for the API: 502
        upstream_auth_failed, counted and logged; its body (quoting the key) never reaches the client."""
        path = video_task(fake_upstream, "t_a")
        fake_upstream.always(
            "GET", "/files/", echoing_origin(lambda auth: json(401, {"error": {"message": f"bad key {auth}"}}))
        )
        gw = gateway(make_gateway, fake_upstream, "lean")
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        response = gw.client.get(path)
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_auth_failed")
        assert UPSTREAM_KEY.encode() not in client_visible(response)
        assert gw.metric("kling_gateway_upstream_auth_failures_total", {"route": "video_url"}) == 1
        (logged,) = events(gw, "upstream_auth_failed")
        assert (logged["level"], logged["upstream_status"]) == ("error", 401)

    @pytest.mark.parametrize("digits", [30, 5_000])
    def test_an_unbounded_size_in_a_416_is_not_passed_on(
        self, digits: int, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """The origin's 416 names a size no video has: the client's 416 carries no size (not a 5,000-digit header,
        and not a 500 from converting it)."""
        path = video_task(fake_upstream, "t_416")
        fake_upstream.always("GET", "/files/", json(416, "", headers={"Content-Range": "bytes */" + "9" * digits}))
        gw = gateway(make_gateway, fake_upstream, "lean")
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        response = gw.client.get(path, headers={"Range": "bytes=10-20"})
        assert (response.status_code, response.json()["error"]["code"]) == (416, "range_not_satisfiable")
        assert "content-range" not in response.headers


# -- 6. pass-through path spellings ------------------------------------------------------------------------------

SPELLINGS = {
    "/v1//videos/vt_1": (400, "invalid_path"),
    "/v1/Videos/vt_1": (404, "task_not_found"),
    "/v1/VIDEOS/vt_1/content": (404, "task_not_found"),
    "/v1/videos;x/vt_1": (400, "invalid_path"),
    "/v1/videos/vt_1;x": (404, "task_not_found"),  # the status route's own ownership check
    "/v1/%76ideos/vt_1": (404, "task_not_found"),  # decoded to the status route
    "/v1/videos/%76t_1/content": (404, "task_not_found"),  # decoded to the content route's ownership check
    "/v1/videos/vt_1/": (400, "invalid_path"),
    "/v1/videos/./vt_1/content": (404, "task_not_found"),  # the client normalises the dot segment
    "/v1/tasks?task_id=vt_1": (404, "task_not_found"),
    "/v1/tasks?ids=a,vt_1": (404, "task_not_found"),
    "/v1/tasks?task_id=%76t_1": (400, "invalid_path"),
    "/v1/tasks/vt_1": (404, "task_not_found"),
    "/v1/videos/vt_1/content": (404, "task_not_found"),
}


class TestPassthroughSpellings:
    @pytest.mark.parametrize("path", list(SPELLINGS))
    def test_another_keys_task_is_unreachable(
        self, path: str, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """However the path or query names another key's task, nothing goes upstream: 400 or 404 with a code."""
        fake_upstream.script("POST", SUBMIT, json(200, {"id": "vt_1", "task_id": "vt_1", "status": "queued"}))
        env = {**KEYS_MODE, "KLING_GATEWAY_PROXY_PASSTHROUGH": "true"}
        gw = make_gateway(fake_upstream.url, env=env)
        owner, other = gw.as_key(gw.create_key("owner")), gw.as_key(gw.create_key("other"))
        assert gw.client.post(SUBMIT, json=BODY, headers=owner).status_code == 200
        before = len(fake_upstream.requests)
        response = gw.client.get(path, headers=other)
        assert (response.status_code, response.json()["error"]["code"]) == SPELLINGS[path]
        assert len(fake_upstream.requests) == before

    def test_the_owner_still_passes(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """The normal form of a task-scoped path and a query naming one's own task go through."""
        fake_upstream.script("POST", SUBMIT, json(200, {"id": "vt_2", "task_id": "vt_2", "status": "queued"}))
        fake_upstream.always("GET", "/v1/tasks", json(200, {"data": []}))
        env = {**KEYS_MODE, "KLING_GATEWAY_PROXY_PASSTHROUGH": "true"}
        gw = make_gateway(fake_upstream.url, env=env)
        owner = gw.as_key(gw.create_key("owner"))
        assert gw.client.post(SUBMIT, json=BODY, headers=owner).status_code == 200
        assert gw.client.get("/v1/tasks?task_id=vt_2", headers=owner).status_code == 200
        (seen,) = fake_upstream.requests_to("GET", "/v1/tasks")
        assert seen.query == "task_id=vt_2"


# -- 7. pass-through models: strict media, priced or refused for budgeted keys ------------------------------------


def passthrough_config(tmp_path: Path, priced: bool) -> dict[str, str]:
    config = tmp_path / "gateway.toml"
    price = '\n[pricing.prices]\n"veo-3.1" = 0.2\n"kling-v3-std-silent" = 0.084\n' if priced else ""
    config.write_text(f'[validation]\npassthrough_models = ["veo-3.1"]\n{price}')
    return {**KEYS_MODE, "KLING_GATEWAY_CONFIG": str(config)}


class TestPassthroughModels:
    @pytest.mark.parametrize("url", ["http:/10.0.0.1/a.png", "http:\\\\10.0.0.1\\a.png", "http:///10.0.0.1/a.png"])
    def test_unparseable_media_never_forwarded(
        self, url: str, tmp_path: Path, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A pass-through model's media URL gets the strict parse: 400 invalid_url, nothing upstream."""
        gw = make_gateway(fake_upstream.url, env=passthrough_config(tmp_path, priced=True))
        key = gw.as_key(gw.create_key("team"))
        response = gw.client.post(SUBMIT, json={"model": "veo-3.1", "prompt": "x", "image": url}, headers=key)
        assert response.status_code == 400
        assert [e["code"] for e in response.json()["error"]["errors"]] == ["invalid_url"]
        assert fake_upstream.requests == []

    @pytest.mark.parametrize(("priced", "status"), [(False, 403), (True, 200)])
    def test_budgeted_key_needs_a_price(
        self, priced: bool, status: int, tmp_path: Path, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A key with a budget may use a pass-through model only if it has a configured price (else 403
        model_not_priced, nothing upstream); the priced one is estimated at its price."""
        fake_upstream.always("POST", SUBMIT, fresh_task())
        gw = make_gateway(fake_upstream.url, env=passthrough_config(tmp_path, priced))
        key = gw.as_key(gw.create_key("team", monthly_budget_usd="10"))
        response = gw.client.post(SUBMIT, json={"model": "veo-3.1", "prompt": "x", "duration": 5}, headers=key)
        assert response.status_code == status
        if status == 403:
            assert response.json()["error"]["code"] == "model_not_priced"
            assert fake_upstream.requests == []
        else:
            (task,) = gw.client.get("/gateway/tasks", headers=key).json()["data"]
            assert task["estimate"]["usd"] == "1.0000"
