"""What to do about each code in ``gateway.catalog.CODES``: the "fix" column of the README's troubleshooting table.

A test fails when a catalogued code has no entry here (or an entry names no catalogued code).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

FIXES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "invalid_http_request": "Fix the client's HTTP: a proxy or hand-written client sent something not HTTP/1.1.",
        "invalid_host": "Send exactly one `Host` header.",
        "invalid_upgrade": "Do not ask to upgrade the connection (no WebSocket or h2c here).",
        "invalid_request": "Read `error.errors[]`: each entry names the field (`param`) and its own code below.",
        "invalid_json": "Send a valid JSON document (check quoting and trailing commas).",
        "invalid_body": "Send a JSON object (`{...}`), not an array, string or number.",
        "incomplete_body": "The client hung up mid-body; retry (with the same `Idempotency-Key`).",
        "invalid_content_length": "Let the HTTP library set `Content-Length`; do not set it by hand.",
        "invalid_idempotency_key": "Use 1-255 visible ASCII characters, e.g. a UUID.",
        "invalid_parameter": "Fix the query parameter named in `param` (the message says what it accepts).",
        "invalid_cursor": "Pass back `next_cursor` exactly as the previous page gave it, with the same query.",
        "invalid_key_request": "Fix the key field named in the message (name, rpm, budget, model globs, webhook).",
        "invalid_path": "Call pass-through paths in normal form: `/v1/` then plain segments (no `//`, `;`, "
        "percent-escapes or dot segments).",
        "string_too_long": "Shorten the field named in `param`; the README lists each string's limit.",
        "model_not_priced": "Configure a price for the pass-through model (`[pricing.prices]`), or use a key "
        "without a monthly budget.",
        "upstream_auth_failed": "An operator problem, not your key: UniAll rejected the team's upstream key; "
        "replace it (`kling-gateway accounts` shows each account's fingerprint and state).",
        "invalid_api_key": "Send `Authorization: Bearer gk_...` with a current key; `keys list` shows revoked ones, "
        "`keys rotate` issues a new secret.",
        "invalid_admin_token": "Send `Authorization: Bearer $KLING_GATEWAY_ADMIN_TOKEN` (the gateway's own value).",
        "invalid_metrics_token": "Configure the scraper with the `[metrics] token` bearer token.",
        "model_not_allowed": "Use a model the key allows, or widen it: `keys update NAME --models ...`.",
        "task_not_found": "Poll with the key that submitted the task; check the task id.",
        "key_not_found": "Check the name with `keys list`.",
        "not_found": "Check the path (submissions go to `POST /v1/video/generations`); the admin API needs "
        "`KLING_GATEWAY_ADMIN_TOKEN` set on the gateway.",
        "method_not_allowed": "Use the method in the `Allow` header.",
        "idempotency_in_progress": "Wait for the first request with this `Idempotency-Key` to finish, then retry.",
        "key_exists": "Pick another name, or `keys rotate NAME` for a new secret.",
        "key_revoked": "Issue a key under a new name; a revoked key cannot be brought back.",
        "payload_too_large": "Send media as URLs, not inline; the limit is `[server] max_body_bytes`.",
        "unsupported_media_type": "Send `Content-Type: application/json`.",
        "unsupported_encoding": "Send the body uncompressed (gzip and deflate are decoded; others are not).",
        "idempotency_conflict": "Use a new `Idempotency-Key` for a different body.",
        "request_timeout": "Send the request head promptly; a slow proxy or client stalled.",
        "uri_too_long": "Shorten the URL (put data in the body).",
        "headers_too_large": "Send fewer or smaller headers (large cookies?); limit `[server] max_header_bytes`.",
        "http_version_not_supported": "Use HTTP/1.1.",
        "rate_limited": "Wait `Retry-After` seconds; raise the key's limit with `keys update NAME --rpm N`.",
        "budget_exceeded": "The key's monthly budget is spent: `GET /gateway/usage` shows it; raise it with "
        "`keys update NAME --monthly-budget USD`, or wait for the next UTC month.",
        "internal_error": "A gateway bug: report it with the `request_id`; the log line has the details.",
        "upstream_unavailable": "The upstream is down or refusing; retry after `Retry-After`; check "
        "`kling_gateway_upstream_errors_total` and the upstream's status.",
        "overloaded": "Retry after `Retry-After`; add workers or replicas if it persists.",
        "store_unavailable": "Check the store (SQLite disk, PostgreSQL server); nothing was forwarded, retry.",
        "upstream_timeout": "Retry (with the same `Idempotency-Key`); check the upstream's latency.",
        "missing_field": "Add the field named in `param`.",
        "invalid_type": "Send the field named in `param` with the JSON type the message says.",
        "unknown_field": "Remove or rename the field (the message suggests the closest known name).",
        "duplicate_field": "Send the field once: either at the top level or inside `extra_body`.",
        "unknown_model": "Use one of kling-v3-std-silent, kling-v3-std-audio, kling-v3-pro-silent, "
        "kling-v3-pro-audio (or a configured pass-through model).",
        "empty_prompt": "Write a prompt.",
        "prompt_too_long": "Shorten the prompt to 2500 characters.",
        "prompt_with_multi_prompt": "In image mode with `multi_prompt`, drop the top-level `prompt`.",
        "multi_prompt_requires_image": "Add `image`, or use a single prompt.",
        "multi_prompt_with_last_image": "Drop `last_image` or `multi_prompt`: they do not combine.",
        "multi_prompt_count": "Send 1 to 6 shots.",
        "multi_prompt_index_out_of_range": "Number shots from 0.",
        "duplicate_index": "Give each shot its own index.",
        "multi_prompt_prompt_too_long": "Shorten the shot's prompt to 512 characters.",
        "multi_prompt_duration_out_of_range": "Give each shot at least 1 second.",
        "multi_prompt_duration_mismatch": "Make the shot durations add up to `duration`.",
        "duration_out_of_range": "Use a whole number of seconds from 3 to 15.",
        "invalid_enum": "Use one of the values the message lists (it suggests the closest).",
        "invalid_url": "Use an absolute `http(s)://` URL with a real host name.",
        "last_image_requires_image": "Add `image` (the first frame) or drop `last_image`.",
        "private_media_url": "Host the media where the upstream can fetch it (a public URL without credentials).",
        "negative_prompt_too_long": "Shorten `negative_prompt` to 2500 characters.",
        "cfg_scale_out_of_range": "Use a `cfg_scale` from 0 to 1.",
        "element_list_too_long": "Send at most 3 elements.",
        "aspect_ratio_not_guaranteed": "Nothing to fix: in image modes the image's shape decides.",
        "shot_type_normalized": "Send `intelligent` to silence the warning.",
        "duration_defaulted": "Send `duration` to be billed and estimated exactly.",
        "upstream_capacity": "Retry after `Retry-After`; add upstream accounts or raise their limits "
        "(`kling-gateway accounts` shows them).",
        "video_unavailable": "Fetch the task's `video_url` before it expires, or enable the archive; raise "
        "`[content] max_bytes` for very large videos.",
        "too_many_auth_failures": "Wait `Retry-After`; fix the admin token the client sends.",
        "range_not_satisfiable": "Ask for a `Range` inside the video's size (`Content-Range: */size` gives it).",
        "video_not_ready": "Poll the task until `completed`, then fetch its content.",
        "csrf_failed": "Reload the admin page and submit the form again from the gateway's own origin.",
    }
)
