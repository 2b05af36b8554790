"""The gateway's own OpenAPI 3.0.3 description, served at ``GET /gateway/openapi.json`` (no auth).

``openapi_document(settings)`` describes every route the app serves *as configured*: the security each one
needs (client key, admin token, metrics token, or none in ``[auth] mode = "open"``), the bodies it reads, and
every status the gateway itself answers with, each error with the ``code`` values it can carry. A test compares
the documented paths and methods with the app's routes, and the schemathesis run (``tests/test_fuzz.py``)
checks every answer against this description, so it stays true.

Choices worth knowing:

- The generation body schema states the SPEC section 5 limits that a schema can state (types, ranges,
  lengths, enums, unknown fields); the rules across fields (``multi_prompt`` needs ``image``, durations
  add up, private media, ...) are the validator's, and a body this schema accepts may still be a 400.
- Upstream answers pass through unchanged (SPEC section 3): ``200`` of the upstream-compatible routes is
  the upstream's object, and the upstream's own error statuses and bodies are not described here.
- ``/v1/{path}`` (forwarding of other upstream paths) is described only when ``[proxy] passthrough`` is on;
  otherwise that route answers 404 to everything and offers no operation.
- Every operation lists the refusals any request can get before it is routed (a malformed, slow or oversized
  request head, a bad ``Host``, another HTTP version) and 500 ``internal_error``.
- Every operation but ``/healthz``, ``/readyz`` and ``/metrics`` may be refused at once with 503 ``overloaded``
  when the gateway is saturated; operations that call the upstream answer 503 ``upstream_unavailable`` while the
  circuit breaker is open, and those that use the store 503 ``store_unavailable`` when it fails.
- Every ``GET`` also answers ``HEAD`` (Starlette adds it); HEAD is not listed separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import __version__
from gateway.catalog import (
    ADMIN_TOKEN_CODES,
    ANY_ROUTE_CODES,
    ASPECT_RATIOS,
    CFG_SCALE_MAX,
    CFG_SCALE_MIN,
    CODES,
    DURATION_MAX,
    DURATION_MIN,
    ELEMENT_LIST_MAX,
    IDEMPOTENCY_KEY_SHAPE,
    JSON_BODY_CODES,
    KEY_NAME_SHAPE,
    MODELS,
    MULTI_PROMPT_MAX,
    NEGATIVE_PROMPT_MAX,
    PROMPT_MAX,
    REQUEST_ID_SHAPE,
    SHOT_PROMPT_MAX,
    SHOT_TYPE_ALIASES,
    SHOT_TYPES,
    TASK_ID_SHAPE,
    UPSTREAM_CALL_CODES,
    AccountState,
    Mode,
)
from gateway.config import Settings

OPENAPI_PATH: Final = "/gateway/openapi.json"
OPENAPI_VERSION: Final = "3.0.3"

_JSON: Final = "application/json"
_REF: Final = "#/components/schemas/"
_REQUEST_ID_PATTERN: Final = f"^{REQUEST_ID_SHAPE}$"
_KEY_NAME_PATTERN: Final = f"^{KEY_NAME_SHAPE}$"
# An integer-valued string for a duration in range, as the validator accepts it: "5", "+5", "05" (at most 12
# characters: longer digit strings are out of range by definition).
_DURATION_STRING: Final = r"^\+?0*([3-9]|1[0-5])$"
_INT_STRING: Final = r"^[+-]?[0-9]+$"
_TASK_ID_PATTERN: Final = f"^{TASK_ID_SHAPE}$"
_IDEMPOTENCY_KEY_PATTERN: Final = f"^{IDEMPOTENCY_KEY_SHAPE}$"

_EXAMPLE_BODY: Final = {
    "model": "kling-v3-std-silent",
    "prompt": "A wide cinematic shot of a traveler walking through dusty desert ruins, cloak moving in the wind.",
    "aspect_ratio": "16:9",
    "duration": 5,
    "extra_body": {"cfg_scale": 0.5, "shot_type": "customize", "negative_prompt": "blur, low detail"},
}
_STATUS_TEXT: Final = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    408: "Request head too slow",
    409: "Conflict",
    413: "Body too large",
    414: "Request target too long",
    415: "Body is not JSON",
    416: "Range not satisfiable",
    422: "Unprocessable",
    429: "Too many requests",
    431: "Request headers too large",
    500: "Internal error",
    502: "Upstream unreachable or invalid",
    503: "Unavailable",
    504: "Upstream timed out",
    505: "HTTP version not supported",
}
# Gateway error statuses that carry Retry-After.
_RETRY_AFTER: Final = frozenset({409, 429, 503})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _string_array() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}}


# -- schemas ----------------------------------------------------------------------------------------------------


def _error_schemas() -> dict[str, Any]:
    problem = {
        "type": "object",
        "description": "One problem (or warning): where (a dotted path), which rule (a stable code), and what to do.",
        "required": ["param", "code", "message"],
        "properties": {"param": {"type": "string"}, "code": {"type": "string"}, "message": {"type": "string"}},
    }
    error = {
        "type": "object",
        "description": "Every gateway-made error (SPEC section 4), OpenAI-style so SDKs surface message and code.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code", "param", "request_id"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": "string"},
                    "param": _nullable({"type": "string"}),
                    "request_id": _nullable({"type": "string"}),
                    "errors": {"type": "array", "items": _ref("Problem")},
                },
            }
        },
    }
    return {"Problem": problem, "Error": error}


def _generation_schemas(settings: Settings) -> dict[str, Any]:
    """The Kling v3 body (SPEC section 5) as far as a schema can say it; the validator has the last word."""
    open_fields = settings.validation.allow_unknown_fields
    models = [*MODELS, *sorted(set(settings.validation.passthrough_models) - set(MODELS))]
    shot_duration = {
        "oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": _INT_STRING},
        ]
    }
    shot = {
        "type": "object",
        "required": ["index", "prompt", "duration"],
        "additionalProperties": open_fields,
        "properties": {
            "index": {"type": "integer", "minimum": 0, "description": "Unique within multi_prompt."},
            "prompt": {"type": "string", "minLength": 1, "maxLength": SHOT_PROMPT_MAX},
            "duration": shot_duration,
        },
    }
    element = {
        "type": "object",
        "required": ["element_id"],
        "additionalProperties": open_fields,
        "properties": {"element_id": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]}},
    }
    extra_fields = {
        "negative_prompt": {"type": "string", "maxLength": NEGATIVE_PROMPT_MAX},
        "cfg_scale": {"type": "number", "minimum": CFG_SCALE_MIN, "maximum": CFG_SCALE_MAX},
        "shot_type": {
            "type": "string",
            "enum": [*SHOT_TYPES, *SHOT_TYPE_ALIASES],
            "description": "'intelligence' is accepted and normalized to 'intelligent' (with a warning).",
        },
        "multi_prompt": {
            "type": "array",
            "minItems": 1,
            "maxItems": MULTI_PROMPT_MAX,
            "items": _ref("Shot"),
            "description": "Image mode only, not with last_image nor prompt; needs duration, which the shot "
            "durations must add up to.",
        },
        "element_list": {"type": "array", "maxItems": ELEMENT_LIST_MAX, "items": _ref("Element")},
    }
    generation = {
        "type": "object",
        "description": "A Kling v3 generation (SPEC section 5). Mode is derived: text (no image), image (image), "
        "first_last (image + last_image). The fields of extra_body may also be sent at the top level (the "
        "flattened form of OpenAI SDKs), but not in both places.",
        "required": ["model"],
        "additionalProperties": open_fields,
        "example": _EXAMPLE_BODY,
        "properties": {
            "model": {"type": "string", "enum": models},
            "prompt": {
                "type": "string",
                "minLength": 1,
                "maxLength": PROMPT_MAX,
                "description": "Required, except in image mode with multi_prompt (where it must be left out).",
            },
            "image": {"type": "string", "description": "Absolute http(s) URL of public media (first frame)."},
            "last_image": {"type": "string", "description": "Absolute http(s) URL of public media; needs image."},
            "aspect_ratio": {
                "type": "string",
                "enum": list(ASPECT_RATIOS),
                "description": "Not guaranteed in image modes (a warning says so).",
            },
            "duration": {
                "oneOf": [
                    {"type": "integer", "minimum": DURATION_MIN, "maximum": DURATION_MAX},
                    {"type": "string", "maxLength": 12, "pattern": _DURATION_STRING},
                ],
                "description": f"Seconds, {DURATION_MIN}-{DURATION_MAX}; an integer-valued string is accepted.",
            },
            "extra_body": _ref("ExtraBody"),
            **extra_fields,
        },
    }
    return {
        "GenerationRequest": generation,
        "ExtraBody": {"type": "object", "additionalProperties": open_fields, "properties": extra_fields},
        "Shot": shot,
        "Element": element,
        "UpstreamTask": {
            "type": "object",
            "description": "The upstream's answer, passed through unchanged.",
            "properties": {"id": {"type": "string"}, "task_id": {"type": "string"}, "status": {"type": "string"}},
            "additionalProperties": True,
        },
    }


def _gateway_schemas() -> dict[str, Any]:
    estimate = {
        "type": "object",
        "required": ["seconds", "usd", "duration_defaulted", "priced", "mode", "tier", "audio"],
        "properties": {
            "seconds": {"type": "integer"},
            "usd": {"type": "string", "description": "USD, 4 decimal places."},
            "duration_defaulted": {"type": "boolean"},
            "priced": {"type": "boolean"},
            "mode": {"type": "string", "enum": [mode.value for mode in Mode]},
            "tier": _nullable({"type": "string"}),
            "audio": _nullable({"type": "boolean"}),
        },
    }
    verdict = {
        "type": "object",
        "required": ["valid", "errors", "warnings", "normalized", "estimate"],
        "properties": {
            "valid": {"type": "boolean"},
            "errors": {"type": "array", "items": _ref("Problem")},
            "warnings": {"type": "array", "items": _ref("Problem")},
            "normalized": _nullable({"type": "object", "description": "The body as it would be forwarded."}),
            "estimate": _nullable(_ref_wrapped("Estimate")),
        },
    }
    task = {
        "type": "object",
        "required": ["task_id", "key", "model", "mode", "status", "submitted_at", "estimate", "outcome", "settled"],
        "properties": {
            "task_id": {"type": "string"},
            "key": {"type": "string"},
            "model": {"type": "string"},
            "mode": {"type": "string"},
            "tier": {"type": "string"},
            "audio": {"type": "boolean"},
            "duration": _nullable({"type": "integer"}),
            "duration_defaulted": {"type": "boolean"},
            "status": {"type": "string"},
            "progress": _nullable({"type": "number"}),
            "submitted_at": {"type": "number", "description": "Unix seconds."},
            "estimate": {
                "type": "object",
                "required": ["seconds", "usd"],
                "properties": {"seconds": {"type": "integer"}, "usd": {"type": "string"}},
            },
            "outcome": _nullable({"type": "string"}),
            "settled": _nullable(
                {
                    "type": "object",
                    "required": ["seconds", "usd", "at"],
                    "properties": {
                        "seconds": {"type": "string"},
                        "usd": {"type": "string"},
                        "at": _nullable({"type": "number"}),
                    },
                }
            ),
            "request_id": {"type": "string"},
        },
    }
    key = {
        "type": "object",
        "description": "A client key as the admin API shows it: never the secret nor its hash.",
        "required": ["name", "prefix", "models", "rpm", "monthly_budget_usd", "created_at", "status"],
        "properties": {
            "name": {"type": "string"},
            "prefix": {"type": "string"},
            "models": _string_array(),
            "rpm": _nullable({"type": "integer"}),
            "monthly_budget_usd": _nullable({"type": "string"}),
            "webhook_url": _nullable({"type": "string"}),
            "created_at": {"type": "number"},
            "revoked_at": _nullable({"type": "number"}),
            "status": {"type": "string", "enum": ["active", "revoked"]},
            "previous_secret_valid_until": _nullable({"type": "number"}),
        },
    }
    issued = {
        "allOf": [
            _ref("Key"),
            {
                "type": "object",
                "required": ["key"],
                "properties": {"key": {"type": "string", "description": "The secret, shown this once."}},
            },
        ]
    }
    key_create: dict[str, Any] = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": _KEY_NAME_PATTERN},
            "models": {
                "description": "Model globs (a list, or one comma-separated string); empty or absent: every model.",
                "nullable": True,
                "oneOf": [{"type": "string"}, _string_array()],
            },
            "rpm": _nullable({"type": "integer", "minimum": 1}),
            "monthly_budget_usd": _nullable(
                {
                    "description": "A non-negative decimal amount: a number, or a decimal string such as '12.50'.",
                    "oneOf": [{"type": "number", "minimum": 0}, {"type": "string"}],
                }
            ),
            "webhook_url": _nullable({"type": "string", "description": "Public absolute http(s) callback URL."}),
        },
    }
    usage = {
        "type": "object",
        "required": ["since", "until", "group_by", "rows", "totals"],
        "properties": {
            "since": _nullable({"type": "string"}),
            "until": _nullable({"type": "string", "description": "Exclusive."}),
            "group_by": _string_array(),
            "rows": {"type": "array", "items": {"type": "object"}},
            "totals": {"type": "object"},
            "budget": {
                "type": "object",
                "description": "For a client key only: this UTC month's spend, the key's budget and what remains.",
                "properties": {
                    "month_start": {"type": "string"},
                    "spent_usd": {"type": "string"},
                    "monthly_budget_usd": _nullable({"type": "string"}),
                    "remaining_usd": _nullable({"type": "string"}),
                },
            },
        },
    }
    intent = {
        "type": "object",
        "required": ["intent_id", "key", "request_id", "model", "mode", "submitted_at"],
        "properties": {
            "intent_id": {"type": "string"},
            "key": {"type": "string"},
            "request_id": {"type": "string"},
            "model": {"type": "string"},
            "mode": {"type": "string"},
            "submitted_at": {"type": "number"},
            "account": {"type": "string", "description": "The upstream account it was sent on (check with its key)."},
        },
    }
    return {
        "Estimate": estimate,
        "Verdict": verdict,
        "Task": task,
        "TaskPage": {
            "type": "object",
            "required": ["data", "next_cursor"],
            "properties": {
                "data": {"type": "array", "items": _ref("Task")},
                "next_cursor": _nullable({"type": "string"}),
            },
        },
        "AuditPage": {
            "type": "object",
            "required": ["data", "next_cursor"],
            "properties": {
                "data": {"type": "array", "items": _ref("AuditEntry")},
                "next_cursor": _nullable({"type": "string"}),
            },
        },
        "AuditEntry": {
            "type": "object",
            "required": ["id", "at", "actor", "address", "action", "target", "changes"],
            "properties": {
                "id": {"type": "string"},
                "at": {"type": "number", "description": "Unix time of the action."},
                "actor": {"type": "string", "description": "admin-token, admin-ui, or cli:<OS user>."},
                "address": _nullable({"type": "string", "description": "The admin API or UI client's address."}),
                "action": {"type": "string", "description": "key.created, key.updated, key.revoked or key.rotated."},
                "target": {"type": "string", "description": "The key (or account) acted on."},
                "changes": {"type": "object", "description": "The settings set or changed; never a secret."},
            },
        },
        "Usage": usage,
        "Key": key,
        "IssuedKey": issued,
        "KeyCreate": key_create,
        "KeyUpdate": {
            "type": "object",
            "additionalProperties": False,
            "description": "Only the fields given change; null removes a limit (or the webhook).",
            "properties": {k: v for k, v in key_create["properties"].items() if k != "name"},
        },
        "KeyList": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "array", "items": _ref("Key")}},
        },
        "AccountList": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "name",
                            "state",
                            "in_flight",
                            "max_in_flight",
                            "weight",
                            "models",
                            "key_fingerprint",
                        ],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,32}$"},
                            "state": {"type": "string", "enum": [s.value for s in AccountState]},
                            "in_flight": {"type": "integer", "minimum": 0},
                            "max_in_flight": {"type": "integer", "minimum": 0, "description": "0: no limit"},
                            "weight": {"type": "number"},
                            "models": _string_array(),
                            "key_fingerprint": {
                                "type": "string",
                                "nullable": True,
                                "description": "First 8 hex digits of the key's SHA-256 (null for a removed account).",
                            },
                        },
                    },
                }
            },
        },
        "UnknownSubmissions": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "array", "items": intent}},
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
        },
        "Readiness": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["ready", "unavailable"]},
                "problems": _string_array(),
            },
        },
    }


def _ref_wrapped(name: str) -> dict[str, Any]:
    """A ``$ref`` that may take siblings (``nullable``): OpenAPI 3.0 ignores siblings of a bare ``$ref``."""
    return {"allOf": [_ref(name)]}


# -- parameters, headers, responses -----------------------------------------------------------------------------


def _components_headers() -> dict[str, Any]:
    return {
        "X-Request-ID": {
            "description": "The client's X-Request-ID if it was sane (1-128 of A-Za-z0-9._:@/+=-), else a new one.",
            "required": True,
            "schema": {"type": "string", "pattern": _REQUEST_ID_PATTERN},
        },
        "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}},
        "X-Cache": {
            "description": "Where the status came from.",
            "schema": {"type": "string", "enum": ["HIT", "MISS", "STALE"]},
        },
        "X-Gateway-Warning": {
            "description": "A validation or billing warning: '<code>: <message>'.",
            "schema": {"type": "string"},
        },
        "Idempotent-Replayed": {"description": "'true' on a replayed response.", "schema": {"type": "string"}},
    }


def _headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-ID", *names)}


def _json_response(description: str, schema: dict[str, Any], *headers: str) -> dict[str, Any]:
    return {"description": description, "headers": _headers(*headers), "content": {_JSON: {"schema": schema}}}


def _error(status: int, *codes: str) -> dict[str, Any]:
    """An error response whose ``error.code`` is one of ``codes``."""
    extra = ("Retry-After",) if status in _RETRY_AFTER else ()
    schema = {
        "allOf": [
            _ref("Error"),
            {
                "type": "object",
                "properties": {"error": {"type": "object", "properties": {"code": {"enum": list(codes)}}}},
            },
        ]
    }
    return _json_response(f"{_STATUS_TEXT[status]}: {', '.join(codes)}.", schema, *extra)


def _codes(*codes: str) -> dict[int, tuple[str, ...]]:
    """``codes`` grouped under the statuses the catalogue (``gateway.catalog.CODES``) gives them."""
    grouped: dict[int, tuple[str, ...]] = {}
    for code in codes:
        for status in CODES[code].statuses:
            grouped[status] = (*grouped.get(status, ()), code)
    return grouped


def _merge(*groups: Mapping[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
    merged: dict[int, tuple[str, ...]] = {}
    for group in groups:
        for status, codes in group.items():
            merged[status] = tuple(dict.fromkeys((*merged.get(status, ()), *codes)))
    return merged


def _responses(ok: Mapping[str, Any], errors: Mapping[int, tuple[str, ...]]) -> dict[str, Any]:
    """The success responses plus one error response per status, the codes any route can get included."""
    errors = _merge(errors, _ANY_ROUTE)
    out: dict[str, Any] = dict(ok)
    for status in sorted(errors):
        out[str(status)] = _error(status, *errors[status])
    return out


_ANY_ROUTE: Final = _codes(*ANY_ROUTE_CODES)
_JSON_BODY: Final = _codes(*JSON_BODY_CODES)
_STORE: Final = _codes("store_unavailable")
# 503 upstream_unavailable: the circuit breaker is open (fails fast, with Retry-After).
_UPSTREAM: Final = _codes(*UPSTREAM_CALL_CODES)
# Every route but /healthz, /readyz and /metrics may be refused at once when the gateway is saturated.
_OVERLOAD: Final = _codes("overloaded")


class _Doc:
    """Builds the operations for one configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        keys = settings.auth.mode == "keys"
        self.client_errors: dict[int, tuple[str, ...]] = _codes("invalid_api_key", "rate_limited") if keys else {}
        self.client_security: list[dict[str, list[str]]] = [{"gatewayKey": []}] if keys else [{}]
        admin_on = bool(settings.admin_token)
        # Without an admin token there is no admin API: every admin route answers 404 not_found.
        self.admin_errors: dict[int, tuple[str, ...]] = _codes(*ADMIN_TOKEN_CODES) if admin_on else _codes("not_found")

    def operation(
        self,
        op_id: str,
        summary: str,
        tag: str,
        responses: dict[str, Any],
        *,
        security: list[dict[str, list[str]]] | None = None,
        parameters: list[dict[str, Any]] | None = None,
        body: str | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "tags": [tag],
            "parameters": [{"$ref": "#/components/parameters/XRequestID"}, *(parameters or [])],
            "responses": responses,
            "security": security if security is not None else [],
        }
        if body is not None:
            op["requestBody"] = {"required": True, "content": {_JSON: {"schema": _ref(body)}}}
        return op

    def paths(self) -> dict[str, Any]:
        paths: dict[str, Any] = {
            "/v1/video/generations": {"post": self.submit()},
            "/v1/videos/{task_id}": {"get": self.status()},
            "/v1/videos/{task_id}/content": {"get": self.content()},
            "/gateway/validate": {"post": self.validate()},
            "/gateway/tasks": {"get": self.tasks()},
            "/gateway/usage": {"get": self.usage()},
            "/gateway/submissions/unknown": {"get": self.unknown_submissions()},
            "/gateway/accounts": {"get": self.accounts()},
            "/gateway/keys": {"get": self.list_keys(), "post": self.create_key()},
            "/gateway/keys/{name}": {
                "get": self.get_key(),
                "delete": self.revoke_key(),
                "patch": self.update_key(),
            },
            "/gateway/keys/{name}/rotate": {"post": self.rotate_key()},
            "/gateway/audit": {"get": self.audit()},
            "/metrics": {"get": self.metrics()},
            "/healthz": {"get": self.healthz()},
            "/readyz": {"get": self.readyz()},
            OPENAPI_PATH: {"get": self.openapi()},
        }
        if self.settings.proxy.passthrough:
            paths["/v1/{path}"] = self.passthrough()
        return paths

    # -- upstream-compatible ----------------------------------------------------------------------------------

    def submit(self) -> dict[str, Any]:
        errors = _merge(
            _JSON_BODY,
            _codes("invalid_request", "invalid_idempotency_key"),
            self.client_errors,
            _codes(
                "model_not_allowed",
                "idempotency_in_progress",
                "idempotency_conflict",
                "budget_exceeded",
                "upstream_capacity",
                "model_not_priced",
            ),
            _UPSTREAM,
            _STORE,
            _OVERLOAD,
        )
        ok = {
            "200": _json_response(
                "The upstream's answer, unchanged (its errors pass through with their own status and body).",
                _ref("UpstreamTask"),
                "X-Gateway-Warning",
                "Idempotent-Replayed",
            )
        }
        idempotency = {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "1-255 visible ASCII characters; a repeat with the same body replays the first answer.",
            "schema": {"type": "string", "pattern": _IDEMPOTENCY_KEY_PATTERN},
        }
        return self.operation(
            "submitGeneration",
            "Validate, authorize and forward a generation; record the task",
            "upstream",
            _responses(ok, errors),
            security=self.client_security,
            parameters=[idempotency],
            body="GenerationRequest",
        )

    def status(self) -> dict[str, Any]:
        errors = _merge(self.client_errors, _codes("task_not_found", "not_found"), _UPSTREAM, _STORE, _OVERLOAD)
        ok = {"200": _json_response("The task's status (cached, coalesced or fresh).", _ref("UpstreamTask"), "X-Cache")}
        task_id = {
            "name": "task_id",
            "in": "path",
            "required": True,
            "description": "Ids of another shape are unknown (404), like another key's tasks.",
            "schema": {"type": "string", "pattern": _TASK_ID_PATTERN},
        }
        return self.operation(
            "getVideoStatus",
            "A task's status; only the key that submitted it may see it",
            "upstream",
            _responses(ok, errors),
            security=self.client_security,
            parameters=[task_id],
        )

    def content(self) -> dict[str, Any]:
        errors = _merge(
            self.client_errors,
            {
                404: ("task_not_found", "not_found"),
                409: ("video_not_ready",),
                416: ("range_not_satisfiable",),
                502: ("video_unavailable",),
            },
            _UPSTREAM,
            _STORE,
            _OVERLOAD,
        )
        video = {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}
        plain = {"schema": {"type": "string"}}
        headers = {
            **_headers(),
            "ETag": {"description": "The archived copy's SHA-256, or the origin's validator.", **plain},
            "Accept-Ranges": {"description": "bytes", **plain},
        }
        ok = {
            "200": {"description": "The whole video (HEAD: its headers only).", "headers": headers, "content": video},
            "206": {
                "description": "One byte range of it.",
                "headers": {**headers, "Content-Range": {"description": "bytes a-b/size", **plain}},
                "content": video,
            },
            "304": {
                "description": "If-None-Match named the video's ETag: the client's copy is current.",
                "headers": headers,
            },
        }
        if_none_match = {
            "name": "If-None-Match",
            "in": "header",
            "required": False,
            "description": "Entity tags the client holds; one matching the video's ETag (or *) gets 304.",
            "schema": {"type": "string"},
        }
        rng = {
            "name": "Range",
            "in": "header",
            "required": False,
            "description": "One byte range (bytes=a-b, a- or -n); several ranges are answered with the whole video.",
            "schema": {"type": "string"},
        }
        task_id = {
            "name": "task_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": _TASK_ID_PATTERN},
        }
        return self.operation(
            "getVideoContent",
            "The task's video: from the archive, else its video_url (credentials only to the upstream's origin)",
            "upstream",
            _responses(ok, errors),
            security=self.client_security,
            parameters=[task_id, rng, if_none_match],
        )

    def passthrough(self) -> dict[str, Any]:
        path = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
        ok = {"200": {"description": "The upstream's answer, unchanged.", "headers": _headers()}}
        errors = _merge(
            self.client_errors,
            _codes("invalid_path", "task_not_found", "payload_too_large", "invalid_content_length", "incomplete_body"),
            _codes("unsupported_encoding"),
            _UPSTREAM,
            _STORE,
            _OVERLOAD,
        )
        return {
            method: self.operation(
                f"passthrough{method.capitalize()}",
                "Any other /v1/... path, forwarded with the upstream key ([proxy] passthrough = true)",
                "upstream",
                _responses(ok, errors),
                security=self.client_security,
                parameters=[path],
            )
            for method in ("get", "post", "put", "patch", "delete")
        }

    # -- the gateway's own ------------------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        errors = _merge(_JSON_BODY, self.client_errors, _OVERLOAD)
        ok = {
            "200": _json_response(
                "The verdict: every problem and warning, the normalized body, the estimate.", _ref("Verdict")
            )
        }
        return self.operation(
            "validateGeneration",
            "Validate a generation body and estimate its cost; never forwards",
            "gateway",
            _responses(ok, errors),
            security=self.client_security,
            body="GenerationRequest",
        )

    def either_security(self) -> list[dict[str, list[str]]]:
        """The caller's own view with a client key, everyone's with the admin token."""
        return [*self.client_security, {"adminToken": []}]

    def tasks(self) -> dict[str, Any]:
        params = [
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
            _query("cursor", {"type": "string"}, "The next_cursor of the previous page."),
        ]
        errors = _merge(_codes("invalid_parameter", "invalid_cursor"), self.client_errors, _STORE, _OVERLOAD)
        ok = {
            "200": _json_response("The caller's tasks, newest first (the admin token: everyone's).", _ref("TaskPage"))
        }
        return self.operation(
            "listTasks",
            "Tasks with their last known status and cost",
            "gateway",
            _responses(ok, errors),
            security=self.either_security(),
            parameters=params,
        )

    def usage(self) -> dict[str, Any]:
        period = "A date (YYYY-MM-DD, UTC), an ISO-8601 time, or an age such as 30m, 24h, 7d, 2w."
        params = [
            _query("since", {"type": "string"}, period),
            _query("until", {"type": "string"}, period + " A date includes that whole day."),
            _query("by", {"type": "string"}, "Comma-separated grouping: key, model, mode, day."),
        ]
        errors = _merge(_codes("invalid_parameter"), self.client_errors, _STORE, _OVERLOAD)
        ok = {"200": _json_response("Usage and cost (the admin token: everyone's).", _ref("Usage"))}
        return self.operation(
            "getUsage",
            "Usage and cost report from the ledger",
            "gateway",
            _responses(ok, errors),
            security=self.either_security(),
            parameters=params,
        )

    # -- admin ------------------------------------------------------------------------------------------------

    def admin(
        self,
        op_id: str,
        summary: str,
        ok: dict[str, Any],
        errors: Mapping[int, tuple[str, ...]] | None = None,
        *,
        parameters: list[dict[str, Any]] | None = None,
        body: str | None = None,
    ) -> dict[str, Any]:
        merged = _merge(self.admin_errors, errors or {}, _STORE, _OVERLOAD)
        return self.operation(
            op_id,
            summary,
            "admin",
            _responses(ok, merged),
            security=[{"adminToken": []}],
            parameters=parameters,
            body=body,
        )

    def unknown_submissions(self) -> dict[str, Any]:
        ok = {
            "200": _json_response(
                "Submissions sent upstream whose outcome was never recorded.", _ref("UnknownSubmissions")
            )
        }
        return self.admin("listUnknownSubmissions", "Submissions to reconcile with the upstream", ok)

    def accounts(self) -> dict[str, Any]:
        ok = {"200": _json_response("The upstream accounts (never key material).", _ref("AccountList"))}
        return self.admin("listAccounts", "Upstream accounts: state, tasks in flight, limit", ok)

    def list_keys(self) -> dict[str, Any]:
        return self.admin("listKeys", "Every client key", {"200": _json_response("The keys.", _ref("KeyList"))})

    def create_key(self) -> dict[str, Any]:
        errors = _merge(
            _JSON_BODY,
            _codes(
                "unknown_field", "missing_field", "invalid_type", "invalid_key_request", "key_exists", "key_revoked"
            ),
        )
        ok = {"201": _json_response("The new key, with its secret (shown this once).", _ref("IssuedKey"))}
        return self.admin("createKey", "Issue a client key", ok, errors, body="KeyCreate")

    def get_key(self) -> dict[str, Any]:
        ok = {"200": _json_response("The key.", _ref("Key"))}
        return self.admin(
            "getKey", "One client key", ok, _codes("key_not_found", "not_found"), parameters=[_name_param()]
        )

    def update_key(self) -> dict[str, Any]:
        errors = _merge(
            _JSON_BODY,
            _codes("unknown_field", "invalid_type", "invalid_key_request", "key_not_found", "not_found", "key_revoked"),
        )
        ok = {"200": _json_response("The key as changed (in force in every process within a second).", _ref("Key"))}
        return self.admin(
            "updateKey",
            "Change a key's models, rpm, budget or webhook",
            ok,
            errors,
            parameters=[_name_param()],
            body="KeyUpdate",
        )

    def revoke_key(self) -> dict[str, Any]:
        ok = {"200": _json_response("The key, revoked (revoking twice is not an error).", _ref("Key"))}
        return self.admin(
            "revokeKey", "Revoke a key at once", ok, _codes("key_not_found", "not_found"), parameters=[_name_param()]
        )

    def rotate_key(self) -> dict[str, Any]:
        grace = _query(
            "grace_s",
            {"type": "integer", "minimum": 0, "maximum": 30 * 86400},
            "Seconds the old secret stays valid (default [auth] rotation_grace_s).",
        )
        ok = {"200": _json_response("The key with its new secret (shown this once).", _ref("IssuedKey"))}
        errors = _codes("invalid_parameter", "key_not_found", "not_found", "key_revoked")
        return self.admin("rotateKey", "A new secret for a key", ok, errors, parameters=[_name_param(), grace])

    def audit(self) -> dict[str, Any]:
        params = [
            _query(
                "since",
                {"type": "string"},
                "A date (YYYY-MM-DD, UTC), an ISO-8601 time, or an age such as 30m, 24h, 7d, 2w.",
            ),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
            _query("cursor", {"type": "string"}, "The next_cursor of the previous page."),
        ]
        ok = {"200": _json_response("Admin actions, newest first (never a secret).", _ref("AuditPage"))}
        errors = _codes("invalid_parameter", "invalid_cursor")
        return self.admin("listAudit", "The audit trail of key (and account) changes", ok, errors, parameters=params)

    # -- operations ---------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        token = bool(self.settings.metrics.token)
        ok = {
            "200": {
                "description": "Prometheus text exposition.",
                "headers": _headers(),
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
        errors = _codes("invalid_metrics_token") if token else {}
        return self.operation(
            "getMetrics",
            "Prometheus metrics",
            "ops",
            _responses(ok, errors),
            security=[{"metricsToken": []}] if token else [],
        )

    def healthz(self) -> dict[str, Any]:
        ok = {"200": _json_response("The process is alive.", _ref("Health"))}
        return self.operation("getHealth", "Liveness", "ops", _responses(ok, {}))

    def readyz(self) -> dict[str, Any]:
        responses = {
            "200": _json_response("The store and configuration are usable.", _ref("Readiness")),
            "503": _json_response(
                "Not ready (store unavailable, shutting down); problems says why.", _ref("Readiness")
            ),
        }
        return self.operation("getReadiness", "Readiness", "ops", _responses(responses, {}))

    def openapi(self) -> dict[str, Any]:
        ok = {"200": _json_response("This document.", {"type": "object"})}
        return self.operation("getOpenapi", "This OpenAPI description", "ops", _responses(ok, _OVERLOAD))


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        param["description"] = description
    return param


def _name_param() -> dict[str, Any]:
    return {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": _KEY_NAME_PATTERN}}


def markdown_of(docstring: str) -> str:
    """A docstring's reStructuredText as Markdown: ``code`` -> `code`, *emphasis* kept, lines joined per paragraph."""
    text = docstring.replace("``", "`")
    paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in text.strip().split("\n\n")]
    return "\n\n".join(p.replace(" - ", "\n- ") if p.startswith("- ") else p for p in paragraphs)


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.0.3 description of the gateway as ``settings`` configure it (a fresh, JSON-ready dict)."""
    doc = _Doc(settings)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "kling-gateway",
            "version": __version__,
            "description": markdown_of(__doc__.split("\n\n", 1)[1] if __doc__ else ""),
        },
        "tags": [
            {"name": "upstream", "description": "UniAll-compatible: same paths and bodies; answers pass through."},
            {"name": "gateway", "description": "The gateway's own API for clients."},
            {"name": "admin", "description": "Key management and ledger views; admin token only."},
            {"name": "ops", "description": "Metrics, health, readiness and this document."},
        ],
        "paths": doc.paths(),
        "components": {
            "securitySchemes": {
                "gatewayKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "gk_ + 43 URL-safe characters + 6-character checksum",
                    "description": "A client key issued by the gateway (kling-gateway keys create).",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "KLING_GATEWAY_ADMIN_TOKEN; unset means no admin API (404).",
                },
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "[metrics] token, if set."},
            },
            "schemas": {**_error_schemas(), **_generation_schemas(settings), **_gateway_schemas()},
            "parameters": {
                "XRequestID": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "Echoed (and sent upstream) when sane; otherwise replaced by a new id.",
                    "schema": {"type": "string"},
                }
            },
            "headers": _components_headers(),
        },
    }


def openapi_route(document: Mapping[str, Any]) -> Route:
    """``GET /gateway/openapi.json``: the document, serialized once, no auth."""
    body = orjson.dumps(document)

    async def serve(request: Request) -> Response:
        return Response(body, media_type=_JSON)

    return Route(OPENAPI_PATH, serve, methods=["GET"])
