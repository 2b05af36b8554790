"""CPU per request inside the ASGI app alone (no server, no sockets): isolates the gateway's own cost per hot path.

    .venv/bin/python bench/asgi_cost.py [--requests 8000] [--upstream http://127.0.0.1:18200] [--no-budget]

Builds the production app (key auth, access log to /dev/null, metrics, SQLite ledger in a temp dir) against an
in-process upstream (``httpx.MockTransport``), creates a key with an rpm limit and a budget (``--no-budget``: none, so
submissions take no budget hold), submits tasks, then drives the app's ASGI callable directly with prepared scopes
and reports process CPU µs per request for: cached polls, forwarded polls (cache TTL 0) and submissions. The figure
excludes uvicorn and the upstream client, so it shows what the gateway's own code (routing, auth, cache, metrics,
log, ledger) costs, on a quiet or busy box.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.httpx_transport import HttpxTransport

_ADMIN_TOKEN = secrets.token_hex(24)  # the admin API wants 32+ characters
_BODY = orjson.dumps(
    {
        "model": "kling-v3-pro-audio",
        "prompt": "a red fox running through snow, cinematic",
        "duration": 5,
        "aspect_ratio": "16:9",
    }
)


def _upstream(request: httpx.Request) -> httpx.Response:
    if request.method == "POST":
        task = os.urandom(8).hex()
        return httpx.Response(200, json={"task_id": f"task_{task}", "status": "queued"})
    task_id = request.url.path.rsplit("/", 1)[1]
    return httpx.Response(200, json={"task_id": task_id, "status": "in_progress", "progress": 40})


async def _call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def _measure(app: Any, requests: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]]) -> float:
    started = time.process_time()
    for method, path, headers, body in requests:
        status, answer = await _call(app, method, path, headers, body)
        if status != 200:
            raise SystemExit(f"{method} {path} -> {status} {answer[:300]!r}")
    return (time.process_time() - started) / len(requests) * 1e6


async def _run(
    pending_ttl: str, n: int, rounds: int, upstream: str | None = None, accounts: int = 1, budget: bool = True
) -> dict[str, float]:
    data = tempfile.mkdtemp(prefix="asgi-cost-")
    env = {
        "UNIALL_BASE_URL": upstream or "http://upstream.test",
        "UNIALL_API_KEY": "sk-bench",
        "KLING_GATEWAY_SERVER_DATA_DIR": data,
        "KLING_GATEWAY_ADMIN_TOKEN": _ADMIN_TOKEN,
        "KLING_GATEWAY_CACHE_PENDING_TTL_S": pending_ttl,
        "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
        "KLING_GATEWAY_SETTLER_ENABLED": "false",
    }
    if accounts > 1:  # several accounts, each with a limit well above what the run submits (the admission path)
        del env["UNIALL_API_KEY"]
        env["UNIALL_API_KEYS"] = ",".join(f"acct{i}=sk-bench-{i}" for i in range(accounts))
        limits = {f"acct{i}": {"max_in_flight": 10**6} for i in range(accounts)}
        env["KLING_GATEWAY_UPSTREAM_ACCOUNTS"] = orjson.dumps(limits).decode()
    settings = load_settings(env=env)
    with open(os.devnull, "w") as sink:  # noqa: ASYNC230 - set-up before any measurement
        app = create_app(
            settings,
            transport=None if upstream else HttpxTransport(httpx.MockTransport(_upstream)),
            registry=CollectorRegistry(),
            log_stream=sink,
        )
        lifespan_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await lifespan_queue.put({"type": "lifespan.startup"})
        started = asyncio.Event()

        async def lreceive() -> dict[str, Any]:
            return await lifespan_queue.get()

        async def lsend(message: dict[str, Any]) -> None:
            if message["type"].startswith("lifespan.startup"):
                started.set()

        life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lreceive, lsend))
        await started.wait()
        admin = [(b"authorization", b"Bearer " + _ADMIN_TOKEN.encode()), (b"content-type", b"application/json")]
        limits = {"name": "bench", "rpm": 10**8, **({"monthly_budget_usd": 10**8} if budget else {})}
        status, body = await _call(app, "POST", "/gateway/keys", admin, orjson.dumps(limits))
        assert status == 201, body
        await asyncio.sleep(1.2)  # key refresh
        key = orjson.loads(body)["key"].encode()
        auth = [(b"authorization", b"Bearer " + key), (b"content-type", b"application/json")]
        submit = [("POST", "/v1/video/generations", auth, _BODY)] * (n // 4)
        tasks = []
        for _ in range(200):
            status, answer = await _call(app, "POST", "/v1/video/generations", auth, _BODY)
            assert status == 200, answer
            tasks.append(orjson.loads(answer)["task_id"])
        polls = [("GET", f"/v1/videos/{tasks[i % len(tasks)]}", auth, b"") for i in range(n)]
        await _measure(app, polls[:2000])
        results: dict[str, list[float]] = {"poll": [], "submit": []}
        for _ in range(rounds):
            results["poll"].append(await _measure(app, polls))
            results["submit"].append(await _measure(app, submit))
        await lifespan_queue.put({"type": "lifespan.shutdown"})
        await life
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--upstream",
        help="a real upstream (e.g. `kling-gateway sandbox --port 18200` in another shell: any key) reached "
        "with the production client instead of httpx.MockTransport; its CPU is not counted",
    )
    parser.add_argument(
        "--accounts", type=int, default=1, help="upstream accounts (more than 1: each with a max_in_flight)"
    )
    parser.add_argument("--no-budget", action="store_true", help="the bench key without a monthly budget")
    args = parser.parse_args()
    budget = not args.no_budget
    cached = asyncio.run(_run("3600", args.requests, args.rounds, args.upstream, args.accounts, budget))
    forwarded = asyncio.run(_run("0", args.requests, args.rounds, args.upstream, args.accounts, budget))
    through = f"production client to {args.upstream}" if args.upstream else "httpx MockTransport upstream"
    print(f"cached poll     {cached['poll']:8.1f} µs CPU/request (in-app, no server)")
    print(f"forwarded poll  {forwarded['poll']:8.1f} µs CPU/request (in-app, {through})")
    print(f"submission      {cached['submit']:8.1f} µs CPU/request (in-app, {through})")


if __name__ == "__main__":
    main()
