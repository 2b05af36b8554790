"""Schemathesis against the gateway's own OpenAPI description, in process, with a well-behaved upstream.

Every documented operation is fuzzed twice: with data the description allows (positive) and with data it forbids
(negative). The app is driven through its ASGI interface (``schemathesis.openapi.from_asgi``, which also runs the
app's lifespan); the upstream is a ``FakeUpstream`` that always answers sensible JSON, so any 5xx is the gateway's
own fault. Every answer must

- not be a 5xx (502/504 would need a misbehaving upstream; there is none here);
- have a documented status, content type, body and headers (``X-Request-ID`` matches its documented pattern, so
  an insane client id is never echoed);
- for negative data, be a rejection (4xx);
- for a secured operation answered 2xx, turn into 401 without credentials or with wrong ones (``ignored_auth``).

Whatever reached the upstream carried the upstream key and no client credential, and is a body the validator
accepts: the gateway never forwards what it should have refused.

Budget: ``KLING_GATEWAY_FUZZ_EXAMPLES`` examples per operation and mode. The default (25) runs in well under a
minute and is derandomized, so every run tries the same inputs; any other value also draws fresh random inputs
each run, e.g. ``KLING_GATEWAY_FUZZ_EXAMPLES=1000 .venv/bin/pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.seed_examples import SEEDS
from support.upstream_fake import Behaviour, FakeUpstream, RecordedRequest, dynamic, json

from gateway.app import create_app
from gateway.audit.trail import Actor
from gateway.auth import key_admin
from gateway.config import Settings, load_settings
from gateway.store import open_store
from gateway.validation.checks import validate
from gateway.web.openapi import OPENAPI_PATH, openapi_document

EXAMPLES_ENV = "KLING_GATEWAY_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 25
UPSTREAM_KEY = "sk-fuzz-upstream"
ADMIN_TOKEN = "adm-fuzz-token-0123456789abcdefghijk"
METRICS_TOKEN = "metrics-fuzz-token"
SUBMIT = "/v1/video/generations"
JSON = "application/json"
VALIDATE = "/gateway/validate"
STATUS_PREFIX = "/v1/videos/"
RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]


def examples() -> int:
    """Examples per operation and mode, from ``KLING_GATEWAY_FUZZ_EXAMPLES`` (default 25)."""
    raw = os.environ.get(EXAMPLES_ENV, "")
    if not raw:
        return DEFAULT_EXAMPLES
    if not raw.isdecimal() or int(raw) < 1:
        raise pytest.UsageError(f"{EXAMPLES_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


def fuzz_settings(upstream_url: str, data_dir: Path) -> Settings:
    """Client keys on, an admin and a metrics token, nothing in the background, no DNS."""
    return load_settings(
        env={
            "UNIALL_BASE_URL": upstream_url,
            "UNIALL_API_KEY": UPSTREAM_KEY,
            "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "KLING_GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
            "KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir),
            "KLING_GATEWAY_AUTH_MODE": "keys",
            "KLING_GATEWAY_SETTLER_ENABLED": "false",
            "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
            "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
        }
    )


def documented_cases() -> list[tuple[str, str, GenerationMode]]:
    """(METHOD, path, mode) for every documented operation: positive always, negative when there is data to negate.

    Operations whose only input is the free-form ``X-Request-ID`` header have no invalid input to generate.
    """
    document = openapi_document(fuzz_settings("http://127.0.0.1:9", Path("unused")))
    cases = []
    for path, item in sorted(document["paths"].items()):
        for method, op in sorted(item.items()):
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            if "requestBody" in op or len(op["parameters"]) > 1:
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


_task_numbers = itertools.count(1)


def accept(request: RecordedRequest) -> Behaviour:
    """The upstream accepts every submission with a fresh task id."""
    task_id = f"task_fuzz_{next(_task_numbers)}"
    answer = {"id": task_id, "task_id": task_id, "object": "video.generation.job", "status": "queued", "progress": 0}
    return json(200, answer)


def task_status(request: RecordedRequest) -> Behaviour:
    """Any task is in progress."""
    task_id = request.path.rsplit("/", 1)[-1]
    return json(200, {"id": task_id, "task_id": task_id, "status": "in_progress", "progress": 50})


async def seed_keys(settings: Settings) -> tuple[str, str]:
    """A client key for the fuzzed requests and a target key for the named key operations."""
    store = await open_store(settings.store_url)
    try:
        client = await key_admin.create(store, "fuzz-client", actor=Actor.cli(), now=0.0)
        target = await key_admin.create(store, "fuzz-target", actor=Actor.cli(), now=0.0)
    finally:
        await store.close()
    return client.secret, target.secret


@dataclass
class FuzzTarget:
    """The app under test, its schema as it serves it, and what the cases need."""

    schema: Any
    upstream: FakeUpstream
    document: dict[str, Any]
    client_key: str
    task_id: str

    def credentials(self, method: str, path: str) -> list[dict[str, str]]:
        """The headers each security alternative of the operation takes (empty for none)."""
        tokens = {"gatewayKey": self.client_key, "adminToken": ADMIN_TOKEN, "metricsToken": METRICS_TOKEN}
        options: list[dict[str, str]] = []
        for requirement in self.document["paths"][path][method.lower()]["security"] or [{}]:
            names = list(requirement)
            options.append({"Authorization": f"Bearer {tokens[names[0]]}"} if names else {})
        return options

    def known_path_parameters(self, path: str) -> dict[str, str] | None:
        """Path parameters that exist, so some cases get past the 404."""
        if "{task_id}" in path:
            return {"task_id": self.task_id}
        if "{name}" in path:
            return {"name": "fuzz-target"}
        return None


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """The gateway app with one submitted task, against an upstream that always answers well."""
    with FakeUpstream() as upstream:
        upstream.always("POST", SUBMIT, dynamic(accept))
        upstream.always("GET", STATUS_PREFIX, dynamic(task_status))
        settings = fuzz_settings(upstream.url, tmp_path_factory.mktemp("fuzz"))
        client_key, _target_key = asyncio.run(seed_keys(settings))
        app = create_app(settings, registry=CollectorRegistry(), log_stream=io.StringIO())
        try:
            schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, app)
            submit = schema[SUBMIT]["POST"].Case(
                body=SEEDS["text"], headers={"Authorization": f"Bearer {client_key}"}, media_type=JSON
            )
            response = submit.call()
            assert response.status_code == 200, response.text
            yield FuzzTarget(schema, upstream, openapi_document(settings), client_key, response.json()["id"])
        finally:
            shutdown_lifespans()


CASES = documented_cases()


class TestFuzz:
    """Every operation, positive and negative data, checked against the description."""

    @pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g}" for m, p, g in CASES])
    def test_operation(self, fuzz: FuzzTarget, method: str, path: str, mode: GenerationMode) -> None:
        """No 5xx, every answer as documented, negative data rejected, auth enforced, nothing bad forwarded."""
        operation = fuzz.schema[path][method]
        strategy = operation.as_strategy(generation_mode=mode)
        known = fuzz.known_path_parameters(path)
        if known is not None:
            strategy = st.one_of(strategy, operation.as_strategy(generation_mode=mode, path_parameters=known))
        if path in (SUBMIT, VALIDATE):  # valid bodies too, so that submissions get past validation to the upstream
            valid = [operation.as_strategy(generation_mode=mode, body=body, media_type=JSON) for body in SEEDS.values()]
            strategy = st.one_of(strategy, *valid)
        checks = list(RESPONSE_CHECKS)
        if mode is GenerationMode.NEGATIVE:
            # /gateway/validate answers an invalid body with 200 and a verdict: there, the verdict is the rejection.
            checks.append(verdict_rejects if path == VALIDATE else negative_data_rejection)
        count = examples()

        @settings(
            max_examples=count,
            derandomize=count == DEFAULT_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy, auth=st.sampled_from(fuzz.credentials(method, path)))
        def run(case: Any, auth: dict[str, str]) -> None:
            seen = len(fuzz.upstream.requests)
            response = case.call(headers=auth)
            case.validate_response(response, checks=checks, headers=auth)
            for forwarded in fuzz.upstream.requests[seen:]:
                check_forwarded(forwarded, fuzz.client_key)

        run()


def verdict_rejects(ctx: Any, response: Any, case: Any) -> bool | None:
    """A body outside the description, sent to /gateway/validate: a 4xx, or a 200 verdict that says invalid.

    Cases whose only invalid part is elsewhere (extra headers, say) prove nothing about the verdict.
    """
    body = case.meta.components.get(ParameterLocation.BODY) if case.meta is not None else None
    if body is None or not body.mode.is_negative:
        return None
    if response.status_code == 200:
        verdict = response.json()
        assert verdict["valid"] is False, f"a body outside the description was judged valid: {case.body!r}"
    else:
        assert 400 <= response.status_code < 500, response.status_code
    return True


def check_forwarded(request: RecordedRequest, client_key: str) -> None:
    """What reached the upstream: the team key only, and a body the validator accepts."""
    assert request.header_values("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert client_key not in str(request.headers)
    if request.method == "POST":
        result = validate(request.json())
        assert result.valid, [p.as_dict() for p in result.problems]
