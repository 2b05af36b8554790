"""Gateway-key authentication from an in-memory table that follows the store.

Per request: parse ``Bearer gk_...``, check its format and checksum (a malformed key never costs a lookup), hash
it, look the hash up in a dict, and ask the record whether it accepts that hash now (revoked, rotated-out). A known
key never touches the store. A well-formed key (valid checksum) that the table does not hold yet is looked up in
the store once (``KeyAuthenticator.look_up``), so a key works everywhere as soon as the command or request that
created or rotated it returned; misses are remembered for a few seconds in a bounded cache and only a few
look-ups run at a time, so random well-formed keys cannot turn into a stream of store queries.
A refresher polls ``store.keys_version()`` every ``refresh_interval_s``
and reloads the table when it changed, so a revocation made by any process is in force everywhere within about
one interval (0.5 s by default); changes made through this process apply at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from gateway.auth.principal import Principal, bearer_token, invalid_key
from gateway.bounded import LRUCache
from gateway.errors import AuthenticationFailed
from gateway.keys import KeyRecord, hash_secret, looks_like_key
from gateway.logs import Logger
from gateway.store.base import Store, StoreError

_KNOWN_TOKENS_MAX = 10_000
_MISSES_MAX = 10_000
_MISS_TTL_S = 2.0
_LOOKUPS_AT_ONCE = 4


class UnknownKey(AuthenticationFailed):
    """A well-formed key the in-memory table does not hold: perhaps one created a moment ago (look it up)."""

    def __init__(self, key_hash: str) -> None:
        failure = invalid_key()
        super().__init__(failure.message, code=failure.code)
        self.key_hash = key_hash


def principal_of(record: KeyRecord) -> Principal:
    return Principal(
        name=record.name, models=record.models, rpm=record.rpm, monthly_budget_usd=record.monthly_budget_usd
    )


class KeyAuthenticator:
    def __init__(
        self,
        store: Store,
        *,
        log: Logger,
        refresh_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._log = log
        self._interval = refresh_interval_s
        self._clock = clock
        self._by_hash: dict[str, KeyRecord] = {}
        self._principals: dict[str, Principal] = {}
        self._records: dict[str, KeyRecord] = {}
        # Checksum and SHA-256 of a presented key, remembered per known key: both are a visible share of a
        # cached poll. Acceptance (revocation, rotation) is still decided by the record on every request.
        self._known_tokens: dict[str, str] = {}
        self._version: int | None = None
        self._misses: LRUCache[str, float] = LRUCache(_MISSES_MAX)
        self._lookups: dict[str, asyncio.Future[KeyRecord | None]] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise invalid_key()
        key_hash = self._known_tokens.get(token)
        if key_hash is None:
            if not looks_like_key(token):
                raise invalid_key()
            key_hash = hash_secret(token)
            if key_hash in self._by_hash:  # only real keys are remembered, so guessing cannot fill the memo
                if len(self._known_tokens) >= _KNOWN_TOKENS_MAX:
                    self._known_tokens.clear()
                self._known_tokens[token] = key_hash
        record = self._by_hash.get(key_hash)
        if record is None:
            raise UnknownKey(key_hash)
        if not record.accepts(key_hash, self._clock()):
            raise invalid_key()
        return self._principals[record.name]

    async def look_up(self, key_hash: str) -> Principal:
        """The key hashing to ``key_hash`` read from the store (401 unless it accepts it); added to the table.

        Misses are remembered for ``_MISS_TTL_S`` (bounded); concurrent requests with one key share one read, and
        at most ``_LOOKUPS_AT_ONCE`` different keys are read at a time (beyond that: 401 at once, never a queue).
        """
        missed_until = self._misses.peek(key_hash)
        if missed_until is not None and missed_until > time.monotonic():
            raise invalid_key()
        pending = self._lookups.get(key_hash)
        if pending is None:
            if len(self._lookups) >= _LOOKUPS_AT_ONCE:
                raise invalid_key()
            pending = asyncio.ensure_future(self._find(key_hash))
            self._lookups[key_hash] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(key_hash, None))
        record = await asyncio.shield(pending)
        if record is None or not record.accepts(key_hash, self._clock()):
            self._misses.put(key_hash, time.monotonic() + _MISS_TTL_S)
            raise invalid_key()
        return self._principals.get(record.name) or principal_of(record)

    async def _find(self, key_hash: str) -> KeyRecord | None:
        """Read one key from the store and put it in the table (None when unknown or the store fails)."""
        try:
            record = await self._store.find_key_by_hash(key_hash)
        except StoreError:
            return None
        if record is not None and not record.revoked:
            self._misses.pop(key_hash)
            self._add(record)
        return record

    def _add(self, record: KeyRecord) -> None:
        """Put one record in the table (replacing the one of that name), without waiting for the refresher."""
        by_hash = dict(self._by_hash)
        old = self._records.get(record.name)
        if old is not None:
            for stale in (old.key_hash, old.previous_hash):
                if stale is not None and by_hash.get(stale) is old:
                    del by_hash[stale]
        by_hash[record.key_hash] = record
        if record.previous_hash:
            by_hash[record.previous_hash] = record
        self._by_hash = by_hash
        self._principals = {**self._principals, record.name: principal_of(record)}
        self._records = {**self._records, record.name: record}

    def webhook_url(self, key_name: str) -> str | None:
        """The completion webhook registered for ``key_name`` (from the in-memory table)."""
        record = self._records.get(key_name)
        return record.webhook_url if record is not None else None

    def replace_all(self, records: Iterable[KeyRecord]) -> None:
        by_hash: dict[str, KeyRecord] = {}
        principals: dict[str, Principal] = {}
        by_name: dict[str, KeyRecord] = {}
        for record in records:
            if record.revoked:
                continue
            by_name[record.name] = record
            by_hash[record.key_hash] = record
            if record.previous_hash:
                by_hash[record.previous_hash] = record
            principals[record.name] = principal_of(record)
        # Swap whole dicts: a request in another task sees either the old table or the new one.
        self._by_hash, self._principals, self._records = by_hash, principals, by_name

    async def load(self) -> None:
        """Read every key now (start-up, and right after a change made through this process)."""
        version = await self._store.keys_version()
        self.replace_all(await self._store.list_keys())
        self._version = version

    async def refresh_if_changed(self) -> bool:
        version = await self._store.keys_version()
        if version == self._version:
            return False
        self.replace_all(await self._store.list_keys())
        self._version = version
        return True

    async def run(self) -> None:
        """Follow the store until cancelled; a failing store keeps the last good table (and logs once a minute)."""
        last_error = 0.0
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh_if_changed()
            except StoreError as exc:
                now = time.monotonic()
                if now - last_error > 60:
                    self._log.error("key_refresh_failed", error=str(exc))
                    last_error = now
