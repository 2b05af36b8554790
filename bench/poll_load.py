"""Polling load: many clients poll every task every second; count what reaches the upstream.

    .venv/bin/python bench/poll_load.py [--clients 200] [--tasks 50] [--seconds 60] [--procs N]
                                        [--queued-s 2] [--run-s 20] [--pending-ttl-s 2]

The "done when" of the status-cache issue: a load of 200 clients polling 50 tasks every second for the tasks'
lifetime produces no more than one upstream status call per task per ``pending_ttl_s``, and every task ends
settled in the ledger. One process runs, in one event loop (uvloop when installed), on loopback ephemeral ports:

* the sandbox upstream (``create_sandbox_app``), wrapped in an ASGI counter that records when each
  ``GET /v1/videos/{id}`` arrives, per task;
* the gateway (``create_app`` with ``load_settings(env=...)``: keys mode, one key issued through the admin API,
  the default ``pending_ttl_s``, the settler on), under uvicorn with lifespan.

The tasks are submitted through the gateway, then ``--procs`` client processes (spawned, so they get CPUs of
their own) run the clients: each client polls every unfinished task once a second, its polls spread evenly over
the second and the clients' phases spread evenly too, one request at a time (so at most ``--clients`` connections),
skipping slots it is too late for rather than bursting. A client stops polling a task once it has seen it
terminal, and stops altogether when all are, or at ``--seconds``. Then the ledger is read back
(``GET /gateway/tasks`` with the key) until every task is settled.

Reported: client polls (achieved vs offered rate), their X-Cache split and latency; upstream status calls, per
task and per ``pending_ttl_s`` window (the ratio the issue bounds by 1: calls / (span of the task's calls + one
ttl) / ttl, and the most calls any task got in any ttl-long sliding window), and whether every task is settled.
Exit status 0 when the bound holds and every task settled, 1 otherwise. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.catalog import TERMINAL
from gateway.config import load_settings
from gateway.sandbox import SandboxOptions, create_sandbox_app, serve_app

T = TypeVar("T")

STATUS_PREFIX = "/v1/videos/"
SUBMIT = "/v1/video/generations"
MODEL = "kling-v3-std-silent"
UPSTREAM_KEY = "sk-bench-" + secrets.token_hex(8)


# ----------------------------------------------------------------------------------------------------
# Running coroutines (uvloop when available)
# ----------------------------------------------------------------------------------------------------


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` to completion in a fresh event loop, uvloop's when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


# ----------------------------------------------------------------------------------------------------
# Counting the upstream
# ----------------------------------------------------------------------------------------------------


class CountingUpstream:
    """ASGI wrapper that records the arrival time (monotonic) of every status call, per task, and submissions."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.status_calls: dict[str, list[float]] = defaultdict(list)
        self.submissions = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if scope["method"] == "GET" and path.startswith(STATUS_PREFIX):
                self.status_calls[path[len(STATUS_PREFIX) :]].append(time.monotonic())
            elif scope["method"] == "POST" and path == SUBMIT:
                self.submissions += 1
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------------
# The clients (in their own processes)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientPlan:
    """What one client process runs: its clients' indices among all, the tasks, where and how long."""

    base_url: str
    key: str
    task_ids: tuple[str, ...]
    client_indices: tuple[int, ...]
    total_clients: int
    max_seconds: float


@dataclass
class ClientReport:
    """What one client process saw."""

    polls: int = 0
    errors: int = 0
    skipped_slots: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    x_cache: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    terminal_seen_at: dict[str, float] = field(default_factory=dict)  # first time any client here saw it
    finished_at: float = 0.0
    timed_out: bool = False


async def one_client(
    session: aiohttp.ClientSession, plan: ClientPlan, index: int, start: float, report: ClientReport
) -> None:
    """Poll every unfinished task once a second, slots spread evenly; skip slots already missed."""
    n = len(plan.task_ids)
    slot_s = 1.0 / n
    phase = (index / plan.total_clients) * slot_s  # the clients' slots interleave
    first_task = index % n  # and they start on different tasks
    headers = {"Authorization": f"Bearer {plan.key}"}
    done: set[str] = set()
    deadline = start + plan.max_seconds
    slot = 0
    while len(done) < n:
        due = start + phase + slot * slot_s
        now = time.monotonic()
        if now >= deadline:
            report.timed_out = True
            return
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > slot_s:  # too late for this slot: move on rather than burst
            report.skipped_slots += 1
            slot += 1
            continue
        task_id = plan.task_ids[(first_task + slot) % n]
        slot += 1
        if task_id in done:
            continue
        sent = time.monotonic()
        try:
            async with session.get(plan.base_url + STATUS_PREFIX + task_id, headers=headers) as response:
                body = await response.read()
                report.statuses[response.status] += 1
                report.x_cache[response.headers.get("x-cache", "-")] += 1
        except (aiohttp.ClientError, TimeoutError):
            report.errors += 1
            continue
        finally:
            report.latencies_s.append(time.monotonic() - sent)
            report.polls += 1
        if response.status == 200 and orjson.loads(body).get("status") in TERMINAL:
            done.add(task_id)
            report.terminal_seen_at.setdefault(task_id, time.monotonic())


async def client_process_main(plan: ClientPlan, conn: multiprocessing.connection.Connection) -> ClientReport:
    """Connect, say ready, wait for the start time, run the clients, return the report."""
    report = ClientReport()
    connector = aiohttp.TCPConnector(limit=len(plan.client_indices), limit_per_host=len(plan.client_indices))
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        conn.send("ready")
        start: float = await asyncio.to_thread(conn.recv)
        await asyncio.gather(*(one_client(session, plan, i, start, report) for i in plan.client_indices))
    report.finished_at = time.monotonic()
    return report


def client_process(plan: ClientPlan, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a spawned client process."""
    report = run(lambda: client_process_main(plan, conn))
    conn.send(report)
    conn.close()


# ----------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """The most of ``times`` (sorted) falling in any half-open interval ``[t, t + window_s)``."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@dataclass(frozen=True)
class UpstreamStats:
    """Upstream status calls against the ttl: totals, per task, per window."""

    calls: int
    per_task_min: int
    per_task_max: int
    windows: float
    ratio: float
    worst_task_ratio: float
    max_in_any_window: int
    min_gap_s: float


def upstream_stats(calls: dict[str, list[float]], task_ids: Sequence[str], ttl_s: float) -> UpstreamStats:
    """Calls per task per ``ttl_s`` window: a task whose calls span S seconds covers S/ttl + 1 windows."""
    counts = [len(calls.get(t, [])) for t in task_ids]
    windows, worst = 0.0, 0
    ratios: list[float] = []
    gaps: list[float] = []
    for task_id in task_ids:
        times = sorted(calls.get(task_id, []))
        if not times:
            continue
        covered = (times[-1] - times[0]) / ttl_s + 1
        windows += covered
        ratios.append(len(times) / covered)
        worst = max(worst, max_in_window(times, ttl_s))
        gaps.extend(b - a for a, b in itertools.pairwise(times))
    return UpstreamStats(
        calls=sum(counts),
        per_task_min=min(counts, default=0),
        per_task_max=max(counts, default=0),
        windows=windows,
        ratio=sum(counts) / windows if windows else 0.0,
        worst_task_ratio=max(ratios, default=0.0),
        max_in_any_window=worst,
        min_gap_s=min(gaps, default=math.inf),
    )


def merge(reports: Sequence[ClientReport]) -> ClientReport:
    """One report for every client process."""
    total = ClientReport()
    for r in reports:
        total.polls += r.polls
        total.errors += r.errors
        total.skipped_slots += r.skipped_slots
        total.statuses.update(r.statuses)
        total.x_cache.update(r.x_cache)
        total.latencies_s.extend(r.latencies_s)
        for task_id, at in r.terminal_seen_at.items():
            total.terminal_seen_at[task_id] = min(at, total.terminal_seen_at.get(task_id, at))
        total.finished_at = max(total.finished_at, r.finished_at)
        total.timed_out = total.timed_out or r.timed_out
    total.latencies_s.sort()
    return total


def metric_values(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    """A counter's samples by one label's value."""
    values: dict[str, float] = defaultdict(float)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                values[sample.labels.get(label, "")] += sample.value
    return dict(values)


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


async def gateway_json(
    session: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None
) -> tuple[int, Any]:
    """One JSON request to the gateway with a bearer token."""
    async with session.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, orjson.loads(await response.read())


async def ledger_rows(session: aiohttp.ClientSession, base: str, key: str) -> dict[str, dict[str, Any]]:
    """The key's ledger rows by task id (``GET /gateway/tasks``, every page)."""
    rows: dict[str, dict[str, Any]] = {}
    cursor = ""
    while True:
        status, page = await gateway_json(session, "GET", f"{base}/gateway/tasks?limit=1000{cursor}", key)
        if status != 200:
            raise RuntimeError(f"GET /gateway/tasks: {status} {page}")
        rows.update((row["task_id"], row) for row in page["data"])
        if not page.get("next_cursor"):
            return rows
        cursor = f"&cursor={quote(str(page['next_cursor']), safe='')}"


async def bench(args: argparse.Namespace) -> int:
    """Start the sandbox and the gateway, submit, poll, settle, report."""
    sandbox_options = SandboxOptions(api_key=UPSTREAM_KEY, queued_s=args.queued_s, run_s=args.run_s)
    upstream = CountingUpstream(create_sandbox_app(sandbox_options))
    admin_token = secrets.token_hex(16)
    registry = CollectorRegistry()
    logs = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="poll-load-") as data_dir:
        async with serve_app(upstream, lifespan="off") as sandbox:
            env = {
                "UNIALL_BASE_URL": sandbox.url,
                "UNIALL_API_KEY": UPSTREAM_KEY,
                "KLING_GATEWAY_ADMIN_TOKEN": admin_token,
                "KLING_GATEWAY_SERVER_DATA_DIR": data_dir,
                "KLING_GATEWAY_AUTH_MODE": "keys",
                "KLING_GATEWAY_SETTLER_ENABLED": "true",
                "KLING_GATEWAY_SETTLER_IDLE_S": str(args.settler_idle_s),
                "KLING_GATEWAY_CACHE_PENDING_TTL_S": str(args.pending_ttl_s),
                "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
                "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
                "KLING_GATEWAY_LOGGING_LEVEL": "warning",
            }
            settings = load_settings(env=env)
            app = create_app(settings, registry=registry, log_stream=logs)
            async with serve_app(app, lifespan="on") as gateway:
                code = await drive(args, gateway.url, admin_token, upstream, registry, settings.cache.pending_ttl_s)
    problems = [line for line in logs.getvalue().splitlines() if line.strip()]
    print(f"gateway log lines at warning or above: {len(problems)}")
    for line in problems[:10]:
        print(f"  {line[:300]}")
    return code


async def drive(
    args: argparse.Namespace,
    base: str,
    admin_token: str,
    upstream: CountingUpstream,
    registry: CollectorRegistry,
    ttl_s: float,
) -> int:
    """Everything between start-up and shutdown; prints the report and returns the exit status."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        status, created = await gateway_json(session, "POST", f"{base}/gateway/keys", admin_token, {"name": "bench"})
        if status != 201:
            raise RuntimeError(f"creating the key: {status} {created}")
        key: str = created["key"]
        submitted_at: dict[str, float] = {}
        for i in range(args.tasks):
            body = {"model": MODEL, "prompt": f"poll load task {i}", "duration": 5}
            status, answer = await gateway_json(session, "POST", f"{base}{SUBMIT}", key, body)
            if status != 200:
                raise RuntimeError(f"submission {i}: {status} {answer}")
            submitted_at[answer["task_id"]] = time.monotonic()
        task_ids = tuple(submitted_at)

        reports, wall_s, cpu_s = await run_clients(args, base, key, task_ids)
        clients = merge(reports)

        settle_start = time.monotonic()
        rows: dict[str, dict[str, Any]] = {}
        while time.monotonic() - settle_start < args.settle_s:
            rows = await ledger_rows(session, base, key)
            if all(rows.get(t, {}).get("settled") is not None for t in task_ids):
                break
            await asyncio.sleep(0.2)
        settle_wait_s = time.monotonic() - settle_start

    stats = upstream_stats(upstream.status_calls, task_ids, ttl_s)
    settled = [t for t in task_ids if rows.get(t, {}).get("settled") is not None]
    outcomes = Counter(str(rows.get(t, {}).get("outcome")) for t in task_ids)
    cache_metric = metric_values(registry, "kling_gateway_status_cache_total", "result")
    settled_metric = metric_values(registry, "kling_gateway_tasks_settled_total", "outcome")
    lifetimes = sorted(clients.terminal_seen_at[t] - submitted_at[t] for t in clients.terminal_seen_at)
    lat = clients.latencies_s
    offered = args.clients * args.tasks
    bound_ok = stats.max_in_any_window <= 1
    all_settled = len(settled) == len(task_ids)

    print(
        f"machine: nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), python {platform.python_version()}"
    )
    print(
        f"load: {args.clients} clients x {args.tasks} tasks, each task polled once a second per client "
        f"(offered {offered:,} polls/s), {args.procs} client process(es); sandbox queued {args.queued_s} s + "
        f"run {args.run_s} s; pending_ttl_s {ttl_s}, settler idle_s {args.settler_idle_s}"
    )
    print(
        f"client polls: {clients.polls:,} in {wall_s:.1f} s = {clients.polls / wall_s:,.0f}/s achieved "
        f"({clients.polls / wall_s / offered:.0%} of offered; {clients.skipped_slots:,} late slots skipped); "
        f"errors {clients.errors}; timed out: {clients.timed_out}"
    )
    print(f"  HTTP status: {dict(sorted(clients.statuses.items()))}; X-Cache: {dict(sorted(clients.x_cache.items()))}")
    print(f"  gateway kling_gateway_status_cache_total: {dict(sorted(cache_metric.items()))}")
    print(
        f"  latency p50 {percentile(lat, 50) * 1000:.1f} ms, p90 {percentile(lat, 90) * 1000:.1f} ms, "
        f"p99 {percentile(lat, 99) * 1000:.1f} ms, max {(lat[-1] if lat else 0) * 1000:.1f} ms"
    )
    print(f"  client CPU {cpu_s:.1f} s; gateway+sandbox process CPU {process_cpu_s():.1f} s")
    if lifetimes:
        print(
            f"  task lifetime (submitted -> first client sees terminal): {lifetimes[0]:.1f}-{lifetimes[-1]:.1f} s; "
            f"{len(lifetimes)}/{len(task_ids)} seen terminal"
        )
    print(
        f"upstream: {upstream.submissions} submissions; {stats.calls:,} status calls "
        f"({stats.per_task_min}-{stats.per_task_max} per task) for {clients.polls:,} client polls "
        f"= 1 upstream call per {clients.polls / max(1, stats.calls):,.0f} polls"
    )
    print(
        f"  calls per task per pending_ttl_s window: {stats.ratio:.3f} overall (calls / windows covered, "
        f"{stats.calls} / {stats.windows:.1f}); worst task {stats.worst_task_ratio:.3f}"
    )
    print(
        f"  most calls any task got in any {ttl_s} s window: {stats.max_in_any_window}; "
        f"smallest gap between two calls of one task: {stats.min_gap_s:.3f} s"
    )
    print(
        f"ledger: {len(settled)}/{len(task_ids)} tasks settled (outcomes {dict(outcomes)}), "
        f"{settle_wait_s:.1f} s after the clients stopped; tasks_settled_total {dict(settled_metric)}"
    )
    print(f"RESULT: <=1 upstream call per task per pending_ttl_s: {'yes' if bound_ok else 'NO'}; ", end="")
    print(f"every task settled: {'yes' if all_settled else 'NO'}")
    return 0 if bound_ok and all_settled else 1


async def run_clients(
    args: argparse.Namespace, base: str, key: str, task_ids: tuple[str, ...]
) -> tuple[list[ClientReport], float, float]:
    """Spawn the client processes, start them together, collect their reports (and wall and CPU seconds)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
    try:
        for p in range(args.procs):
            plan = ClientPlan(
                base_url=base,
                key=key,
                task_ids=task_ids,
                client_indices=tuple(range(p, args.clients, args.procs)),
                total_clients=args.clients,
                max_seconds=args.seconds,
            )
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(plan, theirs), name=f"poll-clients-{p}", daemon=True)
            proc.start()
            theirs.close()
            procs.append((proc, ours))
        for _, conn in procs:
            if await asyncio.to_thread(conn.recv) != "ready":
                raise RuntimeError("a client process did not start")
        cpu_before = children_cpu_s()
        start = time.monotonic() + 0.1
        for _, conn in procs:
            conn.send(start)
        reports: list[ClientReport] = [await asyncio.to_thread(conn.recv) for _, conn in procs]
        for child, _ in procs:
            await asyncio.to_thread(child.join, 10)
        wall = max(r.finished_at for r in reports) - start
        return reports, wall, children_cpu_s() - cpu_before
    finally:
        for child, conn in procs:
            conn.close()
            if child.is_alive():
                child.terminate()
                child.join(5)


def children_cpu_s() -> float:
    """CPU seconds of waited-for child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s() -> float:
    """CPU seconds of this process (the gateway and the sandbox, and the setup)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=200, help="polling clients (default 200)")
    parser.add_argument("--tasks", type=int, default=50, help="tasks submitted and polled (default 50)")
    parser.add_argument("--seconds", type=float, default=60.0, help="upper bound on the polling phase (default 60)")
    parser.add_argument(
        "--procs",
        type=int,
        default=max(1, min(4, len(os.sched_getaffinity(0)) - 1)),
        help="client processes (default: usable CPUs - 1, 1 to 4)",
    )
    parser.add_argument("--queued-s", type=float, default=2.0, help="sandbox: seconds a task stays queued")
    parser.add_argument("--run-s", type=float, default=20.0, help="sandbox: seconds a task runs")
    parser.add_argument("--pending-ttl-s", type=float, default=2.0, help="the gateway's [cache] pending_ttl_s")
    parser.add_argument(
        "--settler-idle-s",
        type=float,
        default=5.0,
        help="the gateway's [settler] idle_s (default 5: a run cut short by --seconds still settles quickly)",
    )
    parser.add_argument("--settle-s", type=float, default=30.0, help="upper bound on waiting for the ledger")
    args = parser.parse_args(argv)
    if min(args.clients, args.tasks, args.procs) < 1 or min(args.seconds, args.pending_ttl_s, args.settle_s) <= 0:
        parser.error("--clients, --tasks, --procs, --seconds, --pending-ttl-s and --settle-s must be positive")
    if args.settler_idle_s < 0:
        parser.error("--settler-idle-s must not be negative")
    args.procs = min(args.procs, args.clients)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        code = run(lambda: bench(args))
        print(f"total run time {time.monotonic() - started:.1f} s")
        return code
    return 130


if __name__ == "__main__":
    sys.exit(main())
