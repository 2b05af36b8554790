"""Shared plumbing of the loopback benchmarks (``run.py``, ``transport_bench.py``, the A/B cost scripts).

Processes (each in its own session, stopped as a group), nginx configuration, wrk runs and their parsing, CPU
accounting from ``/proc``, a hard time limit that still runs every ``finally``, and a description of the machine.
Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

INSTALL_HINT = "apt-get install -y wrk nginx-light"

# ----------------------------------------------------------------------------------------------------
# Time limit and signals
# ----------------------------------------------------------------------------------------------------


class Aborted(BaseException):
    """Raised from signal handlers (SIGTERM, SIGALRM) so every ``finally`` still runs."""


def _raise_aborted(signum: int, _frame: object) -> None:
    raise Aborted(signal.Signals(signum).name)


@contextlib.contextmanager
def hard_limit(seconds: int) -> Iterator[None]:
    """Abort the block (``Aborted``) after ``seconds`` or on SIGTERM; Ctrl-C raises ``KeyboardInterrupt``."""
    old_term = signal.signal(signal.SIGTERM, _raise_aborted)
    old_alrm = signal.signal(signal.SIGALRM, _raise_aborted)
    # Ctrl-C must stop the run even when the shell started us with SIGINT ignored (background job).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alrm)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def missing_tools(tools: Iterable[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


# ----------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None, drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment for a child: no proxy settings (loopback must stay loopback), minus ``drop_prefixes``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not any(k.startswith(p) for p in drop_prefixes)
    }
    env.update(extra or {})
    return env


class Procs:
    """The subprocesses this run started; each gets its own session so it is stopped as a group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.live: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        handle = (log or self.tmp / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env if env is not None else child_env(),
                cwd=cwd,
            )
        finally:
            handle.close()
        self.live[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.tmp / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, name: str, timeout: float = 5.0) -> None:
        proc = self.live.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            # the group is ours: start_new_session made pid its leader
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        # nginx workers / leftovers of the group, if any
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)

    def stop_all(self) -> None:
        for name in reversed(list(self.live)):
            self.stop(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_only(url: str) -> str:
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to talk to {url!r}: the benchmarks only target http://127.0.0.1")
    return url


def http_request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib (no proxies); returns status, lower-cased headers and body, errors included."""
    req = urllib.request.Request(loopback_only(url), data=body, method=method, headers=dict(headers or {}))  # noqa: S310
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    status, hdrs, body = http_request("GET", url, headers=headers, timeout=timeout)
    return status, hdrs.get("content-type", ""), body


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None,
    tail: Callable[[], str] = str,
) -> None:
    """Call ``check()`` until it returns True; fail fast when ``proc`` exits. ``check`` may raise OSError.

    ``tail()`` (e.g. the end of the process's log) is added to the error message."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail()}")
        try:
            if check():
                return
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout}s ({last})\n{tail()}")


# ----------------------------------------------------------------------------------------------------
# nginx
# ----------------------------------------------------------------------------------------------------

NGINX_COMMON = """\
daemon off;
worker_processes 1;
pid @DIR@/@NAME@.pid;
error_log @DIR@/@NAME@-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path @DIR@/@NAME@-body;
    proxy_temp_path @DIR@/@NAME@-proxy;
    fastcgi_temp_path @DIR@/@NAME@-fastcgi;
    uwsgi_temp_path @DIR@/@NAME@-uwsgi;
    scgi_temp_path @DIR@/@NAME@-scgi;
@SERVER@
}
"""


def nginx_conf(tmp: Path, name: str, server: str, **subst: object) -> Path:
    """Write ``<tmp>/<name>.conf``: one worker, no access log, ``server`` with ``@KEY@`` placeholders filled."""
    text = NGINX_COMMON.replace("@SERVER@", server)
    for key, value in {"DIR": tmp, "NAME": name, **subst}.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"nginx config {name}: no value for {leftover.group(0)}")
    path = tmp / f"{name}.conf"
    path.write_text(text)
    return path


def nginx_argv(tmp: Path, name: str, conf: Path) -> list[str]:
    return [shutil.which("nginx") or "nginx", "-e", str(tmp / f"{name}-error.log"), "-c", str(conf)]


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of every live process in process group ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """user+system CPU seconds of each live thread of ``pid``, by thread id."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/task"):
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclasses.dataclass
class WrkResult:
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0  # non-2xx/3xx + socket errors
    seconds: float = 0.0
    wrk_cpu_s: float = 0.0
    raw: str = ""


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> WrkResult:
    res = WrkResult(raw=out)
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res.rps = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", out):
        res.requests = int(m.group(1))
        res.seconds = float(m.group(2)) * _UNITS_MS.get(m.group(3), 1e3) / 1e3
    for pct, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
            setattr(res, attr, float(m.group(1)) * _UNITS_MS[m.group(2)])
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        res.errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res.errors += sum(int(g) for g in m.groups())
    return res


def wrk_argv(
    url: str,
    conns: int,
    seconds: int,
    cpus: str | None = None,
    header: str | None = None,
    script: Path | None = None,
) -> list[str]:
    """``wrk -t1 -c<conns> -d<seconds>s --latency`` at a loopback URL, optionally with a header or Lua script."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if header:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(loopback_only(url))
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    return argv


def run_wrk(
    url: str,
    conns: int,
    seconds: int,
    cpus: str | None = None,
    header: str | None = None,
    script: Path | None = None,
) -> WrkResult:
    """Run wrk (see ``wrk_argv``) to completion and parse its report."""
    argv = wrk_argv(url, conns, seconds, cpus, header, script)
    before = children_cpu_seconds()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 15, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    res = parse_wrk(out.stdout)
    res.wrk_cpu_s = children_cpu_seconds() - before
    if res.rps <= 0:
        raise RuntimeError(f"could not parse wrk output:\n{out.stdout}{out.stderr}")
    return res


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


# ----------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def machine_info(packages: Iterable[str] = ()) -> dict[str, str]:
    versions = []
    for pkg in packages:
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(versions),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "--version"]).split(" Copyright")[0],
    }


# ----------------------------------------------------------------------------------------------------
# A/B of the in-app cost (bench/asgi_cost.py) between commits

ASGI_COST_LINE = re.compile(r"^(cached poll|forwarded poll|submission)\s+([\d.]+) µs", re.M)
ASGI_COST_PATHS = ("cached poll", "forwarded poll", "submission")


def unpack_commit(root: Path, rev: str, into: Path) -> None:
    """The package, benchmarks and tests of commit ``rev`` (``git archive``), unpacked into ``into``."""
    import tarfile
    from io import BytesIO

    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "gateway", "bench", "tests"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def asgi_cost(
    python: str, tree: Path, requests: int, env: Mapping[str, str], args: Iterable[str] = ()
) -> dict[str, float]:
    """One round of ``tree``'s own ``bench/asgi_cost.py`` with ``tree`` first on the path: µs CPU per request."""
    run_env = dict(env, PYTHONPATH=str(tree))
    out = subprocess.run(
        [python, str(tree / "bench" / "asgi_cost.py"), "--requests", str(requests), "--rounds", "1", *args],
        cwd=tree,
        env=run_env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {name: float(value) for name, value in ASGI_COST_LINE.findall(out)}
