"""Upstream HTTP client transport benchmark for the gateway (loopback only).

One run measures, side by side and in the same conditions:

* ``upstream-direct``  -- wrk straight at the fake upstream (an nginx answering a fixed ~200-byte JSON status
  body for ``GET /v1/videos/<id>``); the floor for latency.
* ``nginx-proxy``      -- nginx ``proxy_pass`` to the upstream with upstream keepalive and an injected
  ``Authorization`` header; the practical ceiling every ratio is computed against.
* ``starlette-static`` -- the same Starlette/uvicorn stack answering the body itself, no upstream call; the
  ceiling for any Python transport on this stack.
* the candidates, each a minimal Starlette app (uvicorn, 1 worker, uvloop, httptools, no access log) that
  forwards ``GET /v1/videos/{id}`` upstream with ``Authorization: Bearer sk-x`` and returns status, body and
  content type:

  - ``httpx-default``  httpx.AsyncClient with its default pool limits (100 connections, 20 kept alive)
  - ``httpx-tuned``    httpx.AsyncClient with Limits(max_connections=200, max_keepalive_connections=200)
  - ``aiohttp``        aiohttp.ClientSession +
                       TCPConnector(limit=200, ttl_dns_cache=300, keepalive_timeout=30)
  - ``aiohttp-raw``    as ``aiohttp`` plus auto_decompress=False and skip_auto_headers (User-Agent,
                       Accept-Encoding), body read as raw bytes; also the two settings a shared gateway
                       session needs for correctness: DummyCookieJar (no upstream cookie shared across
                       callers) and allow_redirects=False (pass 3xx through, never follow them)

Each target is started as its own subprocess (own session, so it can be killed as a group), checked for a
correct answer (the upstream rejects a request without the injected header with 401), warmed up, then
loaded with ``wrk -t1 -c50 --latency`` and ``wrk -t1 -c1 --latency``. CPU time of the target's processes,
of the upstream and of wrk is sampled around the c50 run, so a reader can tell when the 2 shared cores, not
the transport, are the limit.

``--clients`` runs a different, shorter comparison that needs neither wrk nor nginx: the gateway's own
transports (``gateway.upstream.client.AiohttpTransport`` and ``gateway.upstream.lean.LeanTransport``, production
settings and headers) driven in-process on uvloop against a minimal keep-alive upstream in a subprocess
(uvloop, a canned answer per request head). Per round each transport runs a fixed time at concurrency 1 and
50, in alternating order (A B then B A) so drift on the shared cores hits both; the report gives medians over
rounds of req/s and of the client process's CPU µs per request (``time.process_time``: the upstream's CPU is
not counted), and lean/aiohttp ratios. Its results go to their own section of the results file, which full
runs keep.

Usage::

    .venv/bin/python bench/transport_bench.py                # full run, writes bench/results-transport.md
    .venv/bin/python bench/transport_bench.py --quick        # smoke run (short durations, no results file)
    .venv/bin/python bench/transport_bench.py --pin          # wrk+upstream on CPU 0, target on CPU 1
    .venv/bin/python bench/transport_bench.py --clients      # gateway transports only, ~40 s, no wrk/nginx

Internal: ``transport_bench.py --serve CANDIDATE --port P --upstream URL`` runs one candidate app;
``--serve-upstream --port P`` runs the minimal upstream of ``--clients``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from common import (
    Aborted,
    Procs,
    WrkResult,
    fmt_ratio,
    free_port,
    group_cpu_seconds,
    hard_limit,
    http_get,
    run_wrk,
)

AUTH_VALUE = "Bearer sk-x"
VIDEO_ID = "vid_0123456789abcdef"
HEADERS_PROBE_ID = "_headers"  # the upstream echoes the request headers it saw for this id
CANDIDATES = ("httpx-default", "httpx-tuned", "aiohttp", "aiohttp-raw")
PY_TARGETS = ("starlette-static", *CANDIDATES)
ALL_TARGETS = ("upstream-direct", "nginx-proxy", *PY_TARGETS)
HARD_LIMIT_S = 175  # the whole run must stay under 3 minutes
BENCH_DIR = Path(__file__).resolve().parent
PACKAGES = (
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
    "httpcore",
    "anyio",
    "sniffio",
    "aiohttp",
    "orjson",
)


def expected_body(video_id: str) -> bytes:
    """The fixed JSON status body the fake upstream answers (kept in step with ``UPSTREAM_CONF``)."""
    return (
        f'{{"id":"{video_id}","object":"video","model":"kling-v3","status":"succeeded","progress":100,'
        '"created_at":1732400000,"completed_at":1732400093,"duration":5,'
        f'"video_url":"https://cdn.example.invalid/v/{video_id}.mp4"}}'
    ).encode()


# ----------------------------------------------------------------------------------------------------
# Candidate apps (run in the child process with --serve)
# ----------------------------------------------------------------------------------------------------


def build_app(candidate: str, upstream: str) -> Any:
    """Return the minimal Starlette app for one candidate transport."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    auth = {"Authorization": AUTH_VALUE}
    lifespan: Callable[[Any], Any] | None = None

    if candidate == "starlette-static":
        static = expected_body(VIDEO_ID)

        async def video(request: Request) -> Response:
            return Response(static, media_type="application/json")

    elif candidate in ("httpx-default", "httpx-tuned"):
        import httpx

        kwargs: dict[str, Any] = {}
        if candidate == "httpx-tuned":
            kwargs["limits"] = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=30)

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> Any:
            async with httpx.AsyncClient(**kwargs) as client:
                app.state.client = client
                yield

        async def video(request: Request) -> Response:
            video_id = request.path_params["video_id"]
            r = await request.app.state.client.get(f"{upstream}/v1/videos/{video_id}", headers=auth)
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    elif candidate in ("aiohttp", "aiohttp-raw"):
        import aiohttp

        raw = candidate == "aiohttp-raw"

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> Any:
            # The session must be created inside the running loop.
            connector = aiohttp.TCPConnector(limit=200, ttl_dns_cache=300, keepalive_timeout=30)
            # connect covers waiting for a pool slot *and* establishing the connection; sock_connect only the
            # TCP connect; sock_read is the idle gap allowed between reads (starts once the request is sent).
            timeout = aiohttp.ClientTimeout(total=30, connect=5, sock_connect=3, sock_read=30)
            extra: dict[str, Any] = {}
            if raw:
                # auto_decompress=False alone still sends "Accept-Encoding: gzip, deflate[, br, zstd]";
                # skip it so the upstream never compresses a body we pass through without Content-Encoding.
                # The default CookieJar would replay one caller's upstream cookies for every other caller.
                extra = {
                    "auto_decompress": False,
                    "skip_auto_headers": ("User-Agent", "Accept-Encoding"),
                    "cookie_jar": aiohttp.DummyCookieJar(),
                }
            async with aiohttp.ClientSession(connector=connector, timeout=timeout, **extra) as session:
                app.state.session = session
                yield

        async def video(request: Request) -> Response:
            video_id = request.path_params["video_id"]
            session = request.app.state.session
            # GET follows redirects by default in aiohttp; a proxy must hand 3xx back instead.
            follow = not raw
            url = f"{upstream}/v1/videos/{video_id}"
            async with session.get(url, headers=auth, allow_redirects=follow) as resp:
                body = await resp.read()
                # resp.content_type drops parameters (charset) and defaults to application/octet-stream;
                # forward the raw header instead.
                ctype = resp.headers.get("Content-Type")
                return Response(body, status_code=resp.status, media_type=ctype)

    else:
        raise SystemExit(f"unknown candidate {candidate!r}")

    return Starlette(routes=[Route("/v1/videos/{video_id}", video)], lifespan=lifespan)


def serve(candidate: str, port: int, upstream: str) -> None:
    import uvicorn

    app = build_app(candidate, upstream)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        workers=1,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


# ----------------------------------------------------------------------------------------------------
# nginx configurations
# ----------------------------------------------------------------------------------------------------

UPSTREAM_SERVER = """\
    server {
        listen 127.0.0.1:@PORT@ backlog=4096;
        default_type application/json;
        location = /v1/videos/_headers {
            return 200 '{"host":"$http_host","user_agent":"$http_user_agent","accept":"$http_accept",\
"accept_encoding":"$http_accept_encoding","connection":"$http_connection","authorization":"$http_authorization"}';
        }
        location ~ ^/v1/videos/(?<vid>[A-Za-z0-9_-]+)$ {
            if ($http_authorization != "@AUTH@") {
                return 401 '{"error":"missing injected Authorization header"}';
            }
            return 200 '{"id":"$vid","object":"video","model":"kling-v3","status":"succeeded","progress":100,\
"created_at":1732400000,"completed_at":1732400093,"duration":5,\
"video_url":"https://cdn.example.invalid/v/$vid.mp4"}';
        }
    }
"""

PROXY_SERVER = """\
    upstream fake_upstream {
        server 127.0.0.1:@UP_PORT@;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:@PORT@ backlog=4096;
        location /v1/videos/ {
            proxy_pass http://fake_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "@AUTH@";
        }
    }
"""


def nginx_conf(tmp: Path, name: str, server: str, **subst: object) -> Path:
    return common.nginx_conf(tmp, name, server, AUTH=AUTH_VALUE, **subst)


# ----------------------------------------------------------------------------------------------------
# Process management
# ----------------------------------------------------------------------------------------------------


def wait_ready(procs: Procs, name: str, url: str, headers: dict[str, str] | None = None, timeout: float = 15.0) -> None:
    """Poll until ``url`` answers 200 with the expected body; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        proc = procs.live[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        try:
            status, ctype, body = http_get(url, timeout=1.0, headers=headers)
        except OSError as exc:
            last = repr(exc)
        else:
            if status == 200 and body == expected_body(VIDEO_ID) and ctype.startswith("application/json"):
                return
            raise RuntimeError(f"{name}: wrong answer {status} {ctype!r} {body[:200]!r}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {timeout}s ({last}):\n{procs.log_tail(name)}")


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    c50: WrkResult
    c1: WrkResult
    target_cpu_s: float  # CPU of the target's own processes during the c50 run (0 for upstream-direct)
    upstream_cpu_s: float
    upstream_headers: str = ""


@dataclasses.dataclass
class Plan:
    targets: list[str]
    d50: int
    d1: int
    warmup: int
    pin: bool

    def estimate_s(self) -> float:
        per = self.d50 + self.d1 + self.warmup + 1.5  # + start/readiness/stop
        return len(self.targets) * per + 3

    @property
    def wrk_cpus(self) -> str | None:
        return "0" if self.pin else None

    @property
    def upstream_cpus(self) -> str | None:
        return "0" if self.pin else None

    @property
    def target_cpus(self) -> str | None:
        return "1" if self.pin else None


def measure(plan: Plan, procs: Procs, name: str, base: str, up_pgid: int, header: str | None) -> Row:
    url = f"{base}/v1/videos/{VIDEO_ID}"
    pgid = procs.live[name].pid if name in procs.live else None
    seen = ""
    if name != "upstream-direct":
        status, _ctype, body = http_get(f"{base}/v1/videos/{HEADERS_PROBE_ID}")
        seen = body.decode(errors="replace") if status == 200 else f"HTTP {status}"
    if plan.warmup:
        run_wrk(url, 50, plan.warmup, plan.wrk_cpus, header)
    t0 = group_cpu_seconds(pgid) if pgid else 0.0
    u0 = group_cpu_seconds(up_pgid)
    c50 = run_wrk(url, 50, plan.d50, plan.wrk_cpus, header)
    t1 = group_cpu_seconds(pgid) if pgid else 0.0
    u1 = group_cpu_seconds(up_pgid)
    c1 = run_wrk(url, 1, plan.d1, plan.wrk_cpus, header)
    row = Row(name, c50, c1, t1 - t0, u1 - u0, seen)
    print(
        f"  {name:<17} c50 {c50.rps:>9.0f} req/s  p50 {c50.p50_ms:7.2f} ms  p99 {c50.p99_ms:7.2f} ms  "
        f"| c1 p50 {c1.p50_ms:6.3f} ms  | target CPU {100 * row.target_cpu_s / max(c50.seconds, 1e-9):4.0f}%"
        f"  errors {c50.errors + c1.errors}",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    by = {r.name: r for r in rows}
    ref = by.get("nginx-proxy")
    direct = by.get("upstream-direct")
    head = (
        "| target | c50 req/s | req/s vs nginx | c50 p50 ms | c50 p99 ms | p99 vs nginx | c1 req/s "
        "| c1 p50 ms | c1 p99 ms | added p50 ms (c1, vs direct) | target CPU % | target CPU µs/req "
        "| upstream CPU % | wrk CPU % | errors |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        secs = max(r.c50.seconds, 1e-9)
        vs_rps = fmt_ratio(r.c50.rps / ref.c50.rps) if ref else "-"
        vs_p99 = fmt_ratio(r.c50.p99_ms / ref.c50.p99_ms) if ref and ref.c50.p99_ms else "-"
        added = f"{r.c1.p50_ms - direct.c1.p50_ms:+.3f}" if direct and r is not direct else "-"
        cpu_pct = f"{100 * r.target_cpu_s / secs:.0f}" if r.name != "upstream-direct" else "-"
        cpu_us = (
            f"{1e6 * r.target_cpu_s / r.c50.requests:.0f}" if r.name != "upstream-direct" and r.c50.requests else "-"
        )
        lines.append(
            f"| {r.name} | {r.c50.rps:,.0f} | {vs_rps} | {r.c50.p50_ms:.2f} | {r.c50.p99_ms:.2f} | {vs_p99} "
            f"| {r.c1.rps:,.0f} | {r.c1.p50_ms:.3f} | {r.c1.p99_ms:.3f} | {added} | {cpu_pct} | {cpu_us} "
            f"| {100 * r.upstream_cpu_s / secs:.0f} | {100 * r.c50.wrk_cpu_s / secs:.0f} "
            f"| {r.c50.errors + r.c1.errors} |"
        )
    return "\n".join(lines)


def machine_info() -> dict[str, str]:
    return common.machine_info(PACKAGES)


def report(rows: list[Row], plan: Plan, info: dict[str, str], command: str, elapsed: float) -> str:
    pin = (
        "pinned: wrk and the upstream nginx on CPU 0, the target under test on CPU 1 (`taskset`)"
        if plan.pin
        else "not pinned: wrk, the upstream nginx and the target under test share all cores"
    )
    sniffio_note = ""
    if "sniffio (not installed)" in info["packages"]:
        sniffio_note = (
            "\n- `sniffio` is not installed (the installed anyio no longer requires it), so httpcore"
            "\n  retries a failing `import sniffio` each time it sets up a lock, event or cancel shield:"
            "\n  several failed imports (each a sys.path scan) per request. That inflates the httpx rows;"
            "\n  installing `sniffio` removes that part of the cost, not the rest of httpx's overhead."
        )
    headers = "\n".join(
        f"| {r.name} | `{r.upstream_headers}` |" for r in rows if r.upstream_headers and r.name != "starlette-static"
    )
    return f"""# Upstream transport benchmark

Generated by `bench/transport_bench.py`; re-running it overwrites this file.

- command: `{command}`
- date: {info["date"]} (run took {elapsed:.0f} s)
- machine: nproc={info["nproc"]}, {info["cpu"]}, Linux {info["kernel"]}
- python {info["python"]}; {info["packages"]}
- {info["nginx"]}; {info["wrk"]}
- load: `wrk -t1 -c50 -d{plan.d50}s --latency` after a {plan.warmup} s c50 warm-up, then
  `wrk -t1 -c1 -d{plan.d1}s --latency`, all on 127.0.0.1; CPU placement {pin}

## Results

{table(rows)}

Columns: *vs nginx* ratios are against `nginx-proxy` measured in this run (req/s: higher is better; p99:
lower is better). *added p50 (c1)* is the target's single-connection median minus `upstream-direct`'s, i.e.
the latency one proxy hop adds. *target CPU* is user+system CPU of the target's processes during the c50 run
(100 % = one core); *µs/req* is that CPU divided by the requests served, a figure that does not depend on how
the cores were shared. *errors* counts non-2xx responses plus wrk socket errors over both runs.

## Caveats

- The machine has {info["nproc"]} cores shared by wrk (one thread), the upstream nginx (one worker) and the
  target. The Python targets are single-threaded, so they saturate at ~100 % of one core; whenever target +
  upstream + wrk CPU adds up to ~{100 * int(info["nproc"])} % the cores, not the transport, are the limit (the
  nginx rows), and the µs/req column is the fairer comparison.
- wrk is a closed-loop generator (no coordinated-omission correction): p99 under c50 is queueing behind the
  target's own throughput, not a service-level latency figure.
- nginx-proxy runs its own single worker, so it is compared one process against one process.
- Run-to-run spread on this shared VM reaches +-25 % on req/s for the same target; differences smaller than
  that (e.g. between the two aiohttp variants) are not significant. Compare within one run.{sniffio_note}

## Request headers the upstream received from each target

Probe: one `GET /v1/videos/_headers` through each target from Python's urllib. nginx forwards the caller's
headers (urllib's here) and its own `Host`; the Python candidates send only what their client library adds.

| target | headers seen upstream |
|---|---|
{headers}
"""


# ----------------------------------------------------------------------------------------------------
# --clients: the gateway's own transports, client side only
# ----------------------------------------------------------------------------------------------------

CLIENT_TRANSPORTS = ("aiohttp", "lean")
CLIENTS_BEGIN = "<!-- clients: begin (written by transport_bench.py --clients) -->"
CLIENTS_END = "<!-- clients: end -->"


def serve_upstream(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 upstream: one canned 200 JSON answer per request head (GETs only)."""
    import uvloop

    body = expected_body(VIDEO_ID)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            heads = buf.count(b"\r\n\r\n")
            if heads:
                self.transport.write(answer * heads)
                buf = buf[buf.rindex(b"\r\n\r\n") + 4 :]
            self.buf = buf

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


@dataclasses.dataclass
class ClientSample:
    transport: str
    concurrency: int
    requests: int
    wall_s: float
    cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_s / max(self.requests, 1)


def make_transport(name: str) -> Any:
    from gateway.config import UpstreamSettings
    from gateway.upstream.client import AiohttpTransport
    from gateway.upstream.lean import LeanTransport

    settings = UpstreamSettings()  # production defaults: 256 connections, 30 s bounds, 8 MiB answers
    return LeanTransport(settings) if name == "lean" else AiohttpTransport(settings)


async def drive(transport: Any, url: str, concurrency: int, seconds: float) -> tuple[int, float, float]:
    """``concurrency`` callers in a closed loop for ``seconds``: (requests, wall seconds, process CPU seconds)."""
    from gateway.upstream.client import outbound_headers

    headers = outbound_headers([("Accept", "application/json")], "sk-x", "rid-0123456789abcdef")
    expected = expected_body(VIDEO_ID)
    done = 0
    stop = False

    async def caller() -> None:
        nonlocal done
        while not stop:
            response = await transport.send("GET", url, headers, None)
            if response.status != 200 or response.body != expected:
                raise RuntimeError(f"wrong answer {response.status} {response.body[:100]!r}")
            done += 1

    loop = asyncio.get_running_loop()
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def finish() -> None:
        nonlocal stop
        stop = True

    loop.call_later(seconds, finish)
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done, time.perf_counter() - wall0, time.process_time() - cpu0


async def client_rounds(url: str, rounds: int, seconds: float) -> list[ClientSample]:
    transports = {name: make_transport(name) for name in CLIENT_TRANSPORTS}
    samples: list[ClientSample] = []
    try:
        for transport in transports.values():  # warm-up: open the pools, settle the allocator
            await drive(transport, url, 50, min(1.0, seconds))
        for r in range(rounds):
            order = CLIENT_TRANSPORTS if r % 2 == 0 else tuple(reversed(CLIENT_TRANSPORTS))
            for concurrency in (1, 50):
                for name in order:
                    requests, wall, cpu = await drive(transports[name], url, concurrency, seconds)
                    sample = ClientSample(name, concurrency, requests, wall, cpu)
                    samples.append(sample)
                    print(
                        f"  round {r + 1} c{concurrency:<2} {name:<8} {sample.rps:>8.0f} req/s "
                        f"{sample.cpu_us:>6.1f} CPU µs/req",
                        flush=True,
                    )
    finally:
        for transport in transports.values():
            await transport.aclose()
    return samples


def clients_table(samples: list[ClientSample]) -> str:
    def med(name: str, concurrency: int, attr: str) -> float:
        return statistics.median(
            getattr(s, attr) for s in samples if (s.transport, s.concurrency) == (name, concurrency)
        )

    lines = [
        "| concurrency | transport | req/s (median) | CPU µs/req (median) | CPU µs/req min..max | req/s vs aiohttp "
        "| CPU/req vs aiohttp |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency in (1, 50):
        base_rps, base_cpu = med("aiohttp", concurrency, "rps"), med("aiohttp", concurrency, "cpu_us")
        for name in CLIENT_TRANSPORTS:
            rps, cpu = med(name, concurrency, "rps"), med(name, concurrency, "cpu_us")
            cpus = [s.cpu_us for s in samples if (s.transport, s.concurrency) == (name, concurrency)]
            lines.append(
                f"| {concurrency} | {name} | {rps:,.0f} | {cpu:.1f} | {min(cpus):.1f}..{max(cpus):.1f} "
                f"| {fmt_ratio(rps / base_rps)} | {fmt_ratio(cpu / base_cpu)} |"
            )
    return "\n".join(lines)


def clients_section(samples: list[ClientSample], rounds: int, seconds: float, command: str, elapsed: float) -> str:
    info = machine_info()
    return f"""{CLIENTS_BEGIN}
## Gateway transports, client side only (`--clients`)

- command: `{command}`
- date: {info["date"]} (run took {elapsed:.0f} s); machine: nproc={info["nproc"]}, {info["cpu"]}
- python {info["python"]}; {info["packages"]}
- `gateway.upstream.client.AiohttpTransport` vs `gateway.upstream.lean.LeanTransport`, both with the production
  `UpstreamSettings()` defaults and the headers `outbound_headers` builds, on uvloop in one process, against a
  minimal keep-alive upstream (uvloop, canned ~200-byte JSON answer) in a subprocess on 127.0.0.1. Every answer
  is checked. {rounds} rounds of {seconds:g} s per transport and concurrency, order alternated per round; medians
  over rounds. CPU is the client process's own (`time.process_time`), so the upstream's CPU is excluded.

{clients_table(samples)}

Ratios below 1.00x in the CPU column mean LeanTransport spends less CPU per request. At c50 the client
process is CPU-bound, so req/s follows CPU/req; at c1 req/s is mostly round-trip latency (both processes
sleep between requests), and CPU/req is the figure to compare.
{CLIENTS_END}
"""


def write_clients_section(out: Path, section: str) -> None:
    """Replace (or append) the ``--clients`` section of the results file, keeping the rest as it is."""
    old = out.read_text() if out.exists() else "# Upstream transport benchmark\n"
    if CLIENTS_BEGIN in old and CLIENTS_END in old:
        head, rest = old.split(CLIENTS_BEGIN, 1)
        tail = rest.split(CLIENTS_END, 1)[1].lstrip("\n")
        new = head + section + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    out.write_text(new)


def kept_clients_section(out: Path) -> str:
    """The ``--clients`` section of an existing results file (a full run rewrites the rest)."""
    if not out.exists():
        return ""
    text = out.read_text()
    if CLIENTS_BEGIN not in text or CLIENTS_END not in text:
        return ""
    return "\n" + CLIENTS_BEGIN + text.split(CLIENTS_BEGIN, 1)[1].split(CLIENTS_END, 1)[0] + CLIENTS_END + "\n"


def bench_clients(rounds: int, seconds: float, out_path: Path | None, command: str) -> int:
    import uvloop

    started = time.monotonic()
    print(f"client bench: {rounds} rounds x 2 concurrencies x 2 transports x {seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="transport-clients-") as tmp_s:
        procs = Procs(Path(tmp_s))
        try:
            with hard_limit(HARD_LIMIT_S):
                port = free_port()
                argv = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", "--port", str(port)]
                procs.start("upstream", argv)
                url = f"http://127.0.0.1:{port}/v1/videos/{VIDEO_ID}"
                wait_ready(procs, "upstream", url)
                samples = uvloop.run(client_rounds(url, rounds, seconds))
        except Aborted as exc:
            print(f"\naborted ({exc}); stopping subprocesses", file=sys.stderr)
            return 1
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    elapsed = time.monotonic() - started
    print()
    print(clients_table(samples))
    print(f"\n(run took {elapsed:.0f} s)")
    if out_path is not None:
        write_clients_section(out_path, clients_section(samples, rounds, seconds, command, elapsed))
        print(f"wrote the --clients section of {out_path}")
    return 0


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def bench(plan: Plan, out_path: Path | None, command: str) -> int:
    for tool in ("wrk", "nginx", *(("taskset",) if plan.pin else ())):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (apt-get install -y wrk nginx-light)", file=sys.stderr)
            return 2
    est = plan.estimate_s()
    if est > HARD_LIMIT_S - 10:
        print(f"error: plan needs ~{est:.0f} s, over the {HARD_LIMIT_S} s budget", file=sys.stderr)
        return 2
    print(f"transport bench: {len(plan.targets)} targets, ~{est:.0f} s, cores={len(os.sched_getaffinity(0))}")
    started = time.monotonic()
    info = machine_info()
    rows: list[Row] = []
    nginx = shutil.which("nginx") or "nginx"
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp_s:
        tmp = Path(tmp_s)
        tmp.chmod(0o755)  # nginx workers drop to an unprivileged user when started as root
        procs = Procs(tmp)
        try:
            with hard_limit(HARD_LIMIT_S):
                up_port = free_port()
                upstream = f"http://127.0.0.1:{up_port}"
                conf = nginx_conf(tmp, "upstream", UPSTREAM_SERVER, PORT=up_port)
                procs.start(
                    "upstream",
                    [nginx, "-e", str(tmp / "upstream-error.log"), "-c", str(conf)],
                    plan.upstream_cpus,
                )
                up_pgid = procs.live["upstream"].pid
                # the direct check must carry the header the upstream insists on
                auth_hdr = {"Authorization": AUTH_VALUE}
                wait_ready(procs, "upstream", f"{upstream}/v1/videos/{VIDEO_ID}", auth_hdr)

                for name in plan.targets:
                    if name == "upstream-direct":
                        auth = f"Authorization: {AUTH_VALUE}"
                        rows.append(measure(plan, procs, name, upstream, up_pgid, auth))
                        continue
                    port = free_port()
                    if name == "nginx-proxy":
                        conf = nginx_conf(tmp, "proxy", PROXY_SERVER, PORT=port, UP_PORT=up_port)
                        argv = [nginx, "-e", str(tmp / "proxy-error.log"), "-c", str(conf)]
                    else:
                        argv = [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "--serve",
                            name,
                            "--port",
                            str(port),
                            "--upstream",
                            upstream,
                        ]
                    procs.start(name, argv, plan.target_cpus)
                    try:
                        base = f"http://127.0.0.1:{port}"
                        wait_ready(procs, name, f"{base}/v1/videos/{VIDEO_ID}")
                        rows.append(measure(plan, procs, name, base, up_pgid, None))
                    finally:
                        procs.stop(name)
        except Aborted as exc:
            print(f"\naborted ({exc}); stopping subprocesses", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; stopping subprocesses", file=sys.stderr)
            return 130
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()

    elapsed = time.monotonic() - started
    print()
    print(table(rows))
    print(f"\n(run took {elapsed:.0f} s)")
    if out_path is not None:
        out_path.write_text(report(rows, plan, info, command, elapsed) + kept_clients_section(out_path))
        print(f"wrote {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=PY_TARGETS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clients", action="store_true", help="gateway transports only (aiohttp vs lean), no wrk/nginx")
    p.add_argument("--rounds", type=int, default=7, help="--clients: rounds (default 7)")
    p.add_argument("--round-seconds", type=float, default=1.5, help="--clients: seconds per measurement (default 1.5)")
    p.add_argument("--only", nargs="+", choices=ALL_TARGETS, help="run only these targets (in this order)")
    p.add_argument("--duration", type=int, default=10, help="seconds of the c50 run (default 10)")
    p.add_argument("--duration-c1", type=int, default=5, help="seconds of the c1 run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of c50 warm-up per target (default 2)")
    p.add_argument("--quick", action="store_true", help="3 s / 2 s / 1 s smoke run; writes no results file")
    p.add_argument("--pin", action="store_true", help="wrk + upstream on CPU 0, target on CPU 1")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results-transport.md", help="results markdown")
    p.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    args = p.parse_args(argv)

    if args.serve:
        if not args.port or not args.upstream or not args.upstream.startswith("http://127.0.0.1:"):
            p.error("--serve needs --port and an --upstream of http://127.0.0.1:<port>")
        serve(args.serve, args.port, args.upstream)
        return 0

    if args.serve_upstream:
        if not args.port:
            p.error("--serve-upstream needs --port")
        serve_upstream(args.port)
        return 0

    command = " ".join([".venv/bin/python", "bench/transport_bench.py", *map(shlex.quote, sys.argv[1:])])
    if args.clients:
        rounds, seconds = (2, 0.5) if args.quick else (args.rounds, args.round_seconds)
        out_clients = None if (args.quick or args.no_write) else args.out
        return bench_clients(rounds, seconds, out_clients, command)

    if args.quick:
        args.duration, args.duration_c1, args.warmup = 3, 2, 1
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin needs at least 2 CPUs")
    targets = list(args.only) if args.only else list(ALL_TARGETS)
    if "nginx-proxy" not in targets:
        print("note: nginx-proxy not selected; ratio columns will be '-'")
    plan = Plan(targets, args.duration, args.duration_c1, args.warmup, args.pin)
    out = None if (args.quick or args.no_write) else args.out
    return bench(plan, out, command)


if __name__ == "__main__":
    sys.exit(main())
