"""``Idempotency-Key`` on submissions: a repeat of a finished request answers as the first time did.

Per key and idempotency key the store holds one record: claimed (in flight: repeats get 409
``idempotency_in_progress``), finished (repeats replay the stored status, body and a few headers, with
``Idempotent-Replayed: true``) or released after a failure (the same key may be retried). A repeat with another
body is 422 ``idempotency_conflict``. A store failure while recording never masks the real answer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth.principal import Principal
from gateway.catalog import IDEMPOTENCY_KEY_SHAPE
from gateway.errors import Conflict, InvalidRequest, Unprocessable
from gateway.logs import Logger
from gateway.store.base import IdemKind, Store, StoreError
from gateway.web.bodies import encode_headers

_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_SHAPE)
_REPLAY_HEADERS = frozenset({"content-type", "x-gateway-warning", "retry-after"})


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (None without one; 400 ``invalid_idempotency_key`` when malformed)."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters.",
            code="invalid_idempotency_key",
            param="Idempotency-Key",
        )
    return value


class IdempotencyRecords:
    """Claims, finishes and releases idempotency records in the store."""

    def __init__(self, store: Store, *, clock: Callable[[], float], log: Logger) -> None:
        self._store = store
        self._clock = clock
        self._log = log

    async def claim(self, principal: Principal, idem_key: str, body: dict[str, Any]) -> Response | None:
        """None to go ahead; the stored response for a finished repeat; 409 while in flight; 422 for another body."""
        body_hash = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        state = await self._store.idempotency_begin(principal.name, idem_key, body_hash, self._clock())
        if state.kind is IdemKind.NEW:
            return None
        if state.kind is IdemKind.IN_FLIGHT:
            raise Conflict(
                "A request with this Idempotency-Key is still in flight; retry when it has finished.",
                code="idempotency_in_progress",
                headers={"Retry-After": "1"},
            )
        if state.kind is IdemKind.CONFLICT:
            raise Unprocessable(
                "This Idempotency-Key was already used with a different request body.",
                code="idempotency_conflict",
                param="Idempotency-Key",
            )
        response = Response(state.body, status_code=state.status or 200)
        response.raw_headers.extend(encode_headers(state.headers))
        response.raw_headers.append((b"idempotent-replayed", b"true"))
        return response

    async def release(self, principal: Principal, idem_key: str) -> None:
        """Forget the claim after a failure: the same key may be retried."""
        try:
            await self._store.idempotency_abandon(principal.name, idem_key)
        except StoreError as exc:  # the record expires into a takeover; never mask the real answer
            self._log.error("idempotency_release_failed", error=str(exc))

    async def finish(self, principal: Principal, idem_key: str, response: Response) -> None:
        """Store the answer for repeats (a 5xx is not stored: the claim is released instead)."""
        if response.status_code >= 500:
            await self.release(principal, idem_key)
            return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.raw_headers
            if k.decode("latin-1") in _REPLAY_HEADERS
        ]
        try:
            await self._store.idempotency_finish(
                principal.name, idem_key, response.status_code, headers, bytes(response.body)
            )
        except StoreError as exc:  # the client still gets its answer; repeats see 409 until takeover
            self._log.error("idempotency_store_failed", error=str(exc))
