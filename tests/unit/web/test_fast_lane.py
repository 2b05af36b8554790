"""The fast lane handles exactly the two hot routes, with the same ids, limits, errors, metrics and log lines."""

from __future__ import annotations

from typing import Any

import pytest
from support.harness import GatewayFactory
from support.upstream_fake import FakeUpstream, fresh_task, json

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a kite over the dunes", "duration": 5}
ACCEPTED = {"id": "task_1", "task_id": "task_1", "status": "queued"}
PENDING = {"id": "task_1", "task_id": "task_1", "status": "in_progress", "progress": 10}


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.script("POST", SUBMIT, default=fresh_task())
    fake_upstream.script("GET", "/v1/videos/task_1", default=json(200, PENDING))
    return fake_upstream


class TestFastLane:
    def test_hot_routes_keep_request_id_metrics_and_access_line(
        self, upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """A submission and a poll carry the client's request id, count under their route, and log one line each."""
        gw = make_gateway(upstream.url)
        submitted = gw.client.post(SUBMIT, json=BODY, headers={"X-Request-ID": "rid-submit"})
        polled = gw.client.get("/v1/videos/task_1", headers={"X-Request-ID": "rid-poll"})
        assert (submitted.status_code, polled.status_code) == (200, 200)
        assert submitted.headers["x-request-id"] == "rid-submit"
        assert polled.headers["x-request-id"] == "rid-poll"
        assert polled.headers["x-cache"] == "MISS"
        assert polled.json() == PENDING
        assert gw.metric("kling_gateway_requests_total", {"route": SUBMIT, "method": "POST", "status": "200"}) == 1
        labels = {"route": "/v1/videos/{task_id}", "method": "GET", "status": "200"}
        assert gw.metric("kling_gateway_requests_total", labels) == 1
        lines = [line for line in gw.log_lines() if line.get("event") == "request"]
        assert [(line["request_id"], line["route"], line["status"]) for line in lines] == [
            ("rid-submit", SUBMIT, 200),
            ("rid-poll", "/v1/videos/{task_id}", 200),
        ]
        assert lines[1]["task_id"] == "task_1" and lines[1]["cache"] == "MISS"

    def test_generated_request_ids_are_unique(self, upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Without a client id every answer gets its own 32-hex-digit id."""
        gw = make_gateway(upstream.url)
        ids = {gw.client.get("/v1/videos/task_1").headers["x-request-id"] for _ in range(50)}
        assert len(ids) == 50
        assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)

    def test_handler_errors_use_the_gateway_shape(self, upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """A validation error on the lane: 400 in the error shape, with the request id, counted as a rejection."""
        gw = make_gateway(upstream.url)
        response = gw.client.post(SUBMIT, json={"prompt": "no model"}, headers={"X-Request-ID": "rid-bad"})
        assert response.status_code == 400
        assert response.headers["x-request-id"] == "rid-bad"
        assert response.json()["error"]["request_id"] == "rid-bad"
        assert response.json()["error"]["code"] == "invalid_request"
        assert gw.metric("kling_gateway_requests_total", {"route": SUBMIT, "method": "POST", "status": "400"}) == 1

    def test_unknown_task_is_404_on_the_lane(self, upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        gw = make_gateway(upstream.url)
        response = gw.client.get("/v1/videos/task_nobody")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "task_not_found"
        assert upstream.calls("GET", "/v1/videos/task_nobody") == 0

    def test_oversized_headers_refused_with_request_id(
        self, upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """431 on the lane too, before anything else runs."""
        gw = make_gateway(upstream.url, env={"KLING_GATEWAY_SERVER_MAX_HEADER_BYTES": "1024"})
        response = gw.client.post(SUBMIT, json=BODY, headers={"X-Request-ID": "rid-big", "X-Pad": "p" * 2000})
        assert response.status_code == 431
        assert response.headers["x-request-id"] == "rid-big"
        assert response.json()["error"]["code"] == "headers_too_large"
        assert upstream.calls("POST", SUBMIT) == 0

    @pytest.mark.parametrize(
        ("method", "path", "status", "code"),
        [
            ("GET", "/v1/videos/task_1/", 404, "not_found"),  # trailing slash: not the status route
            ("GET", "/v1/videos/task_1/content", 404, "task_not_found"),  # deeper: the content route
            ("GET", "/v1/videos/task_1/content/x", 404, "not_found"),  # deeper still: passthrough (off)
            ("PUT", "/v1/videos/task_1", 405, "method_not_allowed"),  # another method: the general stack's 405
            ("GET", SUBMIT, 405, "method_not_allowed"),
            ("GET", "/gateway/validate", 405, "method_not_allowed"),
            ("GET", "/v1/videos/", 404, "not_found"),
        ],
    )
    def test_everything_else_takes_the_general_stack(
        self, method: str, path: str, status: int, code: str, upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Near-misses of the hot routes are answered by Starlette's routing exactly as before."""
        gw = make_gateway(upstream.url)
        response = gw.client.request(method, path, headers={"X-Request-ID": "rid-other"})
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
        assert response.headers["x-request-id"] == "rid-other"
        assert upstream.calls("GET", "/v1/videos/task_1") == 0
