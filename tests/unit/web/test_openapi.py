"""The OpenAPI description at /gateway/openapi.json: valid, served without auth, and true to the app's routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from support.harness import ADMIN_TOKEN, GatewayFactory
from support.seed_examples import SEEDS
from support.upstream_fake import FakeUpstream

from gateway.catalog import (
    ADMIN_TOKEN_CODES,
    ANY_ROUTE_CODES,
    JSON_BODY_CODES,
    UPSTREAM_CALL_CODES,
    Where,
    codes_where,
)
from gateway.config import Settings, load_settings
from gateway.validation.checks import ValidationOptions, validate
from gateway.web.openapi import OPENAPI_PATH, openapi_document
from gateway.web.routes import PASSTHROUGH_ROUTE

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DEFAULT_ENV = {"UNIALL_API_KEY": "sk-test", "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}


def settings_from(**env: str) -> Settings:
    """Settings as production loads them from the environment."""
    return load_settings(env={**DEFAULT_ENV, **env})


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Every documented (METHOD, path)."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in METHODS}


def served_operations(app: Starlette, settings: Settings) -> set[tuple[str, str]]:
    """Every (METHOD, path) the app routes, without the HEAD Starlette adds to each GET.

    The passthrough route counts only when ``[proxy] passthrough`` is on (otherwise it answers 404 to all).
    """
    served = set()
    for route in app.routes:
        if isinstance(route, Mount) and route.path == "/gateway/ui":
            continue  # the admin web UI: HTML pages for a browser, not part of the API the document describes
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__}: describe it in openapi.py"
        if route.path == PASSTHROUGH_ROUTE and not settings.proxy.passthrough:
            continue
        path = route.path.replace("{path:path}", "{path}")
        served |= {(method, path) for method in route.methods or () if method != "HEAD"}
    return served


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def body_validator(document: dict[str, Any]) -> jsonschema_rs.Validator:
    """A validator for the documented generation body (OpenAPI 3.0 schemas are a Draft 4 dialect)."""
    schema = {"$ref": "#/components/schemas/GenerationRequest", "components": document["components"]}
    return jsonschema_rs.Draft4Validator(schema)


class TestDocument:
    """The document itself."""

    def test_served_without_auth(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """GET /gateway/openapi.json needs no key and answers exactly openapi_document(settings)."""
        gw = make_gateway(fake_upstream.url, env={"KLING_GATEWAY_AUTH_MODE": "keys"})
        response = gw.client.get(OPENAPI_PATH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == openapi_document(gw.settings)

    @pytest.mark.parametrize(
        "env",
        [
            {},
            {"KLING_GATEWAY_AUTH_MODE": "open"},
            {"KLING_GATEWAY_PROXY_PASSTHROUGH": "true", "KLING_GATEWAY_METRICS_TOKEN": "m-token"},
            {"KLING_GATEWAY_ADMIN_TOKEN": "", "KLING_GATEWAY_VALIDATION_ALLOW_UNKNOWN_FIELDS": "true"},
        ],
    )
    def test_valid_openapi_3_0(self, env: dict[str, str]) -> None:
        """Every configuration's document passes the OpenAPI 3.0 meta-schema, and every $ref resolves."""
        document = openapi_document(settings_from(**env))
        assert document["openapi"] == "3.0.3"
        schemathesis.openapi.from_dict(document).validate()
        for ref in set(refs(document)):
            assert ref.startswith("#/"), ref
            node: Any = document
            for part in ref[2:].split("/"):
                node = node[part]

    def test_every_response_has_request_id(self) -> None:
        """Every documented response declares the X-Request-ID header the middleware adds to all answers."""
        document = openapi_document(settings_from())
        for path, item in document["paths"].items():
            for method, op in item.items():
                for status, response in op["responses"].items():
                    assert "X-Request-ID" in response["headers"], (method, path, status)

    def test_errors_use_the_error_shape(self) -> None:
        """Every documented 4xx/5xx except /readyz's 503 is the gateway's error body with its possible codes."""
        document = openapi_document(settings_from())
        for path, item in document["paths"].items():
            for method, op in item.items():
                for status, response in op["responses"].items():
                    if int(status) < 400 or path == "/readyz":
                        continue
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, (method, path, status)
                    codes = schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]
                    assert codes, (method, path, status)


class TestRoutes:
    """The documented operations are exactly the app's routes."""

    @pytest.mark.parametrize(
        "env",
        [
            {},
            {"KLING_GATEWAY_PROXY_PASSTHROUGH": "true"},
            {"KLING_GATEWAY_AUTH_MODE": "keys", "KLING_GATEWAY_ADMIN_TOKEN": ""},
        ],
    )
    def test_paths_and_methods_match(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory, env: dict[str, str]
    ) -> None:
        """Each route and method the app serves is documented, and nothing else is."""
        gw = make_gateway(fake_upstream.url, env=env)
        app = gw.client.app
        assert isinstance(app, Starlette)
        assert operations(openapi_document(gw.settings)) == served_operations(app, gw.settings)

    def test_passthrough_documented_only_when_on(self) -> None:
        """/v1/{path} appears with [proxy] passthrough = true, for the five forwarded methods."""
        assert "/v1/{path}" not in openapi_document(settings_from())["paths"]
        item = openapi_document(settings_from(KLING_GATEWAY_PROXY_PASSTHROUGH="true"))["paths"]["/v1/{path}"]
        assert sorted(item) == ["delete", "get", "patch", "post", "put"]


class TestConfiguration:
    """The document follows the settings it is built from."""

    def test_keys_mode_needs_a_key(self) -> None:
        """With client keys, client operations require the bearer key and document 401 invalid_api_key."""
        submit = openapi_document(settings_from())["paths"]["/v1/video/generations"]["post"]
        assert submit["security"] == [{"gatewayKey": []}]
        assert "401" in submit["responses"]

    def test_open_mode_needs_nothing(self) -> None:
        """In open mode client operations need no credentials and never answer 401."""
        submit = openapi_document(settings_from(KLING_GATEWAY_AUTH_MODE="open"))["paths"]["/v1/video/generations"]
        assert submit["post"]["security"] == [{}]
        assert "401" not in submit["post"]["responses"]

    def test_tasks_take_either_credential(self) -> None:
        """/gateway/tasks and /gateway/usage accept a client key (own view) or the admin token (everyone's)."""
        paths = openapi_document(settings_from())["paths"]
        for path in ("/gateway/tasks", "/gateway/usage"):
            assert paths[path]["get"]["security"] == [{"gatewayKey": []}, {"adminToken": []}]

    def test_no_admin_token_no_admin_api(self) -> None:
        """Without KLING_GATEWAY_ADMIN_TOKEN admin operations are documented as 404 not_found."""
        keys = openapi_document(settings_from(KLING_GATEWAY_ADMIN_TOKEN=""))["paths"]["/gateway/keys"]["get"]
        assert "401" not in keys["responses"]
        assert "not_found" in keys["responses"]["404"]["description"]

    def test_metrics_token(self) -> None:
        """/metrics is open by default and needs its token when [metrics] token is set."""
        assert openapi_document(settings_from())["paths"]["/metrics"]["get"]["security"] == []
        guarded = openapi_document(settings_from(KLING_GATEWAY_METRICS_TOKEN="m-token"))["paths"]["/metrics"]["get"]
        assert guarded["security"] == [{"metricsToken": []}]
        assert "invalid_metrics_token" in guarded["responses"]["401"]["description"]

    def test_unknown_fields_follow_the_setting(self) -> None:
        """The body schema refuses unknown fields in strict mode and allows them when they are forwarded."""
        strict = openapi_document(settings_from())["components"]["schemas"]["GenerationRequest"]
        lax = openapi_document(settings_from(KLING_GATEWAY_VALIDATION_ALLOW_UNKNOWN_FIELDS="true"))
        assert strict["additionalProperties"] is False
        assert lax["components"]["schemas"]["GenerationRequest"]["additionalProperties"] is True

    def test_passthrough_models_listed(self) -> None:
        """Configured pass-through models are documented model ids."""
        settings = settings_from(KLING_GATEWAY_VALIDATION_PASSTHROUGH_MODELS="veo-3.1")
        models = openapi_document(settings)["components"]["schemas"]["GenerationRequest"]["properties"]["model"]
        assert models["enum"][-1] == "veo-3.1"


# Error codes no operation can list, and why.
NOT_PER_OPERATION = {
    "csrf_failed": "the admin web UI's, which the document does not describe",
    "method_not_allowed": "the answer to a method no operation has",
}


def listed(operation: dict[str, Any]) -> set[str]:
    """Every error code an operation's responses list."""
    codes: set[str] = set()
    for status, response in operation["responses"].items():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        if int(status) >= 400 and "allOf" in schema:
            codes |= set(schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"])
    return codes


def every_operation(**env: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("METHOD path", operation)`` for each operation, with the optional routes on."""
    settings = settings_from(KLING_GATEWAY_PROXY_PASSTHROUGH="true", KLING_GATEWAY_METRICS_TOKEN="m-token", **env)
    for path, item in openapi_document(settings)["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


class TestErrorCodes:
    """The codes each operation lists, derived from the catalogue (``gateway.catalog``) where it can say."""

    def test_every_catalogued_error_code_is_listed_somewhere(self) -> None:
        seen = set().union(*(listed(operation) for _, operation in every_operation()))
        assert set(codes_where(Where.ERROR)) - set(NOT_PER_OPERATION) - seen == set()

    def test_what_any_request_can_get_is_on_every_operation(self) -> None:
        for name, operation in every_operation():
            assert set(ANY_ROUTE_CODES) - listed(operation) == set(), name

    def test_operations_calling_the_upstream_list_its_failures(self) -> None:
        """Every upstream-compatible operation calls the upstream: its key rejected (502 upstream_auth_failed)
        included."""
        upstream = [(name, op) for name, op in every_operation() if op["tags"] == ["upstream"]]
        assert len(upstream) == 3 + 5  # submit, status, content; the five pass-through methods
        for name, operation in upstream:
            assert set(UPSTREAM_CALL_CODES) - listed(operation) == set(), name

    def test_operations_reading_a_json_body_list_its_refusals(self) -> None:
        with_body = [(name, op) for name, op in every_operation() if "requestBody" in op]
        assert with_body
        for name, operation in with_body:
            assert set(JSON_BODY_CODES) - listed(operation) == set(), name

    def test_admin_operations_list_the_token_refusals(self) -> None:
        admin = [(name, op) for name, op in every_operation() if op["security"] == [{"adminToken": []}]]
        assert admin
        for name, operation in admin:
            assert set(ADMIN_TOKEN_CODES) - listed(operation) == set(), name
        for name, operation in every_operation(KLING_GATEWAY_ADMIN_TOKEN=""):
            if operation["security"] == [{"adminToken": []}]:
                assert "too_many_auth_failures" not in listed(operation), name  # no admin API: 404 only

    @pytest.mark.parametrize(
        ("operation", "codes"),
        [
            (
                "POST /v1/video/generations",
                {"upstream_capacity", "budget_exceeded", "model_not_priced", "model_not_allowed", "rate_limited"},
            ),
            ("GET /v1/videos/{task_id}", {"task_not_found", "rate_limited"}),
            (
                "GET /v1/videos/{task_id}/content",
                {"video_not_ready", "video_unavailable", "range_not_satisfiable", "task_not_found"},
            ),
            ("POST /v1/{path}", {"invalid_path", "task_not_found", "incomplete_body", "unsupported_encoding"}),
        ],
    )
    def test_route_specific_codes(self, operation: str, codes: set[str]) -> None:
        assert codes - listed(dict(every_operation())[operation]) == set()


# Bodies the schema refuses: the validator must refuse each too (the schema is never stricter than the gateway).
SCHEMA_REJECTS: list[dict[str, Any]] = [
    {"prompt": "no model"},
    {"model": "kling-v2", "prompt": "x"},
    {"model": "kling-v3-std-silent", "prompt": ""},
    {"model": "kling-v3-std-silent", "prompt": "x" * 2501},
    {"model": "kling-v3-std-silent", "prompt": "x", "duration": 2},
    {"model": "kling-v3-std-silent", "prompt": "x", "duration": 16},
    {"model": "kling-v3-std-silent", "prompt": "x", "duration": "16"},
    {"model": "kling-v3-std-silent", "prompt": "x", "duration": "+000000000005"},
    {"model": "kling-v3-std-silent", "prompt": "x", "duration": 5.5},
    {"model": "kling-v3-std-silent", "prompt": "x", "duration": True},
    {"model": "kling-v3-std-silent", "prompt": "x", "aspect_ratio": "4:3"},
    {"model": "kling-v3-std-silent", "prompt": "x", "image": 5},
    {"model": "kling-v3-std-silent", "prompt": "x", "sedonds": 5},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": []},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"cfg_scale": 1.5}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"cfg_scale": True}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"shot_type": "auto"}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"negative_prompt": "n" * 2501}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"element_list": [{"element_id": 1}] * 4}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"element_list": [{}]}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"element_list": [{"element_id": ""}]}},
    {"model": "kling-v3-std-silent", "prompt": "x", "extra_body": {"nope": 1}},
    {"model": "kling-v3-std-silent", "image": "https://example.com/a.png", "duration": 5, "multi_prompt": []},
    {
        "model": "kling-v3-std-silent",
        "image": "https://example.com/a.png",
        "duration": 5,
        "multi_prompt": [{"index": -1, "prompt": "a", "duration": 5}],
    },
    {
        "model": "kling-v3-std-silent",
        "image": "https://example.com/a.png",
        "duration": 5,
        "multi_prompt": [{"index": 0, "prompt": "a" * 513, "duration": 5}],
    },
    {
        "model": "kling-v3-std-silent",
        "image": "https://example.com/a.png",
        "duration": 5,
        "multi_prompt": [{"index": 0, "prompt": "a", "duration": 0}],
    },
    {
        "model": "kling-v3-std-silent",
        "image": "https://example.com/a.png",
        "duration": 5,
        "multi_prompt": [{"index": 0, "prompt": "a"}],
    },
]


class TestBodySchema:
    """The documented generation body against the validator."""

    @pytest.mark.parametrize("name", sorted(SEEDS))
    def test_seed_examples_conform(self, name: str) -> None:
        """Every example of the upstream page passes the documented schema (and the validator)."""
        assert body_validator(openapi_document(settings_from())).is_valid(SEEDS[name])
        assert validate(SEEDS[name]).valid

    @pytest.mark.parametrize("body", SCHEMA_REJECTS)
    def test_never_stricter_than_the_validator(self, body: dict[str, Any]) -> None:
        """A body the schema refuses is refused by the validator as well."""
        assert not body_validator(openapi_document(settings_from())).is_valid(body)
        assert not validate(body, ValidationOptions()).valid

    @pytest.mark.parametrize(
        "body",
        [
            {"model": "kling-v3-std-silent", "prompt": "x", "duration": "5"},
            {"model": "kling-v3-std-silent", "prompt": "x", "duration": "+05"},
            {"model": "kling-v3-std-silent", "prompt": "x", "shot_type": "intelligence", "cfg_scale": 0},
            {
                "model": "kling-v3-pro-audio",
                "image": "https://example.com/a.png",
                "duration": "6",
                "extra_body": {
                    "multi_prompt": [
                        {"index": 0, "prompt": "a", "duration": "2"},
                        {"index": 1, "prompt": "b", "duration": 4},
                    ],
                    "element_list": [{"element_id": "e1"}, {"element_id": 7}],
                },
            },
        ],
    )
    def test_accepted_forms_conform(self, body: dict[str, Any]) -> None:
        """The lenient forms the validator accepts (string durations, aliases, flattened fields) are documented."""
        assert validate(body).valid
        assert body_validator(openapi_document(settings_from())).is_valid(body)
