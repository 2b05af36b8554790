"""Ledger scale check: a month of 1,000,000 tasks in SQLite, then time the queries the gateway runs on it.

    .venv/bin/python bench/ledger_scale.py [--tasks 1000000] [--keys 20] [--db PATH] [--no-bodies]

Rows are inserted with ``executemany`` in one transaction, using the store's own row mapping and INSERT
statement, into a file created (and migrated) by ``open_store``; the per-day usage rollup, which the write
path keeps in step row by row, is then built from them in one statement. Then, through the async ``Store``
API: ``usage`` for the month at several groupings (cross-checked against a full scan of the rows),
``get_task``, the budget sum, pages of ``tasks_for_key``, ``tasks_needing_settlement`` and one submission's
writes. The target: a month's usage in under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from typing import TypeVar

from gateway.catalog import MODELS, MODES
from gateway.store import open_store
from gateway.store.base import Store, TaskRecord, from_fixed
from gateway.store.rows import task_row
from gateway.store.sqlite import (
    _SQL_INSERT_TASK,
    _SQL_REBUILD_ROLLUP,
    _SQL_UPSERT_BODY,
    _USAGE_AGGREGATES,
)

T = TypeVar("T")

MONTH_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
MONTH_END = MONTH_START + 31 * 86400
PRICES = {model: info.list_price_usd_per_s for model, info in MODELS.items()}
DURATIONS = (None, 3, 5, 5, 5, 10, 15)


def generate(count: int, keys: int, seed: int = 1) -> Iterator[tuple[TaskRecord, bytes | None]]:
    """Tasks spread evenly over the month: 70% completed, 10% failed, 5% unknown, 15% still running."""
    rng = random.Random(seed)
    models = sorted(PRICES)
    step = (MONTH_END - MONTH_START) / count
    for n in range(count):
        model = models[rng.randrange(4)]
        price = PRICES[model]
        duration = DURATIONS[rng.randrange(len(DURATIONS))]
        seconds = duration if duration is not None else 5
        at = MONTH_START + n * step
        task_id = f"task_{n:08d}_{rng.getrandbits(32):08x}"
        task = TaskRecord(
            task_id=task_id,
            key_name=f"team-{rng.randrange(keys):02d}",
            model=model,
            mode=MODES[rng.randrange(3)],
            tier=model.split("-")[2],
            audio=model.endswith("audio"),
            duration=duration,
            duration_defaulted=duration is None,
            estimate_seconds=seconds,
            estimate_usd=price * seconds,
            price_per_second_usd=price,
            mode_multiplier=Decimal(1),
            request_id=f"req_{n:08d}",
            submitted_at=at,
            status="in_progress",
            progress=50,
            last_polled_at=at + 30,
        )
        fate = rng.random()
        body = None
        if fate < 0.70:
            out = Decimal(seconds) + Decimal(rng.randrange(100)) / 1000
            task = _settled(task, "completed", out, out * price, at + 120)
            body = (
                f'{{"id":"{task_id}","object":"video","model":"{model}","status":"completed","progress":100,'
                f'"seconds":"{out}","created_at":{int(at)},"completed_at":{int(at) + 120},'
                f'"video_url":"https://cdn.example.com/videos/{task_id}.mp4"}}'
            ).encode()
        elif fate < 0.80:
            task = _settled(task, "failed", Decimal(0), Decimal(0), at + 60)
        elif fate < 0.85:
            task = _settled(task, "unknown", Decimal(seconds), task.estimate_usd, at + 86400)
        yield task, body


def _settled(task: TaskRecord, outcome: str, seconds: Decimal, usd: Decimal, at: float) -> TaskRecord:
    return replace(task, status=outcome, outcome=outcome, settled_seconds=seconds, settled_usd=usd, settled_at=at)


def bulk_insert(path: str, count: int, keys: int, bodies: bool) -> tuple[float, float]:
    """Insert ``count`` generated tasks in one transaction, then build the daily rollup from them.

    Returns the seconds each step took.
    """
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    batch: list[tuple[object, ...]] = []
    body_batch: list[tuple[str, bytes]] = []
    for task, body in generate(count, keys):
        batch.append(task_row(task))
        if bodies and body is not None:
            body_batch.append((task.task_id, body))
        if len(batch) >= 50_000:
            conn.executemany(_SQL_INSERT_TASK, batch)
            conn.executemany(_SQL_UPSERT_BODY, body_batch)
            batch, body_batch = [], []
    conn.executemany(_SQL_INSERT_TASK, batch)
    conn.executemany(_SQL_UPSERT_BODY, body_batch)
    conn.execute("COMMIT")
    inserted = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM usage_daily")
    conn.execute(_SQL_REBUILD_ROLLUP)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return inserted - started, time.perf_counter() - inserted


async def timed(label: str, fn: Callable[[], Awaitable[T]], repeat: int = 3) -> T:
    """Run ``fn`` ``repeat`` times and print the first (cold) and best times."""
    times = []
    result: T | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - started)
    print(f"  {label:<44} first {times[0] * 1000:9.1f} ms   best {min(times) * 1000:9.1f} ms")
    assert result is not None
    return result


async def create_schema(url: str) -> None:
    """Create and migrate the database the way the gateway does."""
    store = await open_store(url)
    await store.close()


async def run_queries(url: str, tasks: int) -> None:
    """Time the gateway's ledger queries through the async Store API."""
    store = await open_store(url)
    try:
        print("queries (through the async Store API):")
        for group_by in ((), ("key",), ("key", "model"), ("model", "mode"), ("key", "model", "mode", "day")):
            rows = await timed(
                f"usage(month, by={','.join(group_by) or 'total'})",
                lambda g=group_by: store.usage(MONTH_START, MONTH_END, g),  # type: ignore[misc]
            )
            print(f"  {'':<44} -> {len(rows)} rows")
        (total,) = await store.usage(MONTH_START, MONTH_END)
        print(
            f"  month total: {total.tasks:,} tasks, estimated ${total.estimated_usd:,.4f}, "
            f"settled ${total.settled_usd:,.4f}, cost ${total.cost_usd:,.4f}"
        )
        await timed(
            "usage(month +/- partial days, by=key,model)",
            lambda: store.usage(MONTH_START + 3600.5, MONTH_END - 7200.25, ("key", "model")),
        )
        await timed(
            "usage(3 hours inside one day, by=key)",
            lambda: store.usage(MONTH_START + 36000, MONTH_START + 46800, ("key",)),
        )
        raw_sql = f"SELECT {_USAGE_AGGREGATES} FROM tasks WHERE submitted_at >= ? AND submitted_at < ?"  # noqa: S608
        started = time.perf_counter()
        raw = await store._read(  # type: ignore[attr-defined]
            lambda conn: conn.execute(raw_sql, (MONTH_START, MONTH_END)).fetchone()
        )
        took = time.perf_counter() - started
        print(f"  {'cross-check: month total by scanning tasks':<44} once  {took * 1000:9.1f} ms")
        assert int(raw[0]) == total.tasks, (raw, total)
        assert from_fixed(int(raw[3])) == total.estimated_usd
        assert from_fixed(int(raw[4])) == total.settled_usd
        assert from_fixed(int(raw[5])) == total.cost_usd
        print(f"  {'':<44} -> equal to the rollup's totals")
        week = await timed(
            "usage(one week, by=key,model)",
            lambda: store.usage(MONTH_START + 7 * 86400, MONTH_START + 14 * 86400, ("key", "model")),
        )
        print(f"  {'':<44} -> {len(week)} rows")

        rng = random.Random(2)
        # task ids carry a random suffix: find the full ids of 1000 random rows by prefix
        prefixes = [f"task_{n:08d}_" for n in rng.sample(range(tasks), 1000)]
        sql = "SELECT task_id FROM tasks WHERE task_id >= ? ORDER BY task_id LIMIT 1"
        full_ids: list[str] = await store._read(  # type: ignore[attr-defined]
            lambda conn: [conn.execute(sql, (p,)).fetchone()[0] for p in prefixes]
        )
        latencies = []
        for task_id in full_ids:
            started = time.perf_counter()
            task = await store.get_task(task_id)
            latencies.append(time.perf_counter() - started)
            assert task is not None
        latencies.sort()
        print(
            f"  {'get_task x1000 (random ids)':<44} median {statistics.median(latencies) * 1e6:7.0f} us"
            f"   p99 {latencies[989] * 1e6:7.0f} us"
        )
        started = time.perf_counter()
        await asyncio.gather(*(store.get_task(t) for t in full_ids))
        print(f"  {'get_task x1000 concurrently':<44} total  {(time.perf_counter() - started) * 1000:7.1f} ms")
        budget = await timed(
            "outstanding_and_settled_usd(one key, month)",
            lambda: store.outstanding_and_settled_usd("team-07", MONTH_START, MONTH_END),
        )
        print(f"  {'':<44} -> ${budget:,.4f}")
        _, cursor = await timed("tasks_for_key(one key, first page of 50)", lambda: store.tasks_for_key("team-07"))
        deep = cursor
        for _ in range(200):
            _, deep = await store.tasks_for_key("team-07", 50, deep)
        await timed("tasks_for_key(one key, page 201)", lambda: store.tasks_for_key("team-07", 50, deep))
        await timed("tasks_for_key(all keys, first page)", lambda: store.tasks_for_key(None))
        due = await timed(
            "tasks_needing_settlement(limit 100)",
            lambda: store.tasks_needing_settlement(MONTH_END + 86400, 100),
        )
        print(f"  {'':<44} -> {len(due)} tasks")
        counter = iter(range(10**6))
        await timed(
            "record_intent + resolve_intent (one task)",
            lambda: _one_submission(store, next(counter)),
            repeat=5,
        )
    finally:
        await store.close()


async def _one_submission(store: Store, n: int) -> bool:
    """What a submission writes: the intent before forwarding, then the task row replacing it."""
    task, _ = next(generate(1, 1, seed=1000 + n))
    task = replace(
        task,
        task_id=f"bench_{n}",
        status="queued",
        outcome=None,
        settled_seconds=None,
        settled_usd=None,
        settled_at=None,
    )
    await store.record_intent(f"intent_{n}", task.key_name, task.request_id, task.model, task.mode, time.time())
    return await store.resolve_intent(f"intent_{n}", task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--db", help="use (and keep) this file instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary database")
    parser.add_argument("--no-bodies", action="store_true", help="skip terminal bodies for completed tasks")
    args = parser.parse_args()
    path = os.path.abspath(args.db or os.path.join(tempfile.mkdtemp(prefix="ledger-scale-"), "gateway.db"))
    url = f"sqlite:///{path}"
    asyncio.run(create_schema(url))
    print(f"inserting {args.tasks:,} tasks for {args.keys} keys into {path} ...")
    took, rollup = bulk_insert(path, args.tasks, args.keys, not args.no_bodies)
    size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    print(f"  inserted in {took:.1f} s ({args.tasks / took:,.0f} rows/s), file {size / 2**20:,.0f} MiB")
    print(f"  daily rollup built from the rows in {rollup:.1f} s")
    try:
        asyncio.run(run_queries(url, args.tasks))
    finally:
        if args.db or args.keep:
            print(f"kept {path}")
        else:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            os.rmdir(os.path.dirname(path))


if __name__ == "__main__":
    main()
