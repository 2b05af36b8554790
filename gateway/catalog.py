"""The gateway's domain words, each defined once: task statuses, models, modes, request limits and error codes.

Every other module imports these from here; this module imports nothing from ``gateway``, so it sits at the
bottom of the import graph. The values are the SPEC's (sections 4 and 5); ``CODES`` is the catalogue of every
``code`` the gateway can answer with, which the OpenAPI document and the README are checked against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Final

# -- upstream accounts ----------------------------------------------------------------------------------------

DEFAULT_ACCOUNT: Final = "default"
"""The account of ``UNIALL_API_KEY`` alone, and of every task recorded before accounts existed."""


class AccountState(StrEnum):
    """What ``GET /gateway/accounts`` says of an upstream account (SPEC section 9)."""

    OK = "ok"
    FULL = "full"
    UNAUTHORIZED = "unauthorized"
    REMOVED = "removed"


class RefusalReason(StrEnum):
    """Why the upstream refused a submission on an account (``kling_gateway_upstream_account_refusals_total``)."""

    CAPACITY = "capacity"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"


# -- task statuses -------------------------------------------------------------------------------------------


class TaskStatus(StrEnum):
    """Statuses a ledger task can have: the upstream's, plus ``unknown`` when the gateway gave up on it."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"


# The sets hold plain strings (the members' values), so they can be stored, labelled and serialized as they are.
TASK_STATUSES: Final = frozenset(status.value for status in TaskStatus)
TERMINAL: Final = frozenset({TaskStatus.COMPLETED.value, TaskStatus.FAILED.value})
"""Upstream statuses that settle a task (the outcomes ``Store.settle`` accepts; ``unknown`` is ``mark_unknown``'s)."""
PENDING: Final = frozenset({TaskStatus.QUEUED.value, TaskStatus.IN_PROGRESS.value})
"""Non-terminal statuses the ledger records; anything else the upstream invents is passed on but not recorded."""

# -- models and modes ----------------------------------------------------------------------------------------


class Mode(StrEnum):
    """What a generation starts from: a prompt only, a first frame, or a first and a last frame."""

    TEXT = "text"
    IMAGE = "image"
    FIRST_LAST = "first_last"


MODES: Final = tuple(mode.value for mode in Mode)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a Kling v3 model id says about the output: tier ``"std"`` or ``"pro"``, with or without audio.

    ``list_price_usd_per_s`` is the public list price, the default of ``[pricing.prices]``.
    """

    tier: str
    audio: bool
    list_price_usd_per_s: Decimal = Decimal(0)


MODELS: Final[Mapping[str, ModelInfo]] = MappingProxyType(
    {
        "kling-v3-std-silent": ModelInfo("std", False, Decimal("0.084")),
        "kling-v3-std-audio": ModelInfo("std", True, Decimal("0.126")),
        "kling-v3-pro-silent": ModelInfo("pro", False, Decimal("0.112")),
        "kling-v3-pro-audio": ModelInfo("pro", True, Decimal("0.168")),
    }
)

# -- request limits (SPEC section 5) -------------------------------------------------------------------------

PROMPT_MAX: Final = 2500
NEGATIVE_PROMPT_MAX: Final = 2500
SHOT_PROMPT_MAX: Final = 512
DURATION_MIN: Final = 3
DURATION_MAX: Final = 15
MULTI_PROMPT_MAX: Final = 6
ELEMENT_LIST_MAX: Final = 3
CFG_SCALE_MIN: Final = 0.0
CFG_SCALE_MAX: Final = 1.0
ELEMENT_ID_MAX: Final = 128
MEDIA_URL_MAX: Final = 2048
FIELD_NAME_MAX: Final = 64
STRING_MAX: Final = 4096
"""Any other string in a body (forwarded unknown fields, pass-through models' bodies) is bounded by this."""
ASPECT_RATIOS: Final = ("16:9", "9:16", "1:1")
SHOT_TYPES: Final = ("customize", "intelligent")
SHOT_TYPE_ALIASES: Final[Mapping[str, str]] = MappingProxyType({"intelligence": "intelligent"})
"""Spellings accepted for a shot type and forwarded as the right one (with a warning)."""

# -- identifier shapes (regular expressions, unanchored: use them with fullmatch) ------------------------------

REQUEST_ID_SHAPE: Final = r"[A-Za-z0-9._:@/+=\-]{1,128}"
"""An ``X-Request-ID`` the gateway keeps; any other is replaced by a new one."""
KEY_NAME_SHAPE: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
TASK_ID_SHAPE: Final = r"[A-Za-z0-9_][A-Za-z0-9._:\-]{0,199}"
"""A task id the gateway will look up (never ``.`` or ``..``); others are unknown (404)."""
IDEMPOTENCY_KEY_SHAPE: Final = r"[\x21-\x7e]{1,255}"

# -- the code catalogue --------------------------------------------------------------------------------------


class Where(StrEnum):
    """Where a code appears in an answer."""

    ERROR = "error"  # error.code of a gateway-made error body
    PROBLEM = "problem"  # error.errors[].code of a 400 invalid_request (validation)
    WARNING = "warning"  # X-Gateway-Warning / the verdict's warnings: the request still goes through


@dataclass(frozen=True, slots=True)
class Code:
    """One code the gateway answers with: the HTTP statuses it comes with, where it appears, and what it means."""

    code: str
    statuses: tuple[int, ...]
    where: frozenset[Where]
    meaning: str


_E: Final = frozenset({Where.ERROR})
_P: Final = frozenset({Where.PROBLEM})
_EP: Final = frozenset({Where.ERROR, Where.PROBLEM})
_W: Final = frozenset({Where.WARNING})

_CODES: Final = (
    # top-level error codes (error.code)
    Code("invalid_http_request", (400,), _E, "the request is not valid HTTP/1.1"),
    Code("invalid_host", (400,), _E, "an HTTP/1.1 request without Host, or with two"),
    Code("invalid_upgrade", (400,), _E, "an Upgrade request with a body (the gateway upgrades nothing)"),
    Code("invalid_request", (400,), _E, "the body failed validation; every problem is listed in errors[]"),
    Code("invalid_json", (400,), _EP, "the body is not valid JSON"),
    Code("invalid_body", (400,), _EP, "the body is not a JSON object"),
    Code("incomplete_body", (400,), _E, "the client ended the request before the whole body arrived"),
    Code("invalid_content_length", (400,), _E, "Content-Length is malformed or disagrees with the body"),
    Code("invalid_idempotency_key", (400,), _E, "Idempotency-Key is not 1-255 visible ASCII characters"),
    Code("invalid_parameter", (400,), _E, "a query parameter is malformed"),
    Code("invalid_cursor", (400,), _E, "the pagination cursor is malformed or from another query"),
    Code("invalid_key_request", (400,), _E, "a key administration body is malformed"),
    Code("invalid_path", (400,), _E, "a pass-through path or query not in normal form (//, ;, %-escapes, dots)"),
    Code("invalid_api_key", (401,), _E, "missing, malformed, unknown, revoked or rotated-out client key"),
    Code("invalid_admin_token", (401,), _E, "missing or wrong admin token"),
    Code("invalid_metrics_token", (401,), _E, "missing or wrong metrics token"),
    Code("model_not_allowed", (403,), _E, "the key may not use this model"),
    Code("csrf_failed", (403,), _E, "an admin UI form post without its session's CSRF token, or from another origin"),
    Code("task_not_found", (404,), _E, "unknown task, or another key's task (they look the same)"),
    Code("key_not_found", (404,), _E, "no key with this name"),
    Code("not_found", (404,), _E, "no such route (or the admin API is off)"),
    Code("method_not_allowed", (405,), _E, "the route does not answer this method"),
    Code("idempotency_in_progress", (409,), _E, "a request with this Idempotency-Key is still being handled"),
    Code("key_exists", (409,), _E, "a key with this name already exists"),
    Code("key_revoked", (409,), _E, "the key is revoked: it cannot be rotated or changed, and its name stays reserved"),
    Code("video_not_ready", (409,), _E, "the task's video was asked for before the task completed"),
    Code("payload_too_large", (413,), _E, "the body is over [server] max_body_bytes"),
    Code("unsupported_media_type", (415,), _E, "the body is not declared as JSON"),
    Code("unsupported_encoding", (415,), _E, "a Content-Encoding or transfer coding the gateway does not decode"),
    Code("idempotency_conflict", (422,), _E, "an Idempotency-Key reused with a different body"),
    Code("request_timeout", (408,), _E, "the request's head did not arrive within [server] header_timeout_s"),
    Code("uri_too_long", (414,), _E, "the request target alone is over [server] max_header_bytes"),
    Code("headers_too_large", (431,), _E, "request target plus headers over [server] max_header_bytes"),
    Code("http_version_not_supported", (505,), _E, "anything but HTTP/1.0 and HTTP/1.1"),
    Code("rate_limited", (429,), _E, "over the key's requests per minute (with Retry-After)"),
    Code("budget_exceeded", (429,), _E, "over the key's monthly budget (with Retry-After)"),
    Code("too_many_auth_failures", (429,), _E, "too many wrong admin tokens from this address (with Retry-After)"),
    Code("upstream_capacity", (429,), _E, "no upstream account serving the model has room (with Retry-After)"),
    Code("internal_error", (500,), _E, "the gateway failed to handle the request"),
    Code("range_not_satisfiable", (416,), _E, "the Range asked for lies outside the video (Content-Range: */size)"),
    Code("upstream_unavailable", (502, 503), _E, "the upstream cannot be reached (503: circuit breaker open)"),
    Code(
        "video_unavailable",
        (502,),
        _E,
        "the task's video may not be fetched (private or unusable URL), has expired, or is over [content] max_bytes",
    ),
    Code("overloaded", (503,), _E, "the gateway is saturated (with Retry-After)"),
    Code("store_unavailable", (503,), _E, "the ledger cannot be written, so nothing is forwarded"),
    Code(
        "upstream_auth_failed",
        (502,),
        _E,
        "the upstream rejected the team's upstream key (401/403), or every account's key for the model already",
    ),
    Code("upstream_timeout", (504,), _E, "the upstream did not answer in time"),
    # validation problem codes (error.errors[].code); the three shared with error.code are the key admin's
    Code("missing_field", (400,), _EP, "a required field is absent"),
    Code("invalid_type", (400,), _EP, "a field has the wrong JSON type (or a fractional duration)"),
    Code("unknown_field", (400,), _EP, "a field the gateway does not know (strict mode), with a did-you-mean hint"),
    Code("duplicate_field", (400,), _P, "a flattened field also sent inside extra_body"),
    Code("unknown_model", (400,), _P, "not a Kling v3 model id (nor a configured pass-through model)"),
    Code("empty_prompt", (400,), _P, "prompt (or a shot prompt) empty or only whitespace"),
    Code("prompt_too_long", (400,), _P, f"prompt over {PROMPT_MAX} characters"),
    Code("prompt_with_multi_prompt", (400,), _P, "prompt sent together with extra_body.multi_prompt in image mode"),
    Code("multi_prompt_requires_image", (400,), _P, "extra_body.multi_prompt without image"),
    Code("multi_prompt_with_last_image", (400,), _P, "extra_body.multi_prompt together with last_image"),
    Code("multi_prompt_count", (400,), _P, f"multi_prompt not 1 to {MULTI_PROMPT_MAX} shots"),
    Code("multi_prompt_index_out_of_range", (400,), _P, "a shot index below 0"),
    Code("duplicate_index", (400,), _P, "two shots with the same index"),
    Code("multi_prompt_prompt_too_long", (400,), _P, f"a shot prompt over {SHOT_PROMPT_MAX} characters"),
    Code("multi_prompt_duration_out_of_range", (400,), _P, "a shot duration below 1 second"),
    Code("multi_prompt_duration_mismatch", (400,), _P, "shot durations not adding up to duration"),
    Code("duration_out_of_range", (400,), _P, f"duration outside {DURATION_MIN} to {DURATION_MAX} seconds"),
    Code("invalid_enum", (400,), _P, "aspect_ratio or shot_type not an allowed value, with a did-you-mean hint"),
    Code("invalid_url", (400,), _P, "image / last_image not an absolute http(s) URL with a sane host"),
    Code("last_image_requires_image", (400,), _P, "last_image without image"),
    Code(
        "private_media_url",
        (400,),
        _P,
        "media on a private, loopback, link-local, reserved or special-use host, or with credentials in the URL",
    ),
    Code("negative_prompt_too_long", (400,), _P, f"negative_prompt over {NEGATIVE_PROMPT_MAX} characters"),
    Code("cfg_scale_out_of_range", (400,), _P, f"cfg_scale outside [{CFG_SCALE_MIN:g}, {CFG_SCALE_MAX:g}]"),
    Code("element_list_too_long", (400,), _P, f"more than {ELEMENT_LIST_MAX} elements"),
    Code(
        "string_too_long",
        (400,),
        _P,
        f"a string over its bound: element_id {ELEMENT_ID_MAX}, image / last_image {MEDIA_URL_MAX}, "
        f"a field name {FIELD_NAME_MAX}, any other {STRING_MAX} characters",
    ),
    Code("model_not_priced", (403,), _E, "a key with a budget asked for a pass-through model without a price"),
    # warnings: the request is accepted (200) and forwarded
    Code("aspect_ratio_not_guaranteed", (200,), _W, "aspect_ratio in an image mode may not be honoured"),
    Code("shot_type_normalized", (200,), _W, "shot_type 'intelligence' was forwarded as 'intelligent'"),
    Code("duration_defaulted", (200,), _W, "no duration given: the estimate assumed the default"),
)

CODES: Final[Mapping[str, Code]] = MappingProxyType({entry.code: entry for entry in _CODES})
"""Every ``code`` the gateway can answer with, by code."""

# Codes shared by a family of routes (the OpenAPI document lists them on each; a test checks it).
#: Any request, whatever its route: the listener's refusals (before routing) and the gateway failing.
ANY_ROUTE_CODES: Final = (
    "invalid_http_request",
    "invalid_host",
    "invalid_upgrade",
    "request_timeout",
    "uri_too_long",
    "headers_too_large",
    "http_version_not_supported",
    "internal_error",
)
#: A route that reads a JSON body.
JSON_BODY_CODES: Final = (
    "invalid_json",
    "invalid_body",
    "incomplete_body",
    "invalid_content_length",
    "payload_too_large",
    "unsupported_media_type",
    "unsupported_encoding",
)
#: A route that calls the upstream (503 upstream_unavailable: its circuit breaker is open).
UPSTREAM_CALL_CODES: Final = ("upstream_unavailable", "upstream_timeout", "upstream_auth_failed")
#: A route that needs the admin token (once it is set).
ADMIN_TOKEN_CODES: Final = ("invalid_admin_token", "too_many_auth_failures")


def codes_where(where: Where) -> tuple[str, ...]:
    """The codes that appear in ``where``, in catalogue order."""
    return tuple(entry.code for entry in _CODES if where in entry.where)
