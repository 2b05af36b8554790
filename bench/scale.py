"""Scale of data (issue 7): the gateway on an empty ledger vs a ledger of 1,000,000 tasks, in one run (loopback only).

    .venv/bin/python bench/scale.py            # full run (~3.5 min, hard limit 290 s); writes bench/results-scale.md
    .venv/bin/python bench/scale.py --no-write # print only

What it measures, with ``bench/run.py``'s nginx fake upstream, Lua scripts and gateway start-up (production
settings, ``KLING_GATEWAY_CACHE_PENDING_TTL_S=3600``):

1. cached status polls and submissions (``wrk -t1 -c50 -d8s --latency`` after a 2 s warm-up) on an empty ledger
   and on a ledger pre-filled with 1,000,000 tasks (``bench/ledger_scale.py``'s generated month of 900,000 tasks
   for 20 other keys, plus 100,000 pending tasks of the bench key submitted in the last hour), bulk-inserted into
   the data directory's ``gateway.db`` before the gateway starts. In both cases the polls cycle over 400 tasks
   submitted through the gateway, as in ``bench/run.py``. Both gateways run at once and take turns, three rounds
   (the first of each round alternating); the figures are medians over the rounds, since a single pair of runs on
   this shared VM swings by more than the 20% being judged. Target: the 1M figures within 20% of the empty ones.
2. the gateway's RSS (``VmRSS``) after a fresh start on the 1M ledger, and after polling each of the bench key's
   100,000 pending tasks once (every poll a miss: ledger read, upstream call, status cached). Target < 150 MB.
3. wall time of ``python -m gateway usage --since 2026-01-01 --until 2026-01-31 --by key,model`` on the 1M ledger
   (the generated month), three runs. Target < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import secrets
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import run as bench_run
from common import (
    INSTALL_HINT,
    Aborted,
    Procs,
    WrkResult,
    child_env,
    free_port,
    hard_limit,
    http_request,
    loopback_only,
    machine_info,
    missing_tools,
    nginx_argv,
    nginx_conf,
    parse_wrk,
    run_wrk,
    wait_until,
)
from ledger_scale import _settled, generate

from gateway.store import open_store
from gateway.store.base import TaskRecord
from gateway.store.rows import task_row
from gateway.store.sqlite import _SQL_INSERT_TASK, _SQL_REBUILD_ROLLUP, _SQL_UPSERT_BODY

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "results-scale.md"
HARD_LIMIT_S = 290
TOTAL_TASKS = 1_000_000
BENCH_TASKS = 100_000  # pending tasks of the bench key, part of the 1M
OTHER_KEYS = 20
POLL_TASKS = 400  # tasks the throughput polls cycle over (as bench/run.py)
DURATION_S = 8
ROUNDS = 3
WARMUP_S = 2
USAGE_ARGS = ["--since", "2026-01-01", "--until", "2026-01-31", "--by", "key,model"]


# ----------------------------------------------------------------------------------------------------
# The 1M ledger
# ----------------------------------------------------------------------------------------------------


def bench_tasks(count: int, now: float) -> Iterator[TaskRecord]:
    """``count`` pending tasks of the ``bench`` key, submitted over the last hour (the settler's 5/s barely
    touches them during the run)."""
    template, _ = next(generate(1, 1, seed=7))
    step = 3600.0 / count
    for n in range(count):
        at = now - 3600.0 + n * step
        yield replace(
            template,
            task_id=f"task_bench{n:06d}",
            key_name="bench",
            request_id=f"req_bench{n:06d}",
            submitted_at=at,
            status="in_progress",
            progress=10,
            last_polled_at=None,
            outcome=None,
            settled_seconds=None,
            settled_usd=None,
            settled_at=None,
        )


def fill_ledger(db: Path, total: int, bench_count: int) -> float:
    """Create and migrate ``db`` the way the gateway does, then bulk-insert ``total`` tasks in one transaction
    (``bench_count`` of them the bench key's) and build the daily rollup; returns the seconds taken."""

    async def create() -> None:
        store = await open_store(f"sqlite:///{db}")
        await store.close()

    asyncio.run(create())
    started = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        batch: list[tuple[object, ...]] = []
        bodies: list[tuple[str, bytes]] = []
        for task, body in generate(total - bench_count, OTHER_KEYS):
            if task.settled_at is None:
                # ledger_scale leaves 15% of the month running; months later the settler would long since have
                # given up on them (task_max_age_s = 1 day). Left unsettled, the gateway spends the run marking
                # 135,000 tasks unknown in the background (see results-scale.md), which is not steady state.
                seconds = Decimal(task.estimate_seconds)
                task = _settled(task, "unknown", seconds, task.estimate_usd, task.submitted_at + 86400)
            batch.append(task_row(task))
            if body is not None:
                bodies.append((task.task_id, body))
            if len(batch) >= 50_000:
                conn.executemany(_SQL_INSERT_TASK, batch)
                conn.executemany(_SQL_UPSERT_BODY, bodies)
                batch, bodies = [], []
        conn.executemany(_SQL_INSERT_TASK, batch)
        conn.executemany(_SQL_UPSERT_BODY, bodies)
        conn.executemany(_SQL_INSERT_TASK, (task_row(t) for t in bench_tasks(bench_count, time.time())))
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM usage_daily")
        conn.execute(_SQL_REBUILD_ROLLUP)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        (count,) = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()
        (mine,) = conn.execute("SELECT COUNT(*) FROM tasks WHERE key_name = 'bench'").fetchone()
    finally:
        conn.close()
    if count != total or mine != bench_count:
        raise RuntimeError(f"ledger fill: {count:,} tasks ({mine:,} of the bench key), wanted {total:,}")
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Throughput:
    """One ledger's rounds; ``poll`` and ``submit`` are their medians (rates and percentiles taken separately)."""

    polls: list[WrkResult]
    submits: list[WrkResult]
    checks: list[str]
    key: str

    @property
    def poll(self) -> WrkResult:
        return median_run(self.polls)

    @property
    def submit(self) -> WrkResult:
        return median_run(self.submits)


def median_run(runs: list[WrkResult]) -> WrkResult:
    """The median of each figure over ``runs`` (counts summed)."""
    return WrkResult(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        seconds=sum(r.seconds for r in runs),
    )


@dataclasses.dataclass
class Side:
    """A running gateway on one ledger, with the bench key and its Lua scripts."""

    name: str
    gw: bench_run.Gateway
    key: str
    poll_url: str
    poll_script: Path
    submit_url: str
    submit_script: Path


def prepare(procs: Procs, tmp: Path, name: str, upstream: str, data_dir: Path, admin: str) -> Side:
    """Start the gateway (cache TTL 3600 s), create the bench key and the 400 tasks its polls cycle over."""
    gw = bench_run.start_gateway(procs, tmp, name, upstream, data_dir, admin, pending_ttl_s=3600)
    key = bench_run.create_key(gw, admin)
    task_ids = bench_run.create_tasks(gw, key, POLL_TASKS)
    bench_run.expect_poll(gw, key, task_ids[0], "MISS")
    bench_run.expect_poll(gw, key, task_ids[0], "HIT")
    return Side(
        name,
        gw,
        key,
        f"{gw.base}/v1/videos/{task_ids[0]}",
        bench_run.poll_script(tmp, f"{name}-poll", f"Bearer {key}", task_ids),
        f"{gw.base}/v1/video/generations",
        bench_run.submit_script(tmp, f"{name}-submit", f"Bearer {key}"),
    )


def measure_round(side: Side, into: Throughput) -> None:
    """One round on ``side``: cached polls, then submissions (each after its own warm-up)."""
    for url, script, check, runs in (
        (side.poll_url, side.poll_script, bench_run.cache_check, into.polls),
        (side.submit_url, side.submit_script, bench_run.submit_check, into.submits),
    ):
        run_wrk(url, 50, WARMUP_S, script=script)
        before = bench_run.scrape(side.gw)
        res = run_wrk(url, 50, DURATION_S, script=script)
        runs.append(res)
        into.checks.append(check(before, bench_run.scrape(side.gw), res))
    poll, submit = into.polls[-1], into.submits[-1]
    print(
        f"  {side.name}: poll {poll.rps:,.0f} req/s p50 {poll.p50_ms:.2f} p99 {poll.p99_ms:.2f} ms; "
        f"submit {submit.rps:,.0f} req/s p50 {submit.p50_ms:.2f} p99 {submit.p99_ms:.2f} ms",
        flush=True,
    )


def distinct_poll_script(tmp: Path, authorization: str, task_ids: list[str]) -> Path:
    """Each id once, in order; the thread stops when all have been answered (a few extra polls may repeat the
    first ids: cache hits, which add nothing)."""
    path = tmp / "distinct-poll.lua"
    ids = ",\n".join(f'  "{t}"' for t in task_ids)
    path.write_text(
        f"local ids = {{\n{ids}\n}}\n"
        "local n = 0\n"
        "local answered = 0\n"
        f'wrk.headers["Authorization"] = {bench_run.lua_string(authorization)}\n'
        "request = function()\n"
        "  n = n + 1\n"
        '  return wrk.format("GET", "/v1/videos/" .. ids[((n - 1) % #ids) + 1])\n'
        "end\n"
        "response = function(status, headers, body)\n"
        "  answered = answered + 1\n"
        "  if answered >= #ids then wrk.thread:stop() end\n"
        "end\n"
    )
    return path


@dataclasses.dataclass
class Memory:
    rss_before_mb: float
    rss_after_mb: float
    polls: WrkResult
    answered_in_s: float
    misses: float
    hits: float


def answered_polls(before: dict[str, float], after: dict[str, float]) -> float:
    return sum(
        bench_run.delta(before, after, "kling_gateway_status_cache_total", result=result) for result in ("miss", "hit")
    )


def memory(procs: Procs, tmp: Path, upstream: str, data_dir: Path, admin: str, key: str, limit_s: int) -> Memory:
    """A fresh gateway on the 1M ledger; RSS before and after polling each of the bench key's 100,000 tasks once.

    wrk's Lua thread stops once every id is answered, but wrk itself sleeps out its ``-d``, and its req/s counts
    that whole time. So the polls are timed here, from the gateway's own cache counter, and wrk is then told to
    stop (SIGINT: it still prints its report, whose latency percentiles are the ones recorded).
    """
    name = "gateway-rss"
    gw = bench_run.start_gateway(procs, tmp, name, upstream, data_dir, admin, pending_ttl_s=3600)
    try:
        ids = [f"task_bench{n:06d}" for n in range(BENCH_TASKS)]
        bench_run.expect_poll(gw, key, ids[0], "MISS")
        time.sleep(1.0)
        before = gw.rss_mb()
        m0 = bench_run.scrape(gw)
        script = distinct_poll_script(tmp, f"Bearer {key}", ids[1:])
        seconds = max(10, limit_s)
        argv = ["wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", "--timeout", "5s", "-s", str(script)]
        argv.append(loopback_only(f"{gw.base}/v1/videos/{ids[1]}"))
        started = time.monotonic()
        wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            answered_in_s = float(seconds)
            while wrk.poll() is None and time.monotonic() - started < seconds:
                time.sleep(0.2)
                if answered_polls(m0, bench_run.scrape(gw)) >= len(ids) - 1:
                    answered_in_s = time.monotonic() - started
                    wrk.send_signal(signal.SIGINT)
                    break
            out, err = wrk.communicate(timeout=seconds + 15)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        if wrk.returncode != 0:
            raise RuntimeError(f"wrk failed ({wrk.returncode}): {err or out}")
        polls = parse_wrk(out)
        m1 = bench_run.scrape(gw)
        time.sleep(1.0)
        after = gw.rss_mb()
        misses = bench_run.delta(m0, m1, "kling_gateway_status_cache_total", result="miss") + 1
        hits = bench_run.delta(m0, m1, "kling_gateway_status_cache_total", result="hit")
        print(
            f"  RSS: {before:.1f} MB -> {after:.1f} MB after {polls.requests:,} polls answered in "
            f"{answered_in_s:.1f} s ({polls.errors} errors; cache misses {misses:,.0f}, hits {hits:,.0f})",
            flush=True,
        )
        return Memory(before, after, polls, answered_in_s, misses, hits)
    finally:
        procs.stop(name, timeout=20)


@dataclasses.dataclass
class Usage:
    seconds: list[float]
    rows: int


def usage(data_dir: Path) -> Usage:
    env = child_env(
        {"KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir)},
        drop_prefixes=("KLING_GATEWAY_", "UNIALL_", "PROMETHEUS_MULTIPROC_DIR"),
    )
    argv = [sys.executable, "-m", "gateway", "usage", *USAGE_ARGS]
    times = []
    out = None
    for _ in range(3):
        started = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env, cwd=REPO)
        times.append(time.perf_counter() - started)
        if out.returncode != 0:
            raise RuntimeError(f"usage exited {out.returncode}: {out.stderr[-500:]}")
    assert out is not None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    print(f"  usage: {', '.join(f'{t:.2f} s' for t in times)} ({len(lines)} output lines)", flush=True)
    print("\n".join("    " + line for line in [*lines[:4], "...", *lines[-2:]]), flush=True)
    return Usage(times, len(lines))


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    empty: Throughput
    full: Throughput
    mem: Memory
    use: Usage
    fill_s: float
    db_mb: float
    info: dict[str, str]
    command: str
    elapsed_s: float


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(res: Results) -> list[tuple[str, str, str, str, bool]]:
    """(figure, empty ledger, 1M ledger, target, met) rows."""
    rows = []
    for what, e, f in (("poll (cached)", res.empty.poll, res.full.poll), ("submit", res.empty.submit, res.full.submit)):
        ratio = f.rps / e.rps
        rows.append(
            (f"{what} req/s", f"{e.rps:,.0f}", f"{f.rps:,.0f} ({ratio:.2f}x)", "≥ 0.80x of empty", ratio >= 0.8)
        )
        for pct in ("p50", "p99"):
            a, b = getattr(e, f"{pct}_ms"), getattr(f, f"{pct}_ms")
            ok = b <= a * 1.2
            rows.append((f"{what} {pct} ms", f"{a:.2f}", f"{b:.2f} ({b / a:.2f}x)", "≤ 1.20x of empty", ok))
    m = res.mem
    enough = m.polls.requests >= BENCH_TASKS - 1 and m.polls.errors == 0
    rows.append(
        (
            f"gateway RSS, {BENCH_TASKS:,} distinct pending tasks polled once (cached)",
            "-",
            f"{m.rss_before_mb:.1f} MB -> {m.rss_after_mb:.1f} MB",
            "< 150 MB",
            m.rss_after_mb < 150 and enough,
        )
    )
    worst = max(res.use.seconds)
    rows.append(
        (
            "`usage` for a month, by key,model (wall time, 3 runs)",
            "-",
            " / ".join(f"{t:.2f} s" for t in res.use.seconds),
            "< 2 s",
            worst < 2.0,
        )
    )
    return rows


def _round(run: WrkResult) -> str:
    return f"{run.rps:,.0f}, {run.p50_ms:.2f} / {run.p99_ms:.2f}"


def _checks(side: Throughput) -> str:
    """Round by round: the poll check, then the submit check (``measure_round`` appends them in that order)."""
    pairs = zip(side.checks[::2], side.checks[1::2], strict=True)
    return "; ".join(f"round {n}: poll {poll}, submit {submit}" for n, (poll, submit) in enumerate(pairs, 1))


def markdown(res: Results) -> str:
    info = res.info
    lines = [
        "# Scale of data (issue 7): empty ledger vs 1,000,000 tasks",
        "",
        "Generated by `bench/scale.py` (see its docstring for what runs); loopback only, one gateway process.",
        "",
        "```sh",
        res.command,
        "```",
        "",
        f"- date: {info['date']}, run took {res.elapsed_s:.0f} s",
        f"- machine: {info['nproc']} cores (nproc), {info['cpu']}, kernel {info['kernel']}, Python {info['python']}",
        f"- tools: {info['nginx']}, {info['wrk']}",
        f"- code: {info.get('code', '?')}",
        f"- load: `wrk -t1 -c50 -d{DURATION_S}s --latency` after a {WARMUP_S} s warm-up, "
        f"`KLING_GATEWAY_CACHE_PENDING_TTL_S=3600`; polls cycle over {POLL_TASKS} tasks submitted through the "
        "gateway (every poll a cache hit); submissions as `bench/run.py` scenario 3",
        f"- {ROUNDS} interleaved rounds: both gateways run side by side and take turns (polls, then submissions), "
        "the first of each round alternating; each figure below is the median over the rounds, so one noisy "
        "stretch of this shared VM cannot decide a ratio (every round is listed under the table)",
        f"- 1M ledger: {TOTAL_TASKS - BENCH_TASKS:,} tasks of `bench/ledger_scale.py`'s month (January 2026, "
        f"{OTHER_KEYS} keys, with terminal bodies; its 15% still-running tasks stored as settled `unknown`, as the "
        f"settler leaves them a day after submission) + {BENCH_TASKS:,} pending tasks of the bench key (last hour), "
        f"bulk-inserted in {res.fill_s:.1f} s before the gateway started; file {res.db_mb:,.0f} MiB",
        "",
        "| figure | empty ledger | 1M-task ledger | target | |",
        "|---|---|---|---|---|",
    ]
    for figure, empty, full, target, ok in table(res):
        lines.append(f"| {figure} | {empty} | {full} | {target} | {verdict(ok)} |")
    m = res.mem
    lines += [
        "",
        "Every round (req/s, p50 / p99 ms):",
        "",
        "| round | poll, empty | poll, 1M | submit, empty | submit, 1M |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {_round(pe)} | {_round(pf)} | {_round(se)} | {_round(sf)} |"
            for n, (pe, pf, se, sf) in enumerate(
                zip(res.empty.polls, res.full.polls, res.empty.submits, res.full.submits, strict=True), 1
            )
        ),
        "",
        "Checks from the gateway's `/metrics` during each run:",
        "",
        f"- empty ledger: {_checks(res.empty)}",
        f"- 1M ledger: {_checks(res.full)}",
        f"- RSS run: fresh gateway on the 1M ledger, {m.polls.requests:,} polls answered in {m.answered_in_s:.1f} s "
        f"({m.polls.requests / m.answered_in_s:,.0f} req/s, p50 {m.polls.p50_ms:.2f} ms, p99 {m.polls.p99_ms:.2f} ms, "
        f"{m.polls.errors} errors), cache misses {m.misses:,.0f}, hits {m.hits:,.0f} (a few "
        "tasks were fetched and cached by the settler first, so their one poll is a hit); "
        "VmRSS from `/proc/<pid>/status` one second after the first poll and one second after the last",
        f"- usage: `{' '.join(['.venv/bin/python -m gateway usage', *USAGE_ARGS])}` with "
        f"`KLING_GATEWAY_SERVER_DATA_DIR` at the 1M data dir, {res.use.rows} output lines; process start included",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def start_upstream(procs: Procs, tmp: Path) -> str:
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    conf = nginx_conf(tmp, "upstream", bench_run.UPSTREAM_SERVER, PORT=port, AUTH=bench_run.UPSTREAM_AUTH)
    procs.start("upstream", nginx_argv(tmp, "upstream", conf))
    auth = {"Authorization": bench_run.UPSTREAM_AUTH}
    wait_until(
        lambda: http_request("GET", f"{upstream}/v1/videos/{bench_run.STATIC_TASK}", headers=auth, timeout=1)[0] == 200,
        "upstream nginx",
        10,
        procs.live["upstream"],
    )
    return upstream


def run_all(tmp: Path, procs: Procs, started: float) -> tuple[Throughput, Throughput, Memory, Usage, float, float]:
    upstream = start_upstream(procs, tmp)
    admin = secrets.token_hex(24)

    full_dir = tmp / "data-1m"
    full_dir.mkdir()
    db = full_dir / "gateway.db"
    print(f"filling {db} with {TOTAL_TASKS:,} tasks ...", flush=True)
    fill_s = fill_ledger(db, TOTAL_TASKS, BENCH_TASKS)
    db_mb = sum(p.stat().st_size for p in full_dir.iterdir() if p.name.startswith("gateway.db")) / 2**20
    print(f"  filled in {fill_s:.1f} s, {db_mb:,.0f} MiB", flush=True)

    print(f"1. empty vs 1M-task ledger, {ROUNDS} interleaved rounds", flush=True)
    sides = [
        prepare(procs, tmp, "gateway-empty", upstream, tmp / "data-empty", admin),
        prepare(procs, tmp, "gateway-1m", upstream, full_dir, admin),
    ]
    results = [Throughput([], [], [], side.key) for side in sides]
    try:
        for round_no in range(ROUNDS):
            # alternate which ledger goes first, so neither always gets the machine's first (or last) seconds
            order = [0, 1] if round_no % 2 == 0 else [1, 0]
            for index in order:
                measure_round(sides[index], results[index])
    finally:
        for side in sides:
            procs.stop(side.name, timeout=20)
    empty, full = results

    print(f"2. RSS with {BENCH_TASKS:,} tasks cached", flush=True)
    left = HARD_LIMIT_S - (time.monotonic() - started) - 30
    mem = memory(procs, tmp, upstream, full_dir, admin, full.key, int(left))

    print("3. usage for a month", flush=True)
    use = usage(full_dir)
    return empty, full, mem, use, fill_s, db_mb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.name} alone")
    args = p.parse_args(argv)
    missing = missing_tools(["wrk", "nginx"])
    if missing:
        print(f"error: {', '.join(missing)} not found; install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    command = " ".join(
        [".venv/bin/python", "bench/scale.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    info = machine_info()
    info["code"] = bench_run.code_version()
    started = time.monotonic()
    print(f"scale bench: hard limit {HARD_LIMIT_S} s, {info['nproc']} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="gateway-scale-") as tmp_s:
        tmp = Path(tmp_s)
        tmp.chmod(0o755)  # nginx workers drop to an unprivileged user when started as root
        procs = Procs(tmp)
        try:
            with hard_limit(HARD_LIMIT_S):
                empty, full, mem, use, fill_s, db_mb = run_all(tmp, procs, started)
        except Aborted as exc:
            print(f"\naborted ({exc}); stopping subprocesses", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; stopping subprocesses", file=sys.stderr)
            return 130
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    res = Results(empty, full, mem, use, fill_s, db_mb, info, command, time.monotonic() - started)
    text = markdown(res)
    print()
    print(text)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        print(f"wrote {RESULTS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
