"""A real gateway and sandbox on loopback for client-side suites (``generate``, ``examples/``), with what they saw.

``Recorder`` wraps any ASGI app and keeps every HTTP request it passes on (method, path, headers, body);
``serve_stack`` serves a sandbox upstream and a gateway in front of it (key auth, one client key issued), both
recorded, each in its own uvicorn thread::

    with serve_stack(tmp_path) as stack:
        httpx.post(stack.url + "/v1/video/generations", headers=stack.auth, json=...)
        assert stack.gateway.requests[0].headers["idempotency-key"]
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.app import create_app
from gateway.config import load_settings
from gateway.sandbox import SandboxOptions, create_sandbox_app
from support.harness import ADMIN, ADMIN_TOKEN, SANDBOX_API_KEY
from support.upstream_fake import ServerThread


@dataclass(frozen=True)
class Seen:
    """One HTTP request as the wrapped app received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Recorder:
    """An ASGI wrapper that records each HTTP request, then hands it on unchanged."""

    app: ASGIApp
    requests: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(Seen(scope["method"], scope["path"], headers, body))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def to(self, method: str, path: str) -> list[Seen]:
        """The requests with this method and path."""
        return [r for r in self.requests if r.method == method and r.path == path]


@dataclass(frozen=True)
class Stack:
    """A served gateway (``url``, a client ``key``) in front of a served sandbox, both recorded."""

    url: str
    key: str
    gateway: Recorder
    upstream: Recorder

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@contextlib.contextmanager
def serve_stack(data_dir: Path, *, queued_s: float = 0.2, run_s: float = 0.5, models: str = "") -> Iterator[Stack]:
    """Sandbox + gateway (auth ``keys``, settler off, short pending-status cache) on loopback; one key named
    ``client`` (limited to the ``models`` globs, comma separated, if given)."""
    upstream = Recorder(create_sandbox_app(SandboxOptions(api_key=SANDBOX_API_KEY, queued_s=queued_s, run_s=run_s)))
    with ServerThread(upstream, lifespan="off") as sandbox:
        settings = load_settings(
            env={
                "UNIALL_BASE_URL": sandbox.url,
                "UNIALL_API_KEY": SANDBOX_API_KEY,
                "KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir),
                "KLING_GATEWAY_AUTH_MODE": "keys",
                "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "KLING_GATEWAY_SETTLER_ENABLED": "false",
                "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
                "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
                "KLING_GATEWAY_CACHE_PENDING_TTL_S": "0.2",  # the sandbox's tasks finish in under a second
            }
        )
        gateway = Recorder(create_app(settings, registry=CollectorRegistry(), log_stream=io.StringIO()))
        with ServerThread(gateway, lifespan="on") as served:
            options: dict[str, Any] = {"name": "client"}
            if models:
                options["models"] = models.split(",")
            created = httpx.post(f"{served.url}/gateway/keys", json=options, headers=ADMIN, timeout=10)
            assert created.status_code == 201, created.text
            gateway.requests.clear()
            yield Stack(url=served.url, key=created.json()["key"], gateway=gateway, upstream=upstream)
