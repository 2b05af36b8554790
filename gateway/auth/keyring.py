"""Gateway-key authentication from an in-memory table that follows the store.

Per request: parse ``Bearer gk_...``, check its format and checksum (a malformed key never costs a lookup), hash
it, look the hash up in a dict, and ask the record whether it accepts that hash now (revoked, rotated-out). The
store is never touched on the hot path. A refresher polls ``store.keys_version()`` every ``refresh_interval_s``
and reloads the table when it changed, so a revocation made by any process is in force everywhere within about
one interval (0.5 s by default); changes made through this process apply at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from gateway.auth.principal import Principal, bearer_token, invalid_key
from gateway.keys import KeyRecord, hash_secret, looks_like_key
from gateway.logs import Logger
from gateway.store.base import Store, StoreError

_KNOWN_TOKENS_MAX = 10_000


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
        if record is None or not record.accepts(key_hash, self._clock()):
            raise invalid_key()
        return self._principals[record.name]

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
