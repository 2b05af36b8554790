"""Soak run: a steady stream of submissions and polls for a bounded time; watch RSS, open fds and /metrics.

    .venv/bin/python bench/soak.py                         # 60 s quick run
    .venv/bin/python bench/soak.py --seconds 600 --write bench/results-soak.md

Starts the sandbox upstream (``kling-gateway sandbox``) and the gateway (``python -m gateway serve``, keys mode,
SQLite ledger in a temporary directory, settler on) as subprocesses on loopback, issues a key through the admin API,
then drives them from this process with ``--clients`` async clients, each submitting a task and polling it every
``--poll-interval-s`` until it ends (sandbox tasks take ``--queued-s + --run-s`` seconds), plus a paced stream of
``--extra-polls-rps`` polls of random earlier tasks (cache hits on settled tasks). Before the load, every
``--sample-s`` seconds of it, at its end and after it, it records the gateway process's RSS (``VmRSS``), open file
descriptors (``/proc/<pid>/fd``), threads, the median of 3 ``/metrics`` scrapes (time and size) and the ledger file
size, and prints (or with ``--write``, saves) a Markdown report with the command, date and machine.

A steady RSS and fd count between the first and last samples under load, and a flat scrape time, are the pass mark;
any request that is not 200 is counted and listed by status. Everything talks to 127.0.0.1 only; the children run
in their own sessions and are stopped (SIGTERM, then SIGKILL) in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ADMIN_TOKEN = "soak-admin-" + os.urandom(16).hex()
UPSTREAM_KEY = "sk-soak-" + os.urandom(8).hex()
SUBMIT = "/v1/video/generations"
BODY = {"model": "kling-v3-std-silent", "prompt": "a lighthouse in a storm, slow dolly in", "duration": 5}
TERMINAL = {"completed", "failed"}
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    """One look at the gateway process."""

    label: str
    elapsed_s: float
    rss_mib: float
    fds: int
    threads: int
    scrape_ms: float
    scrape_kib: float
    db_mib: float
    requests: int
    failures: int


@dataclass
class Load:
    """What the clients did: counts by status, latencies (ms) of the current interval, tasks seen."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    submitted: int = 0
    finished: int = 0
    task_ids: deque[str] = field(default_factory=lambda: deque(maxlen=5000))

    @property
    def requests(self) -> int:
        """Requests answered or failed so far."""
        return sum(self.statuses.values())

    @property
    def failures(self) -> int:
        """Requests not answered 200."""
        return sum(n for status, n in self.statuses.items() if status != "200")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without gateway settings or proxies (loopback must stay loopback), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KLING_GATEWAY_", "UNIALL_")) and not k.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a child in its own session, stdout and stderr to ``log``."""
    with log.open("wb") as handle:
        return subprocess.Popen(
            argv, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM the child's group, wait, then SIGKILL whatever is left of it; the exit status (None if killed)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    return proc.returncode


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Wait until ``url`` answers 200; fail with the log's tail if the child exits."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url}")


async def sample(label: str, started: float, pid: int, client: httpx.AsyncClient, db: Path, load: Load) -> Sample:
    """RSS, fds, threads, /metrics scrape (median of 3) and ledger size of the gateway now."""
    scrapes: list[tuple[float, int]] = []
    for _ in range(3):
        t0 = time.perf_counter()
        response = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        scrapes.append(((time.perf_counter() - t0) * 1000, len(response.content)))
        response.raise_for_status()
    status = proc_status(pid)
    db_bytes = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
    return Sample(
        label=label,
        elapsed_s=time.monotonic() - started,
        rss_mib=int(status["VmRSS"].split()[0]) / 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        scrape_ms=statistics.median(ms for ms, _ in scrapes),
        scrape_kib=statistics.median(size for _, size in scrapes) / 1024,
        db_mib=db_bytes / 2**20,
        requests=load.requests,
        failures=load.failures,
    )


async def timed(client: httpx.AsyncClient, load: Load, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
    """One request, its status and latency recorded; None on a transport error (recorded by its name)."""
    t0 = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        load.statuses[type(exc).__name__] += 1
        return None
    load.latencies_ms.append((time.perf_counter() - t0) * 1000)
    load.statuses[str(response.status_code)] += 1
    return response


async def submitter(client: httpx.AsyncClient, load: Load, until: float, poll_interval_s: float) -> None:
    """Submit a task, poll it until it ends, repeat."""
    while time.monotonic() < until:
        response = await timed(client, load, "POST", SUBMIT, json=BODY)
        if response is None or response.status_code != 200:
            await asyncio.sleep(0.5)
            continue
        task_id = response.json()["task_id"]
        load.submitted += 1
        load.task_ids.append(task_id)
        while time.monotonic() < until:
            await asyncio.sleep(poll_interval_s)
            polled = await timed(client, load, "GET", f"/v1/videos/{task_id}")
            if polled is not None and polled.status_code == 200 and polled.json().get("status") in TERMINAL:
                load.finished += 1
                break


async def extra_poller(client: httpx.AsyncClient, load: Load, until: float, rps: float) -> None:
    """Paced polls of random earlier tasks (settled ones are answered from the cache or the ledger)."""
    if rps <= 0:
        return
    interval = 1.0 / rps
    next_at = time.monotonic()
    while time.monotonic() < until:
        if load.task_ids:
            await timed(client, load, "GET", f"/v1/videos/{random.choice(load.task_ids)}")
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def drive(args: argparse.Namespace, base: str, pid: int, db: Path) -> tuple[list[Sample], Load, float]:
    """Issue a key, sample, run the load for ``--seconds`` sampling every ``--sample-s``, sample after it."""
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits, trust_env=False) as admin:
        created = await admin.post(
            "/gateway/keys", json={"name": "soak"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        created.raise_for_status()
        secret = created.json()["key"]
        load = Load()
        started = time.monotonic()
        samples = [await sample("before load", started, pid, admin, db, load)]
        async with httpx.AsyncClient(
            base_url=base,
            timeout=30,
            limits=limits,
            trust_env=False,
            headers={"Authorization": f"Bearer {secret}"},
        ) as client:
            until = time.monotonic() + args.seconds
            workers = [
                asyncio.create_task(submitter(client, load, until, args.poll_interval_s)) for _ in range(args.clients)
            ]
            workers.append(asyncio.create_task(extra_poller(client, load, until, args.extra_polls_rps)))
            samples.append(await sample("load start", started, pid, admin, db, load))
            next_sample = time.monotonic() + args.sample_s
            while time.monotonic() < until - 1:
                await asyncio.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
                if time.monotonic() >= next_sample and time.monotonic() < until - 1:
                    minute = round((time.monotonic() - started) / 60, 1)
                    samples.append(await sample(f"load {minute:g} min", started, pid, admin, db, load))
                    print(_row(samples[-1]), flush=True)
                    next_sample += args.sample_s
            samples.append(await sample("load end", started, pid, admin, db, load))
            await asyncio.gather(*workers)
        load_s = time.monotonic() - started
        await asyncio.sleep(3)
        samples.append(await sample("idle, 3 s after", started, pid, admin, db, load))
    return samples, load, load_s


HEADER = (
    "| sample | t (s) | RSS (MiB) | open fds | threads | /metrics scrape (ms, median of 3) | /metrics size (KiB) "
    "| ledger (MiB) | requests | non-200 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(s: Sample) -> str:
    """One Markdown table row."""
    return (
        f"| {s.label} | {s.elapsed_s:.0f} | {s.rss_mib:.1f} | {s.fds} | {s.threads} | {s.scrape_ms:.2f} "
        f"| {s.scrape_kib:.1f} | {s.db_mib:.1f} | {s.requests} | {s.failures} |"
    )


def machine() -> str:
    """CPUs, memory, kernel and Python of this machine, in one line."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    total_kib = 0
    with contextlib.suppress(OSError, ValueError):
        total_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {total_kib / 2**20:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def report(args: argparse.Namespace, samples: list[Sample], load: Load, load_s: float, exit_code: int | None) -> str:
    """The Markdown report: command, date, machine, load, the samples, and first-to-last deltas."""
    under_load = [s for s in samples if s.label.startswith("load")]
    first, last = under_load[0], under_load[-1]
    lat = sorted(load.latencies_ms)

    def pct(p: float) -> float:
        """The ``p`` quantile of the latencies (ms)."""
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0

    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(load.statuses.items()))
    command = "python bench/soak.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Soak run",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- load: {args.clients} clients (submit, poll every {args.poll_interval_s:g} s until done) + "
        f"{args.extra_polls_rps:g} polls/s of earlier tasks, for {load_s:.0f} s; sandbox tasks take "
        f"{args.queued_s + args.run_s:g} s",
        f"- requests: {load.requests} ({load.requests / load_s:.1f}/s); by status: {statuses}",
        f"- tasks: {load.submitted} submitted, {load.finished} seen finished by their client",
        f"- client-side latency: p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {lat[-1] if lat else 0:.1f} ms",
        "- gateway: `python -m gateway serve`, keys mode, SQLite ledger, settler on, access log on; defaults"
        + (f" except {', '.join(f'`{e}`' for e in args.gateway_env)}" if args.gateway_env else ""),
        f"- gateway exit after SIGTERM: {exit_code} (uvicorn re-raises the SIGTERM it drained on: -15)",
        "",
        HEADER,
        *(_row(s) for s in samples),
        "",
        f"Under load, first to last sample: RSS {first.rss_mib:.1f} → {last.rss_mib:.1f} MiB "
        f"({last.rss_mib - first.rss_mib:+.1f}), open fds {first.fds} → {last.fds}, "
        f"/metrics scrape {first.scrape_ms:.2f} → {last.scrape_ms:.2f} ms.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the soak; exit 1 if any request was not answered 200."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="load duration (default 60; 600 for the record)")
    parser.add_argument("--clients", type=int, default=8, help="submit-then-poll clients")
    parser.add_argument("--poll-interval-s", type=float, default=0.25)
    parser.add_argument("--extra-polls-rps", type=float, default=50, help="polls/s of random earlier tasks")
    parser.add_argument("--sample-s", type=float, default=60, help="seconds between samples under load")
    parser.add_argument("--queued-s", type=float, default=1.0, help="sandbox: seconds a task stays queued")
    parser.add_argument("--run-s", type=float, default=4.0, help="sandbox: seconds a task runs")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra gateway setting, e.g. KLING_GATEWAY_CACHE_MAX_ENTRIES=1000 (repeatable)",
    )
    parser.add_argument("--write", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, ledger)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kling-soak-"))
    sandbox_port, gateway_port = free_port(), free_port()
    sandbox_url, base = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{gateway_port}"
    sandbox_log, gateway_log = tmp / "sandbox.log", tmp / "gateway.log"
    python = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    exit_code: int | None = None
    try:
        timings = [f"--queued-s={args.queued_s}", f"--run-s={args.run_s}"]
        sandbox = start(
            [python, "-m", "gateway", "sandbox", "--port", str(sandbox_port), *timings],
            child_env({"UNIALL_API_KEY": UPSTREAM_KEY}),
            sandbox_log,
        )
        procs.append(sandbox)
        wait_ready(sandbox_url + "/sandbox/health", sandbox, "sandbox", sandbox_log)
        gateway = start(
            [python, "-m", "gateway", "serve"],
            child_env(
                {
                    "UNIALL_API_KEY": UPSTREAM_KEY,
                    "UNIALL_BASE_URL": sandbox_url,
                    "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                    "KLING_GATEWAY_METRICS_TOKEN": ADMIN_TOKEN,
                    "KLING_GATEWAY_SERVER_PORT": str(gateway_port),
                    "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp / "data"),
                    "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
                    **dict(setting.split("=", 1) for setting in args.gateway_env),
                }
            ),
            gateway_log,
        )
        procs.append(gateway)
        wait_ready(base + "/readyz", gateway, "gateway", gateway_log)
        print(f"soak: {args.seconds:g} s against {base} (logs in {tmp})", flush=True)
        print(HEADER, flush=True)
        samples, load, load_s = asyncio.run(drive(args, base, gateway.pid, tmp / "data" / "gateway.db"))
        exit_code = stop(gateway)
        text = report(args, samples, load, load_s, exit_code)
        print(text)
        if args.write is not None:
            args.write.write_text(text)
        return 0 if load.failures == 0 else 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
