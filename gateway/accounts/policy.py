"""Which account takes a submission, what state an account is in, and what an upstream refusal means: pure.

* An account *serves* a model when one of its ``models`` globs matches (none: every model).
* Its *load* is ``in_flight / (max_in_flight x weight)``; an account without a limit has load 0 (it always has
  room), and among equals the one with fewer tasks per unit of weight goes first, then the name.
* :func:`candidates` lists the accounts worth asking the store for a slot, least loaded first: serving the model,
  not unauthorized, not set aside, not removed. Accounts this process believes full come last rather than not at
  all: the store's count is the authority (another replica may have freed a slot), and asking costs one round trip.
* :func:`refusal` reads an upstream answer to a submission: 401/403 is ``unauthorized``; a 429 or Kling's code 1303
  ("parallel task over resource pack limit") anywhere in the error body is ``capacity`` (a 429 without it is
  ``rate_limited``). Anything else is not a refusal of the account and passes through to the client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.catalog import AccountState, RefusalReason
from gateway.keys import model_allowed

KLING_CAPACITY_CODE: Final = 1303
_CAPACITY_TEXT: Final = "parallel task over resource pack limit"
MAX_RETRY_AFTER_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class AccountView:
    """What the choice needs to know of one account at one moment."""

    name: str
    in_flight: int
    max_in_flight: int = 0
    weight: float = 1.0
    models: tuple[str, ...] = ()
    #: Set aside (after a capacity or rate refusal) until this time; 0 when not.
    set_aside_until: float = 0.0
    unauthorized: bool = False
    removed: bool = False

    def serves(self, model: str) -> bool:
        return model_allowed(self.models, model)

    @property
    def has_room(self) -> bool:
        return self.max_in_flight <= 0 or self.in_flight < self.max_in_flight

    @property
    def load(self) -> float:
        if self.max_in_flight <= 0:
            return 0.0
        return self.in_flight / (self.max_in_flight * self.weight)

    def state(self, now: float) -> AccountState:
        if self.removed:
            return AccountState.REMOVED
        if self.unauthorized:
            return AccountState.UNAUTHORIZED
        if self.set_aside_until > now or not self.has_room:
            return AccountState.FULL
        return AccountState.OK


def candidates(views: Iterable[AccountView], model: str, now: float, exclude: Iterable[str] = ()) -> list[str]:
    """Accounts to try for ``model``, in order: those with room by load, then those this process thinks full."""
    skip = set(exclude)
    usable = [
        v
        for v in views
        if v.name not in skip and not v.removed and not v.unauthorized and v.set_aside_until <= now and v.serves(model)
    ]
    usable.sort(key=lambda v: (not v.has_room, v.load, v.in_flight / v.weight, v.name))
    return [v.name for v in usable]


def refusal(status: int, body: bytes) -> RefusalReason | None:
    """What an upstream answer to a submission says about the account, or None if it is no refusal of it."""
    if status in (401, 403):
        return RefusalReason.UNAUTHORIZED
    if 400 <= status < 500 and _says_capacity(body):
        return RefusalReason.CAPACITY
    if status == 429:
        return RefusalReason.RATE_LIMITED
    return None


def _says_capacity(body: bytes) -> bool:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _CAPACITY_TEXT in body.decode("utf-8", "replace").lower()
    places = [parsed]
    if isinstance(parsed, dict):
        places.extend(value for value in (parsed.get("error"), parsed.get("data")) if isinstance(value, dict))
    for place in places:
        if not isinstance(place, dict):
            continue
        code = place.get("code")
        if code == KLING_CAPACITY_CODE or code == str(KLING_CAPACITY_CODE):
            return True
        message = place.get("message")
        if isinstance(message, str) and _CAPACITY_TEXT in message.lower():
            return True
    return False


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (delta-seconds form), capped at an hour; None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def capacity_retry_after(views: Iterable[AccountView], model: str, now: float, default_s: int) -> int:
    """Seconds a client should wait after 429 ``upstream_capacity``: the soonest an account serving ``model`` could
    take a task again. One full by its count, or set aside with tasks of its own in flight, may free a slot at any
    moment (a task ending): ``default_s``, the pace of the pollers and the settler. One set aside with nothing in
    flight here comes back only when its ``Retry-After`` passes, so waiting less would only be refused again.
    Unauthorized and removed accounts never come back by waiting."""
    soonest = float("inf")
    for v in views:
        if not v.serves(model) or v.removed or v.unauthorized:
            continue
        aside = v.set_aside_until - now
        if aside <= 0:
            soonest = min(soonest, float(default_s))  # full by its count (or free: raced with a release)
        elif v.in_flight > 0:
            soonest = min(soonest, float(default_s), aside)
        else:
            soonest = min(soonest, aside)
    if soonest == float("inf"):
        soonest = float(default_s)
    return max(1, min(math.ceil(MAX_RETRY_AFTER_S), math.ceil(soonest)))


def all_unauthorized(views: Iterable[AccountView], model: str) -> bool:
    """True when there are accounts serving ``model`` and the upstream rejected every one's key: waiting helps no
    client, only an operator replacing a key does (502 ``upstream_auth_failed`` rather than 429)."""
    serving = [v for v in views if v.serves(model) and not v.removed]
    return bool(serving) and all(v.unauthorized for v in serving)
