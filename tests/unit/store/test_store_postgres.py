"""The PostgreSQL store's own behaviour: URLs, migrations, races between processes, failures and the schema.

Everything both backends share is tested in ``test_store.py`` (its ``store`` fixture runs on PostgreSQL too).
Two ``PostgresStore`` instances are two pools, hence two "processes" as far as the database can tell.
Skipped when no PostgreSQL server is reachable (see ``postgres_url`` in conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest
from test_store import T0, add_task, first, make_task

from gateway.keys import KeyRecord, issue_key
from gateway.store import open_store
from gateway.store.base import IdemKind, KeyExists, StoreError

asyncpg = pytest.importorskip("asyncpg")

from gateway.store.postgres import MIGRATIONS, PostgresStore, split_url, take_pool_size  # noqa: E402 - needs asyncpg

ALL_VERSIONS = tuple(version for version, _ in MIGRATIONS)


def schema_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["schema"][0]


async def query(server_url: str, schema: str, sql: str, *args: Any) -> list[Any]:
    """Run ``sql`` on a connection of its own with ``schema`` first on the search path."""
    conn = await asyncpg.connect(server_url, server_settings={"search_path": f'"{schema}"'})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
async def pg(postgres_schema_url: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.open(postgres_schema_url)
    yield store
    await store.close()


@pytest.fixture
async def pair(postgres_schema_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one schema: two pools, as two gateway processes would have."""
    a = await PostgresStore.open(postgres_schema_url)
    b = await PostgresStore.open(postgres_schema_url)
    yield a, b
    await a.close()
    await b.close()


class TestUrl:
    @pytest.mark.parametrize(
        ("url", "schema", "dsn", "expected"),
        [
            ("postgresql://u@h/db", None, "postgresql://u@h/db", None),
            ("postgresql://u@h/db?schema=gw", None, "postgresql://u@h/db", "gw"),
            ("postgres://u@h/db?sslmode=disable&schema=_gw_2", None, "postgres://u@h/db?sslmode=disable", "_gw_2"),
            ("postgresql://u@h/db", "Mixed_Case", "postgresql://u@h/db", "Mixed_Case"),
            ("postgresql://u@h/db?schema=gw", "gw", "postgresql://u@h/db", "gw"),
            ("postgresql://u@h/db?schema=" + "a" * 63, None, "postgresql://u@h/db", "a" * 63),
        ],
    )
    def test_split(self, url: str, schema: str | None, dsn: str, expected: str | None) -> None:
        """The schema comes out of the query string (or the argument); the rest of the URL is kept."""
        assert split_url(url, schema) == (dsn, expected)

    @pytest.mark.parametrize(
        ("url", "schema", "fragment"),
        [
            ("postgresql://u:s3cret-pw@h/db?schema=", None, "plain identifier"),
            ("postgresql://u:s3cret-pw@h/db?schema=1st", None, "plain identifier"),
            ("postgresql://u:s3cret-pw@h/db?schema=a-b", None, "plain identifier"),
            ("postgresql://u:s3cret-pw@h/db?schema=a%22b", None, "plain identifier"),
            ("postgresql://u:s3cret-pw@h/db?schema=" + "a" * 64, None, "plain identifier"),
            ("postgresql://u:s3cret-pw@h/db", "x;drop", "plain identifier"),
            ("postgresql://u:s3cret-pw@h/db?schema=a&schema=b", None, "more than once"),
            ("postgresql://u:s3cret-pw@h/db?schema=a", "b", "differs"),
        ],
    )
    async def test_bad_schema(self, url: str, schema: str | None, fragment: str) -> None:
        """A schema that is not a plain identifier is a ValueError, raised before connecting, secret-free."""
        with pytest.raises(ValueError, match=fragment) as info:
            await PostgresStore.open(url, schema=schema)
        assert "s3cret" not in str(info.value)

    @pytest.mark.parametrize(
        "url",
        ["postgresql://gateway:s3cret-pw@127.0.0.1:1/gw", "postgresql://gateway@127.0.0.1:1/gw?password=s3cret-pw"],
    )
    async def test_unreachable_port(self, url: str) -> None:
        """Nothing listening is a StoreError that names neither the password nor chains an error that does."""
        with pytest.raises(StoreError, match="cannot connect") as info:
            await open_store(url)
        assert "s3cret" not in str(info.value)
        assert "s3cret" not in str(info.value.__cause__)

    @pytest.mark.parametrize(
        "url",
        [
            "postgresql://gateway:s3cret-pw@127.0.0.1:port-s3cret-pw/gw",
            "postgresql://gateway:s3cret-pw@127.0.0.1/gw?sslmode=s3cret-pw",
        ],
    )
    async def test_unusable_url(self, url: str) -> None:
        """A port that is not a number or a bad option is a ValueError, raised before connecting, secret-free."""
        with pytest.raises(ValueError, match="PostgreSQL URL") as info:
            await open_store(url)
        assert "s3cret" not in str(info.value)

    async def test_missing_database(self, postgres_url: str) -> None:
        """A database that does not exist is a StoreError naming it, not the password."""
        parts = urlsplit(postgres_url)
        netloc = f"{parts.username or 'postgres'}:s3cret-pw@{parts.hostname}:{parts.port or 5432}"
        url = urlunsplit(parts._replace(netloc=netloc, path="/no_such_db_kling"))
        with pytest.raises(StoreError, match="no_such_db_kling") as info:
            await open_store(url)
        assert "s3cret" not in str(info.value)

    async def test_postgres_scheme_alias(self, postgres_schema_url: str) -> None:
        """open_store takes postgres:// as well as postgresql://."""
        store = await open_store("postgres://" + postgres_schema_url.partition("://")[2])
        try:
            assert isinstance(store, PostgresStore)
            assert await store.ping()
        finally:
            await store.close()

    async def test_asyncpg_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without asyncpg, a PostgreSQL URL is a ValueError saying which extra to install."""
        monkeypatch.setitem(sys.modules, "asyncpg", None)
        monkeypatch.delitem(sys.modules, "gateway.store.postgres")
        with pytest.raises(ValueError, match=re.escape("kling-gateway[scale]")):
            await open_store("postgresql://gateway:s3cret-pw@127.0.0.1/gw")


class TestMigrations:
    async def test_concurrent_starts(self, postgres_schema_url: str, postgres_url: str) -> None:
        """Four stores opening one fresh schema at once: exactly one applies the migrations."""
        stores = await asyncio.gather(*(PostgresStore.open(postgres_schema_url) for _ in range(4)))
        try:
            applied = sorted(s.applied_migrations for s in stores)
            assert applied == [(), (), (), ALL_VERSIONS]
            assert await stores[0].keys_version() == 0
        finally:
            for s in stores:
                await s.close()
        rows = await query(postgres_url, schema_of(postgres_schema_url), "SELECT version FROM schema_migrations")
        assert [row[0] for row in rows] == list(ALL_VERSIONS)

    async def test_reopen_keeps_data(self, postgres_schema_url: str) -> None:
        """Reopening applies nothing and finds what the first store wrote."""
        first = await PostgresStore.open(postgres_schema_url)
        assert first.applied_migrations == ALL_VERSIONS
        await first.create_key(issue_key("team-a", now=1.0)[1])
        await first.close()
        second = await PostgresStore.open(postgres_schema_url)
        try:
            assert second.applied_migrations == ()
            assert [k.name for k in await second.list_keys()] == ["team-a"]
        finally:
            await second.close()

    async def test_newer_schema_refused(self, postgres_schema_url: str, postgres_url: str) -> None:
        """A schema migrated by a newer gateway is not opened by an older one."""
        await (await PostgresStore.open(postgres_schema_url)).close()
        schema = schema_of(postgres_schema_url)
        await query(postgres_url, schema, "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
        with pytest.raises(StoreError, match="newer"):
            await PostgresStore.open(postgres_schema_url)

    async def test_tables_in_own_schema(self, postgres_url: str) -> None:
        """schema= (argument or URL) puts every table in that schema, case kept, created if missing."""
        schema = "Kling_Case_Test"
        try:
            store = await PostgresStore.open(postgres_url, schema=schema)
            await store.close()
            rows = await query(
                postgres_url, schema, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
            assert {row[0] for row in rows} == {
                "schema_migrations",
                "client_keys",
                "counters",
                "intents",
                "tasks",
                "task_bodies",
                "idempotency",
                "usage_daily",
                "webhook_outbox",
                "archives",
                "budget_holds",
                "audit_log",
                "ui_session_revocations",
                "account_marks",
            }
        finally:
            await query(postgres_url, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    async def test_column_types(self, pg: PostgresStore, postgres_schema_url: str, postgres_url: str) -> None:
        """Money is BIGINT fixed point (never float), times DOUBLE PRECISION, bodies BYTEA; ordered ids sort as C."""
        rows = await query(
            postgres_url,
            schema_of(postgres_schema_url),
            "SELECT table_name || '.' || column_name, data_type, collation_name FROM information_schema.columns "
            "WHERE table_schema = $1",
            schema_of(postgres_schema_url),
        )
        types = {row[0]: row[1] for row in rows}
        money = ("tasks.estimate_nano", "tasks.settled_nano", "usage_daily.cost_nano", "usage_daily.settled_nano")
        assert {types[column] for column in money} == {"bigint"}
        assert types["tasks.submitted_at"] == "double precision"
        assert types["task_bodies.body"] == types["idempotency.body"] == "bytea"
        collations = {row[0]: row[2] for row in rows}
        assert {collations[column] for column in ("client_keys.name", "intents.intent_id", "tasks.task_id")} == {"C"}


class TestAcrossProcesses:
    async def test_settle_exactly_once(self, pair: tuple[PostgresStore, PostgresStore]) -> None:
        """Two processes racing to settle (or give up on) the same tasks: one winner each, rollup counted once."""
        a, b = pair
        tasks = [make_task(f"t{n}", at=T0 + n) for n in range(20)]
        await asyncio.gather(*(add_task(a, task) for task in tasks))
        calls: list[Awaitable[bool]] = []
        for task in tasks:
            for i in range(6):
                store = (a, b)[i % 2]
                if i == 5:
                    calls.append(store.mark_unknown(task.task_id, T0 + 100))
                else:
                    usd = Decimal("0.42") + Decimal(i) / 1000
                    calls.append(first(store.settle(task.task_id, "completed", Decimal(5), usd, b"{}", T0 + 100)))
        results = await asyncio.gather(*calls)
        for n in range(len(tasks)):
            assert results[n * 6 : n * 6 + 6].count(True) == 1, n
        (total,) = await b.usage()
        assert (total.tasks, total.pending, total.completed + total.unknown) == (20, 0, 20)
        settled = [await a.get_task(task.task_id) for task in tasks]
        assert total.cost_usd == sum((t.cost_usd for t in settled if t is not None), Decimal(0))
        await a.rebuild_usage_rollup()
        assert await b.usage() == [total]

    async def test_resolve_once(self, pair: tuple[PostgresStore, PostgresStore]) -> None:
        """The same task resolved by two processes at once is inserted (and counted) once."""
        a, b = pair
        for n in range(10):
            task = make_task(f"t{n}")
            await a.record_intent(f"i{n}", task.key_name, task.request_id, task.model, task.mode, T0)
            results = await asyncio.gather(a.resolve_intent(f"i{n}", task), b.resolve_intent(f"i{n}", task))
            assert sorted(results) == [False, True]
        (total,) = await a.usage()
        assert total.tasks == 10
        assert await b.list_intents() == []

    async def test_one_new_claim(self, pair: tuple[PostgresStore, PostgresStore]) -> None:
        """idempotency_begin from two processes at once: exactly one NEW per key."""
        a, b = pair
        for n in range(10):
            results = await asyncio.gather(
                *((a, b)[i % 2].idempotency_begin("team-a", f"k{n}", "h1", T0) for i in range(8))
            )
            kinds = [r.kind for r in results]
            assert kinds.count(IdemKind.NEW) == 1, kinds
            assert kinds.count(IdemKind.IN_FLIGHT) == 7, kinds

    async def test_one_takeover(self, pair: tuple[PostgresStore, PostgresStore]) -> None:
        """A stale in-flight record is taken over by exactly one of the processes that find it."""
        a, b = pair
        await a.idempotency_begin("team-a", "k1", "h1", T0)
        later = T0 + 400
        results = await asyncio.gather(
            *((a, b)[i % 2].idempotency_begin("team-a", "k1", "h1", later) for i in range(8))
        )
        assert [r.kind for r in results].count(IdemKind.NEW) == 1

    async def test_one_key_name(self, pair: tuple[PostgresStore, PostgresStore]) -> None:
        """Two processes creating the same key name: one succeeds, the other gets KeyExists; one version bump."""
        a, b = pair
        results = await asyncio.gather(
            a.create_key(issue_key("team-a", now=1.0)[1]),
            b.create_key(issue_key("team-a", now=2.0)[1]),
            return_exceptions=True,
        )
        assert results.count(None) == 1
        assert sum(isinstance(r, KeyExists) for r in results) == 1
        assert await a.keys_version() == await b.keys_version() == 1


class TestFailures:
    @pytest.mark.parametrize(
        "call",
        [
            lambda s: s.list_keys(),
            lambda s: s.keys_version(),
            lambda s: s.get_task("t1"),
            lambda s: s.record_intent("i1", "team-a", "r", "m", "text", T0),
            lambda s: s.settle("t1", "completed", Decimal(5), Decimal(1), None, T0),
            lambda s: s.usage(),
            lambda s: s.idempotency_begin("team-a", "k1", "h1", T0),
        ],
        ids=["list_keys", "keys_version", "get_task", "record_intent", "settle", "usage", "idempotency_begin"],
    )
    async def test_closed(self, postgres_schema_url: str, call: Callable[[PostgresStore], Awaitable[Any]]) -> None:
        """After close, calls are StoreErrors, ping is False and closing again is fine."""
        store = await PostgresStore.open(postgres_schema_url)
        await store.close()
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await call(store)
        assert await store.ping() is False

    async def test_driver_error_chained(self, pg: PostgresStore) -> None:
        """A constraint violation is a StoreError whose cause is the asyncpg error."""
        await pg.record_intent("i1", "team-a", "r1", "m", "text", T0)
        with pytest.raises(StoreError, match=r"^postgresql: duplicate key") as info:
            await pg.record_intent("i1", "team-a", "r1", "m", "text", T0)
        assert isinstance(info.value.__cause__, asyncpg.UniqueViolationError)

    async def test_nul_in_text(self, pg: PostgresStore) -> None:
        """Text PostgreSQL cannot store (NUL) is a StoreError, not a driver exception."""
        with pytest.raises(StoreError):
            await pg.record_intent("i\x00", "team-a", "r1", "m", "text", T0)

    async def test_server_gone_and_back(self, postgres_url: str, postgres_schema_url: str) -> None:
        """With the server unreachable, ping is False and calls are StoreErrors; once back, the pool recovers."""
        target = urlsplit(postgres_url)
        async with Cuttable(target.hostname or "127.0.0.1", target.port or 5432) as proxy:
            url = urlunsplit(urlsplit(postgres_schema_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
            store = await PostgresStore.open(url)
            try:
                await store.record_intent("i1", "team-a", "r1", "m", "text", T0)
                await proxy.cut()
                assert await store.ping() is False
                with pytest.raises(StoreError):
                    await store.list_intents()
                await proxy.restore()
                assert await store.ping() is True
                assert [i.intent_id for i in await store.list_intents()] == ["i1"]
            finally:
                await store.close()


class TestSemantics:
    async def test_purge(self, pg: PostgresStore, postgres_schema_url: str, postgres_url: str) -> None:
        """Expired records of other keys are purged opportunistically."""
        for n in range(5):
            await pg.idempotency_begin("team-a", f"old{n}", "h", T0, ttl_s=100)
        await pg.idempotency_begin("team-b", "new", "h", T0 + 1000, ttl_s=100)
        rows = await query(postgres_url, schema_of(postgres_schema_url), "SELECT idem_key FROM idempotency")
        assert [row[0] for row in rows] == ["new"]

    async def test_code_point_order(self, pg: PostgresStore) -> None:
        """Names sort by code point (as in SQLite and Python), whatever the database's locale."""
        names = ["b", "B", "_x", "a-1", "a_1", "Zeta", "äther", "10", "9"]
        for n, name in enumerate(names):
            await pg.create_key(KeyRecord(name=name, key_hash=f"{n:064d}", prefix=f"gk_{n}", created_at=1.0))
        assert [k.name for k in await pg.list_keys()] == sorted(names)


class Cuttable:
    """A loopback TCP forwarder to the database that a test can cut (server gone) and restore on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def __aenter__(self) -> Cuttable:
        await self.restore()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cut()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


class TestPoolSize:
    @pytest.mark.parametrize(
        ("dsn", "expected"),
        [
            ("postgresql://h/db", ("postgresql://h/db", 10)),
            ("postgresql://h/db?pool_size=3", ("postgresql://h/db", 3)),
            ("postgresql://h/db?sslmode=disable&pool_size=100", ("postgresql://h/db?sslmode=disable", 100)),
        ],
    )
    def test_taken_out_of_the_url(self, dsn: str, expected: tuple[str, int]) -> None:
        assert take_pool_size(dsn) == expected

    @pytest.mark.parametrize(
        "query", ["pool_size=0", "pool_size=101", "pool_size=x", "pool_size=", "pool_size=2&pool_size=3"]
    )
    def test_bad_values(self, query: str) -> None:
        with pytest.raises(ValueError, match="pool_size must be one integer from 1 to 100"):
            take_pool_size(f"postgresql://gw:s3cret@h/db?{query}")

    async def test_the_pool_holds_at_most_that_many_connections(self, postgres_schema_url: str) -> None:
        store = await PostgresStore.open(postgres_schema_url + "&pool_size=2")
        try:
            assert store._pool is not None and store._pool.get_max_size() == 2
            assert await store.ping()
        finally:
            await store.close()
