"""KeyAuthenticator's look-up of keys the table does not hold yet: found at once, misses cached, reads bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.auth.keyring import KeyAuthenticator, UnknownKey
from gateway.errors import AuthenticationFailed
from gateway.keys import KeyRecord, generate_secret, hash_secret, issue_key
from gateway.logs import make_logs


class SlowStore:
    """The two calls the look-up makes, counted; ``find_key_by_hash`` waits for ``gate``."""

    def __init__(self, records: list[KeyRecord]) -> None:
        self.records = {r.key_hash: r for r in records}
        self.finds = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def find_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        self.finds += 1
        await self.gate.wait()
        return self.records.get(key_hash)


def authenticator(store: Any) -> KeyAuthenticator:
    import io

    return KeyAuthenticator(store, log=make_logs(level="info", secrets=(), stream=io.StringIO()).log)


class TestLookUp:
    def test_a_new_key_is_found_and_then_known_without_the_store(self) -> None:
        secret, record = issue_key("fresh", now=0.0)
        store = SlowStore([record])
        keys = authenticator(store)

        async def run() -> None:
            with pytest.raises(UnknownKey) as caught:
                keys.authenticate(f"Bearer {secret}")
            principal = await keys.look_up(caught.value.key_hash)
            assert principal.name == "fresh"
            assert keys.authenticate(f"Bearer {secret}").name == "fresh"

        asyncio.run(run())
        assert store.finds == 1

    def test_a_miss_is_remembered(self) -> None:
        store = SlowStore([])
        keys = authenticator(store)
        key_hash = hash_secret(generate_secret())

        async def run() -> None:
            for _ in range(5):
                with pytest.raises(AuthenticationFailed):
                    await keys.look_up(key_hash)

        asyncio.run(run())
        assert store.finds == 1

    def test_reads_are_shared_per_key_and_bounded_across_keys(self) -> None:
        store = SlowStore([])
        store.gate.clear()
        keys = authenticator(store)
        hashes = [hash_secret(generate_secret()) for _ in range(10)]

        async def attempt(key_hash: str) -> str:
            try:
                await keys.look_up(key_hash)
            except AuthenticationFailed as exc:
                return exc.code
            return "ok"

        async def run() -> list[str]:
            same = [asyncio.create_task(attempt(hashes[0])) for _ in range(5)]
            others = [asyncio.create_task(attempt(h)) for h in hashes[1:]]
            await asyncio.sleep(0.01)
            reads_in_flight = store.finds
            store.gate.set()
            results = await asyncio.gather(*same, *others)
            assert reads_in_flight == 4
            return list(results)

        results = asyncio.run(run())
        assert results == ["invalid_api_key"] * 14
        assert store.finds == 4
