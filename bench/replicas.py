"""What scale-out costs per request: replicas on PostgreSQL + Redis beside one gateway on SQLite, in one run.

    .venv/bin/python bench/replicas.py             # ~1.5 min (hard limit 240 s); writes bench/results-replicas.md
    .venv/bin/python bench/replicas.py --no-write  # print only
    .venv/bin/python bench/replicas.py --no-write --no-budget  # the bench key without a budget (no budget hold)

Loopback only. Needs wrk and nginx (``bench/run.py``'s fake upstream) and the PostgreSQL and Redis of this machine
(``postgresql://postgres@127.0.0.1:5432/test``, ``redis://127.0.0.1:6379/0``; override with
``KLING_GATEWAY_BENCH_POSTGRES_URL`` / ``KLING_GATEWAY_BENCH_REDIS_URL``). The replicas get a fresh PostgreSQL
schema and Redis key prefix, both removed at the end. Every gateway runs ``bench/run.py``'s production settings
(key auth with an rpm limit and a budget, access log, metrics, settler) with a pending-status TTL of 3600 s.

Rows (``wrk -t1``, 50 connections after a warm-up, then 1 connection):

* ``single``: the default deployment, SQLite + ``memory://``: cached polls (the process fetched each task once)
  and submissions;
* ``replica A``: the same on PostgreSQL + Redis, polls of tasks A fetched itself (hits from its own memory; the
  rate limit is checked in Redis);
* ``replica B``: the same polls on a replica that never fetched them: its first poll of each task reads Redis, and
  keeps a copy for the freshness the entry has left (3,600 s here), so the rest are answered from its memory;
* submissions on a replica: the ledger writes go to PostgreSQL, the limit to Redis.

Then the Redis operations alone, in this process (``gateway.shared.redis_ops``, CPU µs per call at 1 and 50 concurrent
callers): a status read (what a replica's first poll of a task another replica fetched costs on top of a memory
hit) and a rate-limit check (what a request of a key under 1,200 rpm costs; busier keys lease tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import run as bench_run
import scale
import uvloop
from common import INSTALL_HINT, Aborted, Procs, hard_limit, machine_info, missing_tools

from gateway.shared.redis_ops import RedisRateLimiter, RedisStatusCache, connect

RESULTS_MD = Path(__file__).resolve().parent / "results-replicas.md"
HARD_LIMIT_S = 240
POSTGRES_URL = os.environ.get("KLING_GATEWAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KLING_GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _drop_prefix(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


def _prime(gw: bench_run.Gateway, key: str, task_ids: list[str]) -> None:
    """Poll each task once on ``gw``: fetched upstream, cached in its memory (and in Redis on a replica)."""
    for task_id in task_ids:
        bench_run.expect_poll(gw, key, task_id, "MISS")


def _rows(
    procs: Procs, tmp: Path, plan: bench_run.Plan, schema: str, prefix: str, budget: bool = True
) -> list[bench_run.Row]:
    upstream = scale.start_upstream(procs, tmp)
    admin = secrets.token_hex(24)
    shared_env = {
        "KLING_GATEWAY_STORE_URL": f"{POSTGRES_URL}?schema={schema}",
        "KLING_GATEWAY_CACHE_URL": REDIS_URL,
        "KLING_GATEWAY_CACHE_KEY_PREFIX": prefix,
    }
    single = bench_run.start_gateway(procs, tmp, "single", upstream, tmp / "single", admin, 3600)
    replica_a = bench_run.start_gateway(procs, tmp, "replica-a", upstream, tmp / "a", admin, 3600, shared_env)
    replica_b = bench_run.start_gateway(procs, tmp, "replica-b", upstream, tmp / "b", admin, 3600, shared_env)

    rows = []
    for label, gw, pollers in (
        ("single", single, [("single", single)]),
        ("replica", replica_a, [("replica A", replica_a), ("replica B", replica_b)]),
    ):
        key = bench_run.create_key(gw, admin, budget=budget)
        task_ids = bench_run.create_tasks(gw, key, plan.tasks)
        _prime(gw, key, task_ids)
        time.sleep(1.0)  # replica B picks the new key up from the store (every 0.5 s)
        for name, poller in pollers:
            script = bench_run.poll_script(tmp, f"{name}-poll".replace(" ", "-"), f"Bearer {key}", task_ids)
            where = "its own memory" if poller is gw else "Redis once each, then a local copy (another replica fetched)"
            rows.append(
                bench_run.measure(
                    f"{name} poll",
                    f"cached polls answered from {where}",
                    f"{poller.base}/v1/videos/{task_ids[0]}",
                    plan,
                    script=script,
                    pgid=poller.pid,
                    gw=poller,
                    check=bench_run.cache_check,
                )
            )
        submit = bench_run.submit_script(tmp, f"{label}-submit", f"Bearer {key}")
        rows.append(
            bench_run.measure(
                f"{label} submit",
                "submissions: ledger on " + ("SQLite" if gw is single else "PostgreSQL, limit in Redis"),
                f"{gw.base}/v1/video/generations",
                plan,
                script=submit,
                pgid=gw.pid,
                gw=gw,
                check=bench_run.submit_check,
            )
        )
    return rows


async def _redis_ops(prefix: str, calls: int = 4000) -> list[tuple[str, int, float, float]]:
    """(operation, concurrency, calls/s, CPU µs per call) for a status read and a rate-limit check."""
    client = await connect(REDIS_URL)
    cache = RedisStatusCache(client, pending_ttl_s=3600, terminal_ttl_s=3600, stale_keep_s=60, prefix=prefix)
    limiter = RedisRateLimiter(client, prefix=prefix)
    body = (  # the fake upstream's status answer (bench/run.py)
        b'{"id":"task_ops","task_id":"task_ops","object":"video.generation.job",'
        b'"model":"kling-v3-std-silent","status":"in_progress","progress":42,"created_at":1767225600}'
    )
    await cache.put("task_ops", body, [("content-type", "application/json")], "in_progress", False)
    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "status read (RedisStatusCache.get)": lambda: cache.get("task_ops"),
        "rate-limit check (RedisRateLimiter.check)": lambda: limiter.check("ops", 1000),
    }
    results = []
    try:
        for name, operation in operations.items():
            for concurrency in (1, 50):
                left = iter(range(calls))

                async def worker(
                    operation: Callable[[], Awaitable[object]] = operation, left: Iterator[int] = left
                ) -> None:
                    for _ in left:
                        await operation()

                wall0, cpu0 = time.perf_counter(), time.process_time()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                results.append((name, concurrency, calls / wall, 1e6 * cpu / calls))
    finally:
        await client.aclose()
    return results


def _markdown(
    rows: list[bench_run.Row],
    ops: list[tuple[str, int, float, float]],
    info: dict[str, str],
    plan: bench_run.Plan,
    took_s: float,
) -> str:
    lines = [
        "# Scale-out cost: replicas on PostgreSQL + Redis vs one gateway on SQLite",
        "",
        "Generated by `bench/replicas.py` (its docstring says what runs); loopback only.",
        "",
        "```sh",
        ".venv/bin/python bench/replicas.py",
        "```",
        "",
        f"- date: {info['date']}, run took {took_s:.0f} s; code: {info.get('code', '?')}",
        f"- machine: {info['nproc']} cores, {info['cpu']}, Python {info['python']}; PostgreSQL and Redis on the "
        "same machine (their CPU is not in the gateway's CPU µs/req, and they share the two cores)",
        f"- load: `wrk -t1 -c50 -d{plan.d50}s --latency` after {plan.warmup} s of warm-up, then "
        f"`-c1 -d{plan.d1}s`; polls cycle over {plan.tasks} tasks",
        "",
        "| row | what | req/s (c50) | p50 ms | p99 ms | c1 p50 ms | c1 p99 ms | CPU µs/req | errors | check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c50, c1 = row.c50, row.c1
        assert c50 is not None and c1 is not None
        cpu = 1e6 * row.cpu_s / max(c50.requests, 1)
        lines.append(
            f"| {row.name} | {row.what} | {c50.rps:,.0f} | {c50.p50_ms:.2f} | {c50.p99_ms:.2f} | {c1.p50_ms:.3f} | "
            f"{c1.p99_ms:.3f} | {cpu:.0f} | {c50.errors + c1.errors} | {row.check or '-'} |"
        )
    lines += [
        "",
        "Redis operations alone (`gateway.shared.redis_ops`, in the bench process, uvloop):",
        "",
        "| operation | concurrent callers | calls/s | CPU µs per call |",
        "|---|---|---|---|",
        *(f"| {name} | {concurrency} | {rate:,.0f} | {cpu:.0f} |" for name, concurrency, rate, cpu in ops),
    ]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.name} alone")
    parser.add_argument("--no-budget", action="store_true", help="the bench key without a monthly budget")
    args = parser.parse_args(argv)
    missing = missing_tools(["wrk", "nginx"])
    if missing:
        print(f"error: {', '.join(missing)} not found; install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    plan = bench_run.Plan(d50=8, d1=3, warmup=2, profile_s=0, tasks=400, profile=False)
    info = machine_info()
    info["code"] = bench_run.code_version()
    schema, prefix = f"bench_{secrets.token_hex(4)}", f"bench-{secrets.token_hex(4)}:"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-replicas-") as tmp_s:
        tmp = Path(tmp_s)
        tmp.chmod(0o755)  # nginx workers drop to an unprivileged user when started as root
        procs = Procs(tmp)
        try:
            with hard_limit(HARD_LIMIT_S):
                rows = _rows(procs, tmp, plan, schema, prefix, budget=not args.no_budget)
                ops = uvloop.run(_redis_ops(prefix))
        except Aborted as exc:
            print(f"\naborted ({exc}); stopping subprocesses", file=sys.stderr)
            return 1
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
            asyncio.run(_drop_schema(schema))
            asyncio.run(_drop_prefix(prefix))
    text = _markdown(rows, ops, info, plan, time.monotonic() - started)
    print("\n" + text)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        print(f"wrote {RESULTS_MD.relative_to(Path.cwd()) if RESULTS_MD.is_relative_to(Path.cwd()) else RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
