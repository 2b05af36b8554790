"""OpenTelemetry tracing end to end: spans exported over OTLP/HTTP to a receiver the test starts.

The span tree of a submission and a poll, parent/child ids, the client's trace continued, the upstream given the
gateway's ``traceparent`` (parent: the upstream-call span), the attributes, and no secret anywhere in what is
exported. Off (no endpoint), the plain app runs and nothing is added upstream.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus
from support.harness import ADMIN_TOKEN, SANDBOX_API_KEY, GatewayFactory, GatewayHarness
from support.otlp_receiver import OtlpReceiver, ReceivedSpan
from support.upstream_fake import FakeUpstream, dynamic, json

from gateway.config import ConfigError
from gateway.tracing.setup import tracing_enabled, tracing_from_env
from gateway.web.fast_lane import GatewayApp

SUBMIT = "/v1/video/generations"
BODY: dict[str, Any] = {"model": "kling-v3-std-silent", "prompt": "a fox in the snow", "duration": 5}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT, INTERNAL = ProtoSpan.SPAN_KIND_SERVER, ProtoSpan.SPAN_KIND_CLIENT, ProtoSpan.SPAN_KIND_INTERNAL


def scripted(fake: FakeUpstream) -> None:
    counter = iter(range(1, 10_000))

    def accept(request: Any) -> Any:
        task_id = f"task_{next(counter)}"
        return json(200, {"id": task_id, "task_id": task_id, "status": "queued", "progress": 0})

    def status(request: Any) -> Any:
        task_id = request.path.rsplit("/", 1)[-1]
        return json(200, {"id": task_id, "task_id": task_id, "status": "in_progress", "progress": 10})

    fake.always("POST", SUBMIT, dynamic(accept))
    fake.always("GET", "/v1/videos/", dynamic(status))


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{running.url}/v1/traces")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        yield running


@pytest.fixture
def gw(receiver: OtlpReceiver, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> GatewayHarness:
    scripted(fake_upstream)
    return make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})


def in_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def traceparent_parts(value: str | None) -> tuple[str, str]:
    assert value is not None
    version, trace_id, parent_id, flags = value.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled (the SDK may add the "random trace id" flag)
    return trace_id, parent_id


class TestOn:
    def test_submission_continues_the_client_trace(
        self, gw: GatewayHarness, receiver: OtlpReceiver, fake_upstream: FakeUpstream
    ) -> None:
        secret = gw.create_key("team-a")
        response = gw.client.post(
            SUBMIT,
            json=BODY,
            headers={"Authorization": f"Bearer {secret}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
        assert response.status_code == 200, response.text
        task_id = response.json()["task_id"]

        names = {"POST /v1/video/generations", "validate", "ledger.intent", "upstream POST", "ledger.task"}
        spans = in_trace(
            receiver.wait_for(lambda got: names <= {s.name for s in in_trace(got, CLIENT_TRACE)}), CLIENT_TRACE
        )
        server = one(spans, "POST /v1/video/generations")
        assert (server.kind, server.parent_id) == (SERVER, CLIENT_SPAN)
        for name in ("validate", "ledger.intent", "upstream POST", "ledger.task"):
            assert one(spans, name).parent_id == server.span_id, name
        upstream_span = one(spans, "upstream POST")
        assert upstream_span.kind == CLIENT and one(spans, "validate").kind == INTERNAL
        assert server.attributes == {
            "http.route": SUBMIT,
            "http.request.method": "POST",
            "http.response.status_code": 200,
            "gateway.key": "team-a",
            "gateway.model": "kling-v3-std-silent",
            "gateway.mode": "text",
            "gateway.task_id": task_id,
            "gateway.account": "default",
            "gateway.upstream_status": 200,
        }
        assert upstream_span.attributes["url.path"] == SUBMIT
        assert upstream_span.attributes["http.response.status_code"] == 200
        assert one(spans, "ledger.task").attributes["gateway.task_id"] == task_id
        assert one(spans, "ledger.intent").attributes == {
            "gateway.key": "team-a",
            "gateway.account": "default",
            "gateway.admitted": True,
        }
        assert server.resource["service.name"] == "kling-gateway"

        [forwarded] = fake_upstream.requests_to("POST", SUBMIT)
        assert forwarded.header_values("traceparent") == [forwarded.header("traceparent")]
        assert traceparent_parts(forwarded.header("traceparent")) == (CLIENT_TRACE, upstream_span.span_id)

        exported = b"".join(receiver.bodies)
        for leaked in (secret, SANDBOX_API_KEY, ADMIN_TOKEN):
            assert leaked.encode() not in exported
            for span in receiver.spans:
                assert leaked not in repr(span.attributes) and leaked not in repr(span.resource)

    def test_poll_without_a_client_trace_starts_one(
        self, gw: GatewayHarness, receiver: OtlpReceiver, fake_upstream: FakeUpstream
    ) -> None:
        secret = gw.create_key("team-a")
        auth = {"Authorization": f"Bearer {secret}"}
        task_id = gw.client.post(SUBMIT, json=BODY, headers=auth).json()["task_id"]
        assert gw.client.get(f"/v1/videos/{task_id}", headers=auth).status_code == 200

        def polled(got: list[ReceivedSpan]) -> bool:
            return any(s.name == "GET /v1/videos/{task_id}" for s in got)

        server = one(receiver.wait_for(polled), "GET /v1/videos/{task_id}")
        assert server.parent_id == "" and server.trace_id != CLIENT_TRACE
        assert server.attributes["gateway.task_id"] == task_id
        assert server.attributes["gateway.cache"] == "MISS"
        assert server.attributes["gateway.key"] == "team-a"
        upstream_span = one(
            receiver.wait_for(lambda got: any(s.name == "upstream GET" for s in in_trace(got, server.trace_id))),
            "upstream GET",
        )
        assert (upstream_span.trace_id, upstream_span.parent_id) == (server.trace_id, server.span_id)
        [poll] = [r for r in fake_upstream.requests if r.method == "GET"]
        assert traceparent_parts(poll.header("traceparent")) == (server.trace_id, upstream_span.span_id)

    def test_errors_are_spans_too(self, gw: GatewayHarness, receiver: OtlpReceiver) -> None:
        """A refused request is traced with its status; a 5xx marks the span as an error."""
        response = gw.client.post(SUBMIT, json=BODY, headers={"Authorization": "Bearer gk_wrong-secret"})
        assert response.status_code == 401
        span = one(receiver.wait_for(lambda got: any(s.name.startswith("POST /v1/video") for s in got)), SUBMIT_NAME)
        assert span.attributes["http.response.status_code"] == 401
        assert span.status_code == ProtoStatus.STATUS_CODE_UNSET  # a client's error is not the gateway's
        assert b"gk_wrong-secret" not in b"".join(receiver.bodies)

    def test_upstream_5xx_marks_both_spans_as_errors(
        self, receiver: OtlpReceiver, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        fake_upstream.always("POST", SUBMIT, json(500, {"error": {"message": "boom"}}))
        gw = make_gateway(fake_upstream.url)
        assert gw.client.post(SUBMIT, json=BODY).status_code == 500
        spans = receiver.wait_for(lambda got: {SUBMIT_NAME, "upstream POST"} <= {s.name for s in got})
        for name in (SUBMIT_NAME, "upstream POST"):
            assert one(spans, name).status_code == ProtoStatus.STATUS_CODE_ERROR, name
        assert {s.name for s in spans} >= {"ledger.intent", "ledger.refused"}

    def test_service_name_from_the_environment(
        self,
        receiver: OtlpReceiver,
        fake_upstream: FakeUpstream,
        make_gateway: GatewayFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
        scripted(fake_upstream)
        gw = make_gateway(fake_upstream.url)
        assert gw.client.get("/healthz").status_code == 200
        span = one(receiver.wait_for(lambda got: any(s.name == "GET /healthz" for s in got)), "GET /healthz")
        assert span.resource["service.name"] == "gateway-eu"


SUBMIT_NAME = "POST /v1/video/generations"


class TestOff:
    def test_plain_app_and_nothing_added_upstream(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        scripted(fake_upstream)
        gw = make_gateway(fake_upstream.url)
        assert type(gw.client.app) is GatewayApp
        assert gw.client.post(SUBMIT, json=BODY).status_code == 200
        [forwarded] = fake_upstream.requests_to("POST", SUBMIT)
        assert forwarded.header("traceparent") is None


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318/v1/metrics"}, False),
    ],
)
def test_when_tracing_is_on(environ: dict[str, str], on: bool) -> None:
    assert tracing_enabled(environ) is on


def test_missing_extra_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the [otel] extra an endpoint is refused at start-up, naming the extra (not silently untraced)."""
    monkeypatch.delitem(sys.modules, "gateway.tracing.spans", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(
        ConfigError, match=r"OTEL_EXPORTER_OTLP_ENDPOINT is set .*opentelemetry.* 'kling-gateway\[otel\]'"
    ):
        tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
