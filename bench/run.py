"""The gateway benchmark: one command, side by side with nginx, every figure from the same run (loopback only).

    .venv/bin/python bench/run.py              # full run (~2.5 min); rewrites the generated part of BENCHMARKS.md
    .venv/bin/python bench/run.py --quick      # smoke run (short loads, no profiles); writes nothing
    .venv/bin/python bench/run.py --no-profile # skip the py-spy profiles
    .venv/bin/python bench/run.py --quick --accounts 3  # the gateway on 3 upstream accounts, each with a limit

It installs nothing; it needs ``wrk`` and ``nginx`` (``apt-get install -y wrk nginx-light``) and, for the profiles,
``py-spy`` (``.venv/bin/pip install py-spy``). What it starts, all on 127.0.0.1, each process in its own session and
all stopped on exit, Ctrl-C, SIGTERM or the hard time limit:

* ``upstream``: nginx answering like UniAll. ``POST /v1/video/generations`` -> a queued task whose id is
  ``task_$request_id`` (unique per submission, so every ledger insert is a real insert);
  ``GET /v1/videos/{id}`` -> an ``in_progress`` status. Both answer 401 without the gateway's upstream key.
* ``nginx-proxy``: nginx ``proxy_pass`` to it with upstream keep-alive and the ``Authorization`` header injected:
  the reference every ratio is computed against.
* ``gateway``: ``python -m gateway serve`` with production settings (access log on, metrics on, key auth, SQLite
  ledger, settler on), a fresh data directory, a key created through ``POST /gateway/keys`` (with an rpm limit and
  a monthly budget so the limiter and the budget check run too). Started twice: first with
  ``KLING_GATEWAY_CACHE_PENDING_TTL_S=3600`` (every poll is a cache hit), then on the same data directory with
  ``0`` (every poll is forwarded).

Scenarios (``wrk -t1``, 50 connections for throughput and p99, then 1 connection for added latency):

1. ``poll-cached``     status polls over ``--tasks`` of the key's tasks, all answered from the cache;
2. ``poll-forwarded``  the same polls with the cache disabled: every one goes upstream (and to the ledger);
3. ``submit``          submissions: JSON parse, full validation, limiter, budget check, intent + task rows, metrics;
4. added latency       1-connection p50/p99 of the gateway minus those of calling the upstream directly.

Then the validation micro-benchmark (``bench/validation_bench.py``'s bodies), and py-spy profiles of the gateway
under the scenario 1, 2 and 3 loads (``bench/profiles/``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import http.client
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    INSTALL_HINT,
    Aborted,
    Procs,
    WrkResult,
    child_env,
    fmt_ratio,
    free_port,
    group_cpu_seconds,
    hard_limit,
    http_request,
    machine_info,
    missing_tools,
    nginx_argv,
    nginx_conf,
    parse_wrk,
    run_wrk,
    thread_cpu_seconds,
    wait_until,
    wrk_argv,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PROFILES_DIR = BENCH_DIR / "profiles"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
RESULTS_JSON = BENCH_DIR / "results" / "last-run.json"  # git-ignored
HARD_LIMIT_S = 290  # the bound is five minutes
UPSTREAM_KEY = "sk-bench-upstream-" + "0" * 16
UPSTREAM_AUTH = f"Bearer {UPSTREAM_KEY}"
STATIC_TASK = "task_reference0000"
PACKAGES = (
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "orjson",
    "structlog",
    "prometheus-client",
)
GENERATED_BEGIN = "<!-- bench/run.py: generated results begin (do not edit by hand) -->"
GENERATED_END = "<!-- bench/run.py: generated results end -->"

# ----------------------------------------------------------------------------------------------------
# nginx: the fake UniAll upstream and the reference proxy
# ----------------------------------------------------------------------------------------------------

UPSTREAM_SERVER = """\
    server {
        listen 127.0.0.1:@PORT@ backlog=4096;
        default_type application/json;
        location = /v1/video/generations {
            if ($http_authorization != "@AUTH@") {
                return 401 '{"error":{"message":"invalid upstream key","type":"authentication_error"}}';
            }
            return 200 '{"id":"task_$request_id","task_id":"task_$request_id","object":"video.generation.job",\
"model":"kling-v3-std-silent","status":"queued","progress":0,"created_at":1767225600}';
        }
        location ~ ^/v1/videos/(?<tid>[A-Za-z0-9_][A-Za-z0-9._:-]*)$ {
            if ($http_authorization != "@AUTH@") {
                return 401 '{"error":{"message":"invalid upstream key","type":"authentication_error"}}';
            }
            return 200 '{"id":"$tid","task_id":"$tid","object":"video.generation.job",\
"model":"kling-v3-std-silent","status":"in_progress","progress":42,"created_at":1767225600}';
        }
        location / {
            return 404 '{"error":{"message":"not found","type":"invalid_request_error"}}';
        }
    }
"""

PROXY_SERVER = """\
    upstream fake_uniall {
        server 127.0.0.1:@UP_PORT@;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:@PORT@ backlog=4096;
        location / {
            proxy_pass http://fake_uniall;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "@AUTH@";
        }
    }
"""


def submission_body() -> dict[str, Any]:
    """A typical text-to-video body (no media URL, so no DNS look-up ever leaves the machine)."""
    from validation_bench import SEEDS

    return dict(SEEDS["text-to-video"])


def lua_string(text: str) -> str:
    level = "=" * 3
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def submit_script(tmp: Path, name: str, authorization: str | None) -> Path:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {lua_string(json.dumps(submission_body(), separators=(',', ':')))}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if authorization:
        lines.append(f'wrk.headers["Authorization"] = {lua_string(authorization)}')
    path = tmp / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def poll_script(tmp: Path, name: str, authorization: str, task_ids: list[str]) -> Path:
    """GET /v1/videos/<id> cycling through ``task_ids``: with more ids than connections, no two requests in flight
    share a task, so the gateway's coalescing never turns a forwarded poll into a shared one."""
    ids = ",\n".join(f'  "{t}"' for t in task_ids)
    path = tmp / f"{name}.lua"
    path.write_text(
        f"local ids = {{\n{ids}\n}}\n"
        "local n = 0\n"
        f'wrk.headers["Authorization"] = {lua_string(authorization)}\n'
        "request = function()\n"
        "  n = n + 1\n"
        '  return wrk.format("GET", "/v1/videos/" .. ids[(n % #ids) + 1])\n'
        "end\n"
    )
    return path


# ----------------------------------------------------------------------------------------------------
# The gateway
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Gateway:
    name: str
    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0.0
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / 1024 if m else 0.0

    def log_lines(self) -> int:
        count = 0
        with self.log.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
        return count


def start_gateway(
    procs: Procs,
    tmp: Path,
    name: str,
    upstream: str,
    data_dir: Path,
    admin_token: str,
    pending_ttl_s: float,
    extra_env: dict[str, str] | None = None,
) -> Gateway:
    port = free_port()
    extra_env = extra_env or {}
    one_key = {} if "UNIALL_API_KEYS" in extra_env else {"UNIALL_API_KEY": UPSTREAM_KEY}
    env = child_env(
        {
            **one_key,
            "UNIALL_BASE_URL": upstream,
            "KLING_GATEWAY_SERVER_DATA_DIR": str(data_dir),
            "KLING_GATEWAY_ADMIN_TOKEN": admin_token,
            "KLING_GATEWAY_CACHE_PENDING_TTL_S": str(pending_ttl_s),
            "KLING_GATEWAY_LOGGING_ACCESS_LOG": "true",
            "KLING_GATEWAY_LOGGING_LEVEL": "info",
            **extra_env,
        },
        # The run's own settings only: nothing inherited may change what is measured.
        drop_prefixes=("KLING_GATEWAY_", "UNIALL_", "PROMETHEUS_MULTIPROC_DIR"),
    )
    argv = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = procs.start(name, argv, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_request("GET", f"{base}/readyz", timeout=1.0)[0] == 200,
        name,
        timeout=30,
        proc=proc,
        tail=lambda: procs.log_tail(name),
    )
    return Gateway(name, base, proc, procs.tmp / f"{name}.log")


def accounts_env(count: int) -> dict[str, str]:
    """``count`` upstream accounts (one key each, as the fake upstream knows one), each with a ``max_in_flight``
    above anything a run submits: every submission goes through the choice and the capacity admission."""
    if count <= 1:
        return {}
    names = [f"acct{i}" for i in range(count)]
    return {
        "UNIALL_API_KEYS": ",".join(f"{name}={UPSTREAM_KEY}" for name in names),
        "KLING_GATEWAY_UPSTREAM_ACCOUNTS": json.dumps({name: {"max_in_flight": 1_000_000} for name in names}),
    }


def create_key(gw: Gateway, admin_token: str, *, budget: bool = True) -> str:
    limits: dict[str, object] = {"name": "bench", "rpm": 1_000_000_000}
    if budget:
        limits["monthly_budget_usd"] = "1000000000"
    body = json.dumps(limits).encode()
    status, _h, answer = http_request(
        "POST",
        f"{gw.base}/gateway/keys",
        body=body,
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
    )
    if status != 201:
        raise RuntimeError(f"creating the bench key: HTTP {status} {answer[:300]!r}")
    return str(json.loads(answer)["key"])


def create_tasks(gw: Gateway, key: str, count: int) -> list[str]:
    """``count`` submissions through the gateway on one keep-alive connection; their task ids."""
    host, port = gw.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    body = json.dumps(submission_body()).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    ids = []
    try:
        for _ in range(count):
            conn.request("POST", "/v1/video/generations", body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"setup submission: HTTP {resp.status} {answer[:300]!r}")
            ids.append(str(json.loads(answer)["id"]))
    finally:
        conn.close()
    if len(set(ids)) != count:
        raise RuntimeError("the fake upstream gave two submissions the same task id")
    return ids


def expect_poll(gw: Gateway, key: str, task_id: str, x_cache: str) -> None:
    url = f"{gw.base}/v1/videos/{task_id}"
    status, headers, body = http_request("GET", url, headers={"Authorization": f"Bearer {key}"})
    got = headers.get("x-cache")
    if status != 200 or got != x_cache or b'"in_progress"' not in body:
        raise RuntimeError(f"{gw.name}: poll answered {status} X-Cache={got} {body[:200]!r}, wanted 200 {x_cache}")


def scrape(gw: Gateway) -> dict[str, float]:
    status, _h, body = http_request("GET", f"{gw.base}/metrics")
    if status != 200:
        raise RuntimeError(f"{gw.name}: /metrics answered {status}")
    series = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def delta(before: dict[str, float], after: dict[str, float], metric: str, **labels: str) -> float:
    total = 0.0
    for series, value in after.items():
        if not series.startswith(metric + "{") and series != metric:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += value - before.get(series, 0.0)
    return total


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    d50: int
    d1: int
    warmup: int
    profile_s: int
    tasks: int
    profile: bool
    accounts: int = 1

    def estimate_s(self) -> float:
        refs = 3 * (self.warmup + self.d50 + self.d1) + self.warmup + 3 * self.d1 + 4
        gateways = 3 * (self.warmup + self.d50 + self.d1 + 1) + 12
        profiles = 3 * (2 * self.profile_s + 6) if self.profile else 0
        return refs + gateways + profiles + 8


@dataclasses.dataclass
class Row:
    name: str
    what: str
    c50: WrkResult | None
    c1: WrkResult | None
    cpu_s: float = 0.0  # gateway (or nginx-proxy) CPU during the c50 run
    check: str = ""


def measure(
    name: str,
    what: str,
    url: str,
    plan: Plan,
    *,
    header: str | None = None,
    script: Path | None = None,
    pgid: int | None = None,
    gw: Gateway | None = None,
    c50: bool = True,
    c1: bool = True,
    warmup: bool = True,
    check: Callable[[dict[str, float], dict[str, float], WrkResult], str] | None = None,
) -> Row:
    if plan.warmup and warmup:
        run_wrk(url, 50, plan.warmup, header=header, script=script)
    row = Row(name, what, None, None)
    if c50:
        m0 = scrape(gw) if gw is not None else {}
        t0 = group_cpu_seconds(pgid) if pgid else 0.0
        row.c50 = run_wrk(url, 50, plan.d50, header=header, script=script)
        row.cpu_s = (group_cpu_seconds(pgid) - t0) if pgid else 0.0
        if gw is not None and check is not None:
            row.check = check(m0, scrape(gw), row.c50)
    if c1:
        row.c1 = run_wrk(url, 1, plan.d1, header=header, script=script)
    parts = [f"  {name:<22}"]
    if row.c50:
        r = row.c50
        parts.append(f"c50 {r.rps:>9,.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms")
        if pgid:
            parts.append(f"CPU {1e6 * row.cpu_s / max(r.requests, 1):5.0f} µs/req")
    if row.c1:
        parts.append(f"c1 p50 {row.c1.p50_ms:6.3f} ms  p99 {row.c1.p99_ms:6.3f} ms")
    errors = sum(r.errors for r in (row.c50, row.c1) if r)
    parts.append(f"errors {errors}")
    if row.check:
        parts.append(row.check)
    print("  |  ".join(parts), flush=True)
    return row


def cache_check(before: dict[str, float], after: dict[str, float], run: WrkResult) -> str:
    counts = {r: delta(before, after, "kling_gateway_status_cache_total", result=r) for r in ("hit", "miss")}
    counts["coalesced"] = delta(before, after, "kling_gateway_status_cache_total", result="coalesced")
    counts["stale"] = delta(before, after, "kling_gateway_status_cache_total", result="stale")
    total = sum(counts.values()) or 1
    shown = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in counts.items() if v)
    return f"cache: {shown}"


def submit_check(before: dict[str, float], after: dict[str, float], run: WrkResult) -> str:
    accepted = delta(before, after, "kling_gateway_generations_total")
    return f"tasks recorded: {accepted:,.0f} (wrk counted {run.requests:,} answers)"


# ----------------------------------------------------------------------------------------------------
# Validation micro-benchmark
# ----------------------------------------------------------------------------------------------------


def validation_micro(number: int) -> dict[str, float]:
    """µs per ``validate`` call for each example body of ``bench/validation_bench.py`` (best of 5)."""
    from validation_bench import SEEDS

    from gateway.validation.checks import validate

    out = {}
    for name, body in SEEDS.items():
        assert validate(body).valid, name
        best = min(timeit.repeat(lambda body=body: validate(body), number=number, repeat=5))
        out[name] = best / number * 1e6
    return out


# ----------------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------------


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    from shutil import which

    return which("py-spy")


@dataclasses.dataclass
class Profile:
    scenario: str
    svg: Path | None
    raw: Path | None
    summary: str
    samples: int
    error: str = ""


def _spy(procs: Procs, name: str, argv: list[str], seconds: int, errors: list[str]) -> None:
    proc = procs.start(name, argv)
    try:
        proc.wait(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        errors.append(f"{name} did not finish")
    if proc.returncode not in (0, None):
        errors.append(f"{name} exited {proc.returncode}: {procs.log_tail(name, 3)}")
    procs.stop(name)


def profile(procs: Procs, tool: str, gw: Gateway, scenario: str, url: str, script: Path, seconds: int) -> Profile:
    """Sample the gateway with py-spy under the scenario's c50 wrk load, one sampler after the other.

    1. ``--gil`` flame graph (``<scenario>.svg``): only the thread holding the GIL, i.e. where the one core the
       event loop can use goes;
    2. raw stacks of every thread (``<scenario>.collapsed.txt``), summarised in ``<scenario>-top.txt`` with the
       real CPU of each thread over the same seconds (from ``/proc``).

    Two samplers at once would stop the process for each other; in blocking mode py-spy also reports idle
    thread-pool workers as busy, so samples whose leaf is a pool worker waiting for work are dropped (counted).
    """
    PROFILES_DIR.mkdir(exist_ok=True)
    svg = PROFILES_DIR / f"{scenario}.svg"
    raw = PROFILES_DIR / f"{scenario}.collapsed.txt"
    for stale in (svg, raw, PROFILES_DIR / f"{scenario}-top.txt"):
        stale.unlink(missing_ok=True)
    base = [tool, "record", "--pid", str(gw.pid), "--duration", str(seconds), "--rate", "200"]
    wrk_name = f"wrk-profile-{scenario}"
    load = procs.start(wrk_name, wrk_argv(url, 50, 2 * seconds + 4, script=script))
    errors: list[str] = []
    time.sleep(1)
    _spy(procs, f"py-spy-svg-{scenario}", [*base, "--gil", "--format", "flamegraph", "-o", str(svg)], seconds, errors)
    cpu0, t0 = thread_cpu_seconds(gw.pid), time.monotonic()
    _spy(procs, f"py-spy-raw-{scenario}", [*base, "--threads", "--format", "raw", "-o", str(raw)], seconds, errors)
    cpu1, wall = thread_cpu_seconds(gw.pid), time.monotonic() - t0
    with contextlib.suppress(subprocess.TimeoutExpired):
        load.wait(timeout=2 * seconds + 20)
    load_result = parse_wrk(procs.log_tail(wrk_name, 40))
    procs.stop(wrk_name)
    if not raw.exists():
        return Profile(scenario, None, None, "", 0, "; ".join(errors) or "no output")
    cpu = {tid: cpu1[tid] - cpu0.get(tid, 0.0) for tid in cpu1}
    summary, samples = summarize(raw.read_text(), cpu, wall)
    summary = f"load while sampling: {load_result.rps:,.0f} req/s (wrk -c50; py-spy slows the process)\n" + summary
    (PROFILES_DIR / f"{scenario}-top.txt").write_text(summary)
    return Profile(scenario, svg if svg.exists() else None, raw, summary, samples, "; ".join(errors))


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")
#: Leaves of a thread waiting for work (py-spy's blocking mode cannot tell them from running ones).
IDLE_LEAVES = frozenset(
    {
        "concurrent/futures/thread.py:_worker",
        "threading.py:Condition.wait",
        "threading.py:Event.wait",
        "queue.py:Queue.get",
    }
)
#: Frames on every stack of the main thread (entry points), left out of the inclusive lists.
_ENTRY_FILES = (
    "<frozen runpy>",
    "gateway/__main__.py",
    "gateway/cli/main.py",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "asyncio/runners.py",
    "threading.py",
)


def _frame_key(frame: str, line: bool = False) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    key = f"{m.group('file')}:{m.group('func')}"
    return f"{key}:{m.group('line')}" if line and m.group("line") else key


def _category(key: str) -> str:
    file = key.split(":", 1)[0]
    for prefix, label in (
        ("gateway/", "gateway"),
        ("starlette/", "starlette"),
        ("uvicorn/", "uvicorn (HTTP parsing callbacks, response writes)"),
        ("structlog/", "structlog"),
        ("prometheus_client/", "prometheus_client"),
        ("aiohttp/", "aiohttp"),
        ("yarl/", "aiohttp"),
        ("multidict/", "aiohttp"),
        ("sqlite3/", "sqlite"),
        ("concurrent/futures/", "thread pool"),
        ("asyncio/runners.py", "event loop itself (uvloop C: epoll, socket reads/writes, callbacks)"),
        ("asyncio/", "asyncio"),
    ):
        if file.startswith(prefix):
            return label
    return "other: " + file


def summarize(collapsed: str, cpu: dict[int, float] | None = None, wall: float = 0.0, top: int = 18) -> tuple[str, int]:
    """Self and inclusive sample shares per ``file:function`` from py-spy's raw (collapsed) stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    line_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    names: dict[int, str] = {}
    total = idle = 0
    for text in collapsed.splitlines():
        stack, _, count_s = text.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = "?"
        if frames and (m := _THREAD.match(frames[0])):
            frames.pop(0)
            thread = m.group("name") or m.group("tid")
            names[int(m.group("tid"))] = thread
        if not frames:
            continue
        keys = [_frame_key(f) for f in frames]
        if keys[-1] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        threads[thread] += count
        self_counts[keys[-1]] += count
        line_counts[_frame_key(frames[-1], line=True)] += count
        cats[_category(keys[-1])] += count
        for key in set(keys):
            incl[key] += count
    if not total:
        return "no samples\n", 0

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    def entry(key: str) -> bool:
        return key.split(":", 1)[0].startswith(_ENTRY_FILES)

    out = [f"{total} samples at 200 Hz ({idle} samples of idle pool threads dropped; idle time is not sampled)"]
    if cpu and wall:
        busy = sorted(cpu.items(), key=lambda kv: -kv[1])
        shown = [f"{names.get(tid, tid)} {100 * s / wall:.0f}%" for tid, s in busy if s > 0]
        out.append("real CPU by thread over the same seconds (/proc; 100% = one core): " + (", ".join(shown) or "-"))
    out += ["", "samples by thread:"] + [f"  {pct(n)}  {k}" for k, n in threads.most_common(8)]
    out += ["", "self time by area (leaf frame):"] + [f"  {pct(n)}  {k}" for k, n in cats.most_common(12)]
    out += ["", f"top {top} functions by self time:"] + [f"  {pct(n)}  {k}" for k, n in self_counts.most_common(top)]
    out += ["", "hottest lines (self time):"] + [f"  {pct(n)}  {k}" for k, n in line_counts.most_common(10)]
    gw = [(k, n) for k, n in incl.most_common() if k.startswith("gateway/") and not entry(k)]
    out += ["", f"gateway functions by inclusive time (top {top}):"] + [f"  {pct(n)}  {k}" for k, n in gw[:top]]
    libs = [(k, n) for k, n in incl.most_common() if not k.startswith("gateway/") and not entry(k)]
    out += ["", f"library functions by inclusive time (top {top}):"] + [f"  {pct(n)}  {k}" for k, n in libs[:top]]
    return "\n".join(out) + "\n", total


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    rows: dict[str, Row]
    validation_us: dict[str, float]
    profiles: list[Profile]
    info: dict[str, str]
    plan: Plan
    elapsed_s: float
    command: str
    notes: list[str]


def _ms(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def direct_c1(rows: dict[str, Row], method: str) -> tuple[float, float]:
    """The upstream's own 1-connection p50 and p99 for ``method``: the lower of the two measurements (start and end
    of the run), so noise on a shared machine can only make the gateway's added latency look larger, never smaller."""
    runs = [r.c1 for name, r in rows.items() if name.startswith(f"upstream {method}") and r.c1]
    if not runs:
        return float("nan"), float("nan")
    return min(r.p50_ms for r in runs), min(r.p99_ms for r in runs)


def scenario_table(res: Results) -> str:
    rows = res.rows
    ref = rows["nginx-proxy GET"].c50
    direct = {method: direct_c1(rows, method) for method in ("GET", "POST")}
    head = (
        "| scenario | what | req/s (c50) | vs nginx proxy | p50 ms | p99 ms | c1 p50 ms | c1 p99 ms "
        "| added c1 p50 / p99 ms (vs upstream direct) | CPU µs/req | errors | check |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows.values():
        c50, c1 = row.c50, row.c1
        method = "POST" if "POST" in row.name or row.name.startswith("3.") else "GET"
        added = "-"
        if c1 and not row.name.startswith("upstream"):
            base50, base99 = direct[method]
            added = f"{c1.p50_ms - base50:+.3f} / {c1.p99_ms - base99:+.3f}"
        cpu = f"{1e6 * row.cpu_s / c50.requests:.0f}" if c50 and row.cpu_s and c50.requests else "-"
        errors = sum(r.errors for r in (c50, c1) if r)
        lines.append(
            "| "
            + " | ".join(
                [
                    row.name,
                    row.what,
                    f"{c50.rps:,.0f}" if c50 else "-",
                    fmt_ratio(c50.rps / ref.rps) if c50 and ref else "-",
                    _ms(c50.p50_ms) if c50 else "-",
                    _ms(c50.p99_ms) if c50 else "-",
                    _ms(c1.p50_ms) if c1 else "-",
                    _ms(c1.p99_ms) if c1 else "-",
                    added,
                    cpu,
                    str(errors),
                    row.check or "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def targets(res: Results) -> list[tuple[str, str, str, bool]]:
    rows = res.rows
    ref = rows["nginx-proxy GET"].c50
    assert ref is not None
    out: list[tuple[str, str, str, bool]] = []

    def c50(name: str) -> WrkResult:
        r = rows[name].c50
        assert r is not None
        return r

    def c1(name: str) -> WrkResult:
        r = rows[name].c1
        assert r is not None
        return r

    hit, fwd, sub = c50("1. poll-cached"), c50("2. poll-forwarded"), c50("3. submit")
    out.append(
        (
            "1. cache-hit polls: req/s vs nginx proxy",
            f"{hit.rps / ref.rps:.2f}",
            "≥ 0.35 (aim 0.5)",
            hit.rps >= 0.35 * ref.rps,
        )
    )
    out.append(("1. cache-hit polls: p99 at c50", f"{hit.p99_ms:.2f} ms", "≤ 10 ms", hit.p99_ms <= 10))
    out.append(
        ("2. forwarded polls: req/s vs nginx proxy", f"{fwd.rps / ref.rps:.2f}", "≥ 0.15", fwd.rps >= 0.15 * ref.rps)
    )
    out.append(("2. forwarded polls: p99 at c50", f"{fwd.p99_ms:.2f} ms", "≤ 20 ms", fwd.p99_ms <= 20))
    out.append(
        (
            "3. submissions: req/s vs nginx proxy",
            f"{sub.rps / ref.rps:.3f} ({sub.rps:,.0f}/s)",
            "≥ 0.04",
            sub.rps >= 0.04 * ref.rps,
        )
    )
    fwd1 = c1("2. poll-forwarded")
    base50, base99 = direct_c1(rows, "GET")
    added50, added99 = fwd1.p50_ms - base50, fwd1.p99_ms - base99
    out.append(("4. added latency at c1 (forwarded poll), p50", f"{added50:.3f} ms", "≤ 0.4 ms", added50 <= 0.4))
    out.append(("4. added latency at c1 (forwarded poll), p99", f"{added99:.3f} ms", "≤ 1.5 ms", added99 <= 1.5))
    typical = max(res.validation_us.values()) if res.validation_us else float("nan")
    out.append(("validation of a typical body (slowest example)", f"{typical:.1f} µs", "≤ 30 µs", typical <= 30))
    return out


def cpu_budget(res: Results) -> str:
    """What the ratio targets mean in gateway CPU per request (one process, so at most one core's worth)."""
    ref = res.rows["nginx-proxy GET"].c50
    if ref is None:
        return ""
    parts = []
    for name, ratio in (("1. poll-cached", 0.35), ("2. poll-forwarded", 0.15), ("3. submit", 0.04)):
        row = res.rows[name]
        if row.c50 and row.c50.requests and row.cpu_s:
            need = ratio * ref.rps
            parts.append(
                f"{name.split(' ', 1)[1]}: {1e6 * row.cpu_s / row.c50.requests:.0f} µs now, "
                f"≤ {1e6 / need:.0f} µs at {need:,.0f} req/s"
            )
    return "Gateway CPU per request vs the most one core allows at the target rate: " + "; ".join(parts) + "."


def generated_section(res: Results) -> str:
    info, plan = res.info, res.plan
    tgt = targets(res)
    met = sum(1 for t in tgt if t[3])
    target_lines = "\n".join(f"| {n} | {v} | {g} | {'met' if ok else '**not met**'} |" for n, v, g, ok in tgt)
    val = "\n".join(f"| {name} | {us:.1f} |" for name, us in res.validation_us.items())
    prof_lines = []
    for p in res.profiles:
        files = ", ".join(
            f"`{path.relative_to(REPO)}`"
            for path in (p.svg, p.raw, PROFILES_DIR / f"{p.scenario}-top.txt")
            if path is not None and path.exists()
        )
        prof_lines.append(f"#### {p.scenario} ({p.samples} samples{'; ' + p.error if p.error else ''})\n\n{files}\n")
        if p.summary:
            prof_lines.append("<details><summary>summary</summary>\n\n```text\n" + p.summary + "```\n\n</details>\n")
    profiles = "\n".join(prof_lines) if prof_lines else "(profiles not taken in this run)\n"
    notes = "".join(f"\n- {n}" for n in res.notes)
    return f"""{GENERATED_BEGIN}

## Results of the last run

- command: `{res.command}` (run took {res.elapsed_s:.0f} s)
- code: {info["code"]}
- date: {info["date"]}
- machine: nproc={info["nproc"]}, {info["cpu"]}, Linux {info["kernel"]}
- python {info["python"]}; {info["packages"]}
- {info["nginx"]}; {info["wrk"]}
- load: `wrk -t1 -c50 -d{plan.d50}s --latency` (after a {plan.warmup} s warm-up for the gateway), then
  `wrk -t1 -c1 -d{plan.d1}s --latency`; polls cycle over {plan.tasks} tasks of the bench key; nothing pinned
  (wrk, nginx and the gateway share the cores).{notes}

### Targets ({met} of {len(tgt)} met)

| target | measured | goal | |
|---|---|---|---|
{target_lines}

{cpu_budget(res)}

### Every scenario

{scenario_table(res)}

*vs nginx proxy*: c50 req/s over `nginx-proxy GET`'s in this run (the issue's reference). *added c1*: the row's
1-connection p50 / p99 minus calling the fake upstream directly with the same method. *CPU µs/req*: user+system
CPU of the gateway process (or nginx proxy) during the c50 run divided by the requests served. *check*: counted
from the gateway's own `/metrics` during the c50 run.

### Validation micro-benchmark (µs per `validate` call, best of 5)

| body (`bench/validation_bench.py`) | µs/call |
|---|---|
{val}

### Profiles (py-spy, gateway process under the c50 load of each scenario)

{profiles}
{GENERATED_END}"""


INTRO = """# Benchmarks

The gateway is measured side by side with nginx in one run of one command, on loopback only:

```sh
apt-get install -y wrk nginx-light     # once (Debian packages); the bench installs nothing itself
.venv/bin/pip install py-spy           # once, for the profiles (optional: --no-profile)
make bench                             # = .venv/bin/python bench/run.py  (about 2.5 minutes, hard limit 290 s)
```

`bench/run.py --quick` is a 40-second smoke run that writes nothing. What runs (see `bench/run.py`'s docstring):
an nginx that answers like UniAll (the fake upstream: a unique `task_<request id>` per submission and an
`in_progress` status per poll), an nginx `proxy_pass` to it with keep-alive and the upstream key injected (the
reference), and the gateway itself (`python -m gateway serve`, production settings: key auth, access log, metrics,
SQLite ledger, settler; a bench key with an rpm limit and a monthly budget so those checks run too), started
first with a pending-status cache TTL of 3600 s (scenario 1: every poll a hit) and then with 0 (scenario 2:
every poll forwarded), on the same ledger.

The upstream transport was chosen with `bench/transport_bench.py` (see `bench/results-transport.md`);
`bench/ledger_scale.py` measures the ledger at a million tasks; neither is part of this command.

"""

NOTES_PLACEHOLDER = """
## Notes

(Hand-written analysis goes here; `bench/run.py` only rewrites the generated block above.)
"""


def write_benchmarks(res: Results) -> None:
    section = generated_section(res)
    if BENCHMARKS_MD.exists():
        text = BENCHMARKS_MD.read_text()
        if GENERATED_BEGIN in text and GENERATED_END in text:
            head, rest = text.split(GENERATED_BEGIN, 1)
            _, tail = rest.split(GENERATED_END, 1)
            BENCHMARKS_MD.write_text(head + section + tail)
            return
    BENCHMARKS_MD.write_text(INTRO + section + "\n" + NOTES_PLACEHOLDER)


def write_json(res: Results) -> None:
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    data = {
        "info": res.info,
        "elapsed_s": res.elapsed_s,
        "rows": {
            name: {
                "c50": dataclasses.asdict(r.c50) | {"raw": None} if r.c50 else None,
                "c1": dataclasses.asdict(r.c1) | {"raw": None} if r.c1 else None,
                "cpu_s": r.cpu_s,
                "check": r.check,
            }
            for name, r in res.rows.items()
        },
        "validation_us": res.validation_us,
        "targets": [{"target": n, "measured": v, "goal": g, "met": ok} for n, v, g, ok in targets(res)],
    }
    RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def run(plan: Plan, tmp: Path, procs: Procs, notes: list[str]) -> tuple[dict[str, Row], list[Profile]]:
    rows: dict[str, Row] = {}
    profiles: list[Profile] = []
    spy = py_spy() if plan.profile else None
    if plan.profile and spy is None:
        notes.append("py-spy not found (`.venv/bin/pip install py-spy`): no profiles in this run")

    # -- the fake upstream and the reference proxy -------------------------------------------------------
    up_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    conf = nginx_conf(tmp, "upstream", UPSTREAM_SERVER, PORT=up_port, AUTH=UPSTREAM_AUTH)
    procs.start("upstream", nginx_argv(tmp, "upstream", conf))
    conf = nginx_conf(tmp, "proxy", PROXY_SERVER, PORT=proxy_port, UP_PORT=up_port, AUTH=UPSTREAM_AUTH)
    proxy_proc = procs.start("nginx-proxy", nginx_argv(tmp, "proxy", conf))
    auth = {"Authorization": UPSTREAM_AUTH}
    wait_until(
        lambda: http_request("GET", f"{upstream}/v1/videos/{STATIC_TASK}", headers=auth, timeout=1)[0] == 200,
        "upstream nginx",
        10,
        procs.live["upstream"],
    )
    # Through the proxy without a key: 200 only if the proxy injected it (the upstream answers 401 otherwise).
    wait_until(
        lambda: http_request("GET", f"{proxy}/v1/videos/{STATIC_TASK}", timeout=1)[0] == 200,
        "nginx proxy",
        10,
        proxy_proc,
    )
    if http_request("GET", f"{upstream}/v1/videos/{STATIC_TASK}")[0] != 401:
        raise RuntimeError("the fake upstream must refuse a request without the upstream key")

    print("references:", flush=True)
    header = f"Authorization: {UPSTREAM_AUTH}"
    status_path = f"/v1/videos/{STATIC_TASK}"
    rows["upstream GET"] = measure(
        "upstream GET", "nginx fake upstream, status JSON, called directly", upstream + status_path, plan, header=header
    )
    direct_post = submit_script(tmp, "submit-direct", UPSTREAM_AUTH)
    rows["upstream POST"] = measure(
        "upstream POST",
        "fake upstream, submission, called directly",
        upstream + "/v1/video/generations",
        plan,
        script=direct_post,
        c50=False,
    )
    rows["nginx-proxy GET"] = measure(
        "nginx-proxy GET",
        "nginx proxy_pass, keep-alive, key injected (the reference)",
        proxy + status_path,
        plan,
        pgid=proxy_proc.pid,
    )
    rows["nginx-proxy POST"] = measure(
        "nginx-proxy POST",
        "the same proxy, submissions",
        proxy + "/v1/video/generations",
        plan,
        script=submit_script(tmp, "submit-proxy", None),
        pgid=proxy_proc.pid,
    )
    procs.stop("nginx-proxy")

    # -- gateway, cache on: scenarios 1 and 3 ------------------------------------------------------------
    data_dir = tmp / "gateway-data"
    admin = secrets.token_hex(24)
    accounts = accounts_env(plan.accounts)
    gw = start_gateway(procs, tmp, "gateway-cached", upstream, data_dir, admin, 3600, accounts)
    key = create_key(gw, admin)
    started = time.monotonic()
    task_ids = create_tasks(gw, key, plan.tasks)
    print(f"gateway (cache on): {plan.tasks} setup submissions in {time.monotonic() - started:.1f} s", flush=True)
    expect_poll(gw, key, task_ids[0], "MISS")
    expect_poll(gw, key, task_ids[0], "HIT")
    polls = poll_script(tmp, "poll", f"Bearer {key}", task_ids)
    submits = submit_script(tmp, "submit-gateway", f"Bearer {key}")
    poll_url = f"{gw.base}/v1/videos/{task_ids[0]}"
    submit_url = f"{gw.base}/v1/video/generations"
    rows["1. poll-cached"] = measure(
        "1. poll-cached",
        "status poll served from cache (auth, ownership, metrics, access log)",
        poll_url,
        plan,
        script=polls,
        pgid=gw.pid,
        gw=gw,
        check=cache_check,
    )
    rows["3. submit"] = measure(
        "3. submit",
        "submission: validation, limiter, budget, intent + task rows, metrics",
        submit_url,
        plan,
        script=submits,
        pgid=gw.pid,
        gw=gw,
        check=submit_check,
    )
    if spy:
        for scenario, url, script in (("poll-cached", poll_url, polls), ("submit", submit_url, submits)):
            print(f"profiling {scenario} ...", flush=True)
            profiles.append(profile(procs, spy, gw, scenario, url, script, plan.profile_s))
    notes.append(
        f"gateway (cache on) after its scenarios: RSS {gw.rss_mb():.0f} MB, {gw.log_lines():,} log lines written"
    )
    procs.stop("gateway-cached", timeout=20)

    # -- gateway, cache off: scenario 2 (and 4) ----------------------------------------------------------
    gw = start_gateway(procs, tmp, "gateway-forwarding", upstream, data_dir, admin, 0, accounts)
    expect_poll(gw, key, task_ids[0], "MISS")
    expect_poll(gw, key, task_ids[0], "MISS")
    poll_url = f"{gw.base}/v1/videos/{task_ids[0]}"
    rows["2. poll-forwarded"] = measure(
        "2. poll-forwarded",
        "status poll forwarded upstream (cache TTL 0); c1 = scenario 4",
        poll_url,
        plan,
        script=polls,
        pgid=gw.pid,
        gw=gw,
        check=cache_check,
    )
    if spy:
        print("profiling poll-forwarded ...", flush=True)
        profiles.append(profile(procs, spy, gw, "poll-forwarded", poll_url, polls, plan.profile_s))
    notes.append(
        f"gateway (cache off) after its scenario: RSS {gw.rss_mb():.0f} MB, {gw.log_lines():,} log lines written"
    )
    procs.stop("gateway-forwarding", timeout=20)

    # -- the upstream's own single-connection latency once more (the added-latency baseline is the lower one) --
    rows["upstream GET, again"] = measure(
        "upstream GET, again",
        "the direct call at the end of the run (c1 only)",
        upstream + status_path,
        plan,
        header=header,
        c50=False,
        warmup=False,
    )
    rows["upstream POST, again"] = measure(
        "upstream POST, again",
        "the direct call at the end of the run (c1 only)",
        upstream + "/v1/video/generations",
        plan,
        script=direct_post,
        c50=False,
        warmup=False,
    )
    ordered = ["upstream GET", "upstream GET, again", "upstream POST", "upstream POST, again"]
    ordered += ["nginx-proxy GET", "nginx-proxy POST"]
    ordered += ["1. poll-cached", "2. poll-forwarded", "3. submit"]
    return {name: rows[name] for name in ordered}, profiles


def code_version() -> str:
    """The commit measured, and whether ``gateway/`` had uncommitted changes (the numbers are for those too)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "? (not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes in gateway/" if dirty else "")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=8, help="seconds of each c50 run (default 8)")
    p.add_argument("--duration-c1", type=int, default=4, help="seconds of each c1 run (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of c50 warm-up per gateway scenario (default 2)")
    p.add_argument("--profile-seconds", type=int, default=6, help="py-spy sampling per scenario (default 6)")
    p.add_argument("--tasks", type=int, default=400, help="tasks the polls cycle over (default 400, at least 100)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument("--quick", action="store_true", help="3 s / 2 s / 1 s loads, no profiles; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and profiles alone")
    p.add_argument("--accounts", type=int, default=1, help="upstream accounts, each with a limit (default 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.duration_c1, args.warmup, args.no_profile, args.no_write = 3, 2, 1, True, True
    if args.tasks < 100:
        p.error("--tasks must be at least 100 (twice the connections, so polls in flight never share a task)")
    plan = Plan(
        args.duration,
        args.duration_c1,
        args.warmup,
        args.profile_seconds,
        args.tasks,
        not args.no_profile,
        args.accounts,
    )
    if args.no_write and plan.profile:
        plan.profile = False

    missing = missing_tools(["wrk", "nginx"])
    if missing:
        print(f"error: {', '.join(missing)} not found; install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        import gateway  # noqa: F401
    except ImportError:
        print("error: the gateway is not importable; run with .venv/bin/python (make bench)", file=sys.stderr)
        return 2
    est = plan.estimate_s()
    if est > HARD_LIMIT_S - 15:
        print(f"error: this plan needs ~{est:.0f} s, over the {HARD_LIMIT_S} s limit", file=sys.stderr)
        return 2
    print(f"gateway bench: ~{est:.0f} s (hard limit {HARD_LIMIT_S} s), {len(os.sched_getaffinity(0))} cores")
    command = " ".join([".venv/bin/python", "bench/run.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    info = machine_info(PACKAGES)
    info["code"] = code_version()
    started = time.monotonic()
    notes: list[str] = []
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp_s:
        tmp = Path(tmp_s)
        tmp.chmod(0o755)  # nginx workers drop to an unprivileged user when started as root
        procs = Procs(tmp)
        try:
            with hard_limit(HARD_LIMIT_S):
                rows, profiles = run(plan, tmp, procs, notes)
                procs.stop_all()
                print("validation micro-benchmark ...", flush=True)
                validation = validation_micro(2_000 if args.quick else 10_000)
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

    notes.append(
        f"load average (1 min) before / after the run: {load_before} / {loadavg()} on {info['nproc']} cores "
        "(other work on the machine shows up as noise in every row)"
    )
    res = Results(rows, validation, profiles, info, plan, time.monotonic() - started, command, notes)
    print()
    print(scenario_table(res))
    print()
    for name, value, goal, ok in targets(res):
        print(f"  {'met    ' if ok else 'NOT MET'}  {name}: {value} (goal {goal})")
    for name, us in validation.items():
        print(f"  validate {name}: {us:.1f} µs/call")
    for note in notes:
        print(f"  note: {note}")
    print(f"\n(run took {res.elapsed_s:.0f} s)")
    if not args.no_write:
        write_benchmarks(res)
        write_json(res)
        print(f"wrote {BENCHMARKS_MD.relative_to(REPO)} and {RESULTS_JSON.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
