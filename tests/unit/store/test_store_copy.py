"""copy-store: a whole store (keys, tasks, intents) into an empty one, SQLite to PostgreSQL and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from test_store import T0, add_task, make_task

from gateway.cli.main import main
from gateway.keys import KeyRecord, new_secret
from gateway.store import open_store
from gateway.store.base import OutboxRecord, Store
from gateway.store.copy import DestinationNotEmpty, copy_store


def key(name: str, **changes: object) -> KeyRecord:
    record = KeyRecord(
        name=name,
        key_hash=new_secret().key_hash,
        prefix="gk_abcd",
        models=("kling-v3-std-*",),
        rpm=60,
        monthly_budget_usd=Decimal("25.50"),
        created_at=T0,
    )
    return replace(record, **changes)


async def fill(store: Store) -> None:
    """Keys (one revoked, one mid-rotation), pending and settled tasks with a final answer, and an open intent."""
    await store.create_key(key("team-a"))
    await store.create_key(key("gone", revoked_at=T0 + 5))
    await store.create_key(key("rolling", previous_hash=new_secret().key_hash, previous_valid_until=T0 + 99))
    for n in range(2500):  # more than two pages of tasks_for_key
        await add_task(store, make_task(f"task-{n:05d}", at=T0 + n, key="team-a" if n % 3 else "rolling"))
    body = b'{"status": "completed", "video_url": "https://cdn.example/v.mp4"}'
    await store.settle("task-00007", "completed", Decimal(5), Decimal("0.42"), body, T0 + 9000)
    await store.settle("task-00008", "failed", Decimal(0), Decimal(0), None, T0 + 9001)
    await store.mark_unknown("task-00009", T0 + 9002)
    await store.record_intent("intent-open", "team-a", "req-open", "kling-v3-pro-audio", "text", T0 + 9003)
    hook = OutboxRecord("msg_a", "team-a", "hooks.example.com", "https://hooks.example.com/k", body, T0 + 9004)
    await store.outbox_add(hook, 10, 10)
    await store.outbox_claim(T0 + 9005, "worker", T0 + 9010, 1, 1, 1)
    await store.outbox_retry("msg_a", "worker", T0 + 9020, "status 503")  # pending, one attempt made
    await store.outbox_add(replace(hook, delivery_id="msg_b", state="failed", attempts=6, last_error="x"), 10, 10)


@pytest.fixture
async def sqlite_source(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(f"sqlite:///{tmp_path / 'source.db'}")
    await fill(store)
    yield store
    await store.close()


async def everything(store: Store) -> tuple[object, ...]:
    tasks = []
    cursor: str | None = None
    while True:
        page, cursor = await store.tasks_for_key(None, 1000, cursor)
        tasks += page
        if cursor is None:
            break
    by = ("key", "model", "mode", "day")
    outbox = await store.outbox_list("pending"), await store.outbox_list("failed")
    return await store.list_keys(), tasks, await store.list_intents(), await store.usage(None, None, by), outbox


class TestCopyStore:
    async def test_sqlite_to_postgresql_and_back_keeps_everything(
        self, sqlite_source: Store, postgres_schema_url: str, tmp_path: Path
    ) -> None:
        postgres = await open_store(postgres_schema_url)
        back = await open_store(f"sqlite:///{tmp_path / 'back.db'}")
        try:
            there = await copy_store(sqlite_source, postgres)
            again = await copy_store(postgres, back)

            assert (there.keys, there.tasks, there.intents, there.verified, there.webhooks) == (3, 2500, 1, True, 2)
            assert again == there
            original = await everything(sqlite_source)
            assert await everything(postgres) == original
            assert await everything(back) == original
            assert (await postgres.get_task("task-00007")).terminal_body == (  # type: ignore[union-attr]
                await sqlite_source.get_task("task-00007")
            ).terminal_body  # type: ignore[union-attr]
        finally:
            await postgres.close()
            await back.close()

    async def test_refuses_a_destination_that_holds_anything(self, sqlite_source: Store, tmp_path: Path) -> None:
        destination = await open_store(f"sqlite:///{tmp_path / 'busy.db'}")
        try:
            await destination.create_key(key("someone"))
            with pytest.raises(DestinationNotEmpty, match="already holds keys, tasks or intents"):
                await copy_store(sqlite_source, destination)
            assert [k.name for k in await destination.list_keys()] == ["someone"]
        finally:
            await destination.close()


class TestCopyStoreCommand:
    def test_copies_the_configured_store(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
        assert main(["keys", "create", "team-a"]) == 0
        capsys.readouterr()

        assert main(["copy-store", f"sqlite:///{tmp_path / 'copy.db'}"]) == 0

        out = capsys.readouterr().out
        assert "copied 1 keys, 0 tasks and 0 intents" in out
        assert "verified: usage by key, model, mode and day is the same in both stores" in out

    def test_a_busy_destination_is_exit_1_and_left_alone(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
        assert main(["keys", "create", "team-a"]) == 0
        capsys.readouterr()

        assert main(["copy-store", f"sqlite:///{tmp_path / 'data' / 'gateway.db'}"]) == 1  # itself: not empty

        assert capsys.readouterr().err.startswith("kling-gateway: the destination store already holds keys")

    @pytest.mark.parametrize(
        ("to_url", "status", "message"),
        [
            ("mysql://x/y", 2, "kling-gateway: configuration error: TO_URL: unsupported store URL scheme 'mysql'"),
            ("postgresql://gw:s3cret@127.0.0.1:1/gw", 1, "kling-gateway: store unavailable: cannot connect"),
        ],
    )
    def test_an_unusable_destination_is_one_line(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        to_url: str,
        status: int,
        message: str,
    ) -> None:
        monkeypatch.setenv("KLING_GATEWAY_SERVER_DATA_DIR", str(tmp_path / "data"))
        assert main(["copy-store", to_url]) == status
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "s3cret" not in err
