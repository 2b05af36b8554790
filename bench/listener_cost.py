"""Server CPU per request of the listener's protocol, with and without the listener's limits (loopback, wrk).

    .venv/bin/python bench/listener_cost.py [--rounds 5] [--seconds 4] [--connections 50]

Serves a trivial ASGI app (a 2-byte answer, so the protocol is most of the cost) with uvicorn on uvloop, once with
``CoalescingHttpToolsProtocol`` (the protocol before the listener's limits) and once with ``listener_protocol()``
(``GatewayHttpProtocol``: head deadline and cap, Host and version checks, target counted), in interleaved rounds,
and reports the server process's CPU µs per request (``/proc/<pid>/stat``), which a busy machine disturbs far
less than throughput. Needs ``wrk``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

VARIANTS = tuple(os.environ.get("LISTENER_COST_VARIANTS", "coalescing,listener").split(","))


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(variant: str, port: int) -> None:
    import uvicorn

    from gateway.web.server_protocol import CoalescingHttpToolsProtocol, listener_protocol

    http: Any = CoalescingHttpToolsProtocol if variant.startswith("coalescing") else listener_protocol()
    uvicorn.run(
        _app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=http,
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(variant: str, seconds: int, connections: int) -> float:
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port", str(port)])
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", url], check=True, capture_output=True)
        before = _cpu_s(server.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url], check=True, capture_output=True, text=True
        ).stdout
        cpu = _cpu_s(server.pid) - before
        match = re.search(r"(\d+) requests in", out)
        assert match, out
        return cpu / int(match.group(1)) * 1e6
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    results: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for n in range(args.rounds):
        order = VARIANTS if n % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            results[variant].append(measure(variant, args.seconds, args.connections))
        print(f"round {n + 1}: " + ", ".join(f"{v} {results[v][-1]:.1f} µs" for v in VARIANTS), flush=True)
    for variant in VARIANTS:
        runs = results[variant]
        low, high = min(runs), max(runs)
        print(f"{variant:>10}: median {statistics.median(runs):.1f} µs CPU/request (min {low:.1f}, max {high:.1f})")


if __name__ == "__main__":
    main()
