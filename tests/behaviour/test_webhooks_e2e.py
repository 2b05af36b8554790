"""Completion webhooks end to end: a gateway, a task polled to completion, a real receiver on loopback.

The receiver runs under uvicorn on 127.0.0.1 and verifies each delivery with the ``standardwebhooks`` library;
the gateway reaches it only because ``[webhooks] allow_private_targets`` is on (the development setting).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from support.harness import ADMIN, GatewayFactory
from support.upstream_fake import FakeUpstream, ServerThread, json

from gateway.cli.main import main
from gateway.config import ConfigError, load_settings
from gateway.webhooks.outbox import delivery_id
from gateway.webhooks.signing import key_secret, secret_key

SECRET = "whsec_" + base64.b64encode(b"end-to-end-webhook-secret-0123").decode()
SUBMIT = "/v1/video/generations"
BODY = b'{"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}'
RECEIVER_SECRET = key_secret(secret_key(SECRET), "hooked")  # `kling-gateway keys webhook-secret hooked`
KEYS = {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_WEBHOOK_SECRET": SECRET}


class Receiver:
    """A webhook receiver app: verifies with standardwebhooks and records what arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes, object]] = []

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        self.received.append((headers, body, Webhook(RECEIVER_SECRET).verify(body, headers)))
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])


async def loopback_only(host: str) -> list[str]:
    return ["127.0.0.1"]


def test_completed_task_is_delivered_signed(fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
    """The terminal status body arrives once, signed, under the task's webhook-id, and the metric counts it."""
    fake_upstream.script("POST", SUBMIT, json(200, {"id": "task_hook", "status": "queued"}))
    fake_upstream.always("GET", "/v1/videos/task_hook", json(200, {"id": "task_hook", "status": "completed"}))
    receiver = Receiver()
    with ServerThread(receiver.app(), lifespan="off") as server:
        port = urlsplit(server.url).port
        gw = make_gateway(
            fake_upstream.url,
            env={**KEYS, "KLING_GATEWAY_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true"},
            resolver=loopback_only,
        )
        secret = gw.create_key("hooked", webhook_url=f"http://hooks.example.com:{port}/hook?token=t0k")
        headers = {**gw.as_key(secret), "Content-Type": "application/json"}
        assert gw.client.post(SUBMIT, content=BODY, headers=headers).status_code == 200
        assert gw.client.get("/v1/videos/task_hook", headers=gw.as_key(secret)).json()["status"] == "completed"
        deadline = time.monotonic() + 10
        while not receiver.received or not gw.metric(
            "kling_gateway_webhook_deliveries_total", {"outcome": "delivered"}
        ):
            assert time.monotonic() < deadline, "no delivery"
            time.sleep(0.02)
    [(received_headers, _body, payload)] = receiver.received
    assert payload == {"id": "task_hook", "status": "completed"}
    assert received_headers["webhook-id"] == delivery_id("task_hook")
    assert received_headers["host"] == f"hooks.example.com:{port}"
    assert "t0k" not in gw.logs.getvalue()


def test_loopback_webhook_url_refused_by_default(fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
    """Without the development setting a loopback callback URL is 400 invalid_key_request."""
    gw = make_gateway(fake_upstream.url, env=KEYS)
    response = gw.client.post(
        "/gateway/keys", json={"name": "k", "webhook_url": "http://127.0.0.1:9/hook"}, headers=ADMIN
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_key_request"
    assert gw.settings.webhooks.allow_private_targets is False


def test_plain_secret_fails_at_startup(fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
    """A secret that is not whsec_ + base64 stops the gateway at startup, naming the variable, not the value."""
    with pytest.raises(ConfigError, match="KLING_GATEWAY_WEBHOOK_SECRET: must start with 'whsec_'") as info:
        make_gateway(fake_upstream.url, env={**KEYS, "KLING_GATEWAY_WEBHOOK_SECRET": "my-plain-secret"})
    assert "my-plain-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KLING_GATEWAY_WEBHOOKS_CONCURRENCY": "0"}, "webhooks.concurrency: must be at least 1"),
        ({"KLING_GATEWAY_WEBHOOKS_PER_TARGET_CONCURRENCY": "0"}, "webhooks.per_target_concurrency: must be at least 1"),
        ({"KLING_GATEWAY_WEBHOOKS_MAX_PENDING_PER_TARGET": "0"}, "webhooks.max_pending_per_target: must be at least 1"),
        ({"KLING_GATEWAY_WEBHOOKS_MAX_ATTEMPTS": "0"}, "webhooks.max_attempts: must be at least 1"),
        ({"KLING_GATEWAY_WEBHOOKS_TIMEOUT_S": "0"}, "webhooks.timeout_s: must be positive"),
        ({"KLING_GATEWAY_WEBHOOKS_POLL_INTERVAL_S": "-1"}, "webhooks.poll_interval_s: must be positive"),
        (
            {"KLING_GATEWAY_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "sometimes"},
            "webhooks.allow_private_targets: expected true or false, got 'sometimes' "
            "(from KLING_GATEWAY_WEBHOOKS_ALLOW_PRIVATE_TARGETS)",
        ),
    ],
)
def test_bad_webhook_settings(env: dict[str, str], message: str) -> None:
    """Each [webhooks] setting refuses a bad value with one line naming it."""
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert str(info.value) == message


def test_cli_prints_a_keys_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys webhook-secret NAME` prints the whsec_ secret the key's receiver verifies with; unknown key: exit 1."""
    monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KLING_GATEWAY_WEBHOOK_SECRET", SECRET)
    assert main(["keys", "create", "hooked"]) == 0
    capsys.readouterr()
    assert main(["keys", "webhook-secret", "hooked"]) == 0
    assert capsys.readouterr().out.strip() == RECEIVER_SECRET
    assert main(["keys", "webhook-secret", "nobody"]) == 1
    assert "no key named 'nobody'" in capsys.readouterr().err
    monkeypatch.delenv("KLING_GATEWAY_WEBHOOK_SECRET")
    assert main(["keys", "webhook-secret", "hooked"]) == 1
    assert "webhooks are off" in capsys.readouterr().err
