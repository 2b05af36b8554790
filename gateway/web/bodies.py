"""Reading request bodies safely and writing JSON responses.

The body limit is checked twice: on the declared ``Content-Length`` (refused before reading a byte) and on the
bytes actually read (a chunked or lying client is cut off at the limit, never buffered past it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

JSON_TYPE = "application/json"


def is_json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/<x>+json``, any parameters (charset) allowed."""
    if not value:
        return False
    media_type = value.split(";", 1)[0].strip().lower()
    return media_type == JSON_TYPE or (media_type.startswith("application/") and media_type.endswith("+json"))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, or 413 when it is (or claims to be) larger than ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Content-Length is not a number.", code="invalid_content_length")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        # The client (or the HTTP parser, on a malformed body) ended the request early: its fault, not a 500.
        raise InvalidRequest(
            "The connection closed before the whole body arrived.", code="incomplete_body", param="body"
        ) from None
    return b"".join(chunks)


def unread_coding(content_encoding: str | None, transfer_encoding: str | None) -> str | None:
    """The header naming a coding the gateway would not undo (a gzip body would read as broken JSON), or None.

    >>> unread_coding("identity", "chunked"), unread_coding(None, "gzip, chunked")
    (None, 'Transfer-Encoding')
    """
    if content_encoding and any(c.strip().lower() not in ("", "identity") for c in content_encoding.split(",")):
        return "Content-Encoding"
    if transfer_encoding and any(c.strip().lower() not in ("", "chunked") for c in transfer_encoding.split(",")):
        return "Transfer-Encoding"
    return None


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """A JSON object body: 415 unless the content type is JSON, 400 unless it parses to an object."""
    if not is_json_content_type(request.headers.get("content-type")):
        raise UnsupportedMediaType(
            "Send the body as JSON with 'Content-Type: application/json'.", code="unsupported_media_type"
        )
    header = unread_coding(request.headers.get("content-encoding"), request.headers.get("transfer-encoding"))
    if header is not None:
        raise UnsupportedMediaType(
            f"Send the body uncompressed: this gateway does not decode {header} '{request.headers[header]}'.",
            code="unsupported_encoding",
            param=header.lower(),
        )
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json", param="body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.", code="invalid_json", param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The body must be a JSON object, got {_json_type(body)}.", code="invalid_body", param="body"
        )
    return body


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type=JSON_TYPE)


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The body is larger than the {max_bytes} bytes this gateway accepts.")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header pairs as ASGI raw headers (lower-case names, latin-1)."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
