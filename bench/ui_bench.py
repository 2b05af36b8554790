"""Server time of every admin UI page with a seeded ledger (10,000 tasks, 200 keys by default), in-process.

Builds the gateway on a fresh SQLite store (nothing listens on a port; the upstream is never called), seeds keys,
tasks and audit entries through the store's own methods, signs in once, then, ``--runs`` times, requests each page
``--rounds`` times in turn and takes its median; prints per page the median of those medians (with the lowest and
highest) and the p95 of all requests, against the 50 ms target::

    .venv/bin/python bench/ui_bench.py [--tasks 10000] [--keys 200] [--rounds 20] [--runs 5] [--store-url URL]

``--store-url`` runs on another empty store instead, e.g. PostgreSQL with a fresh ``?schema=`` (drop it after).

On a shared machine the load average (printed at the end) shows in every number; the runs spread it over pages.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.audit.trail import KEY_CREATED, Actor, record
from gateway.catalog import MODELS, MODES
from gateway.config import load_settings
from gateway.keys import issue_key
from gateway.ledger.service import month_bounds
from gateway.store.base import Store, TaskRecord
from gateway.ui.session import COOKIE

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"  # noqa: S105 - a throwaway in-process gateway's token
TARGET_MS = 50.0
UI = "/gateway/ui"


async def seed(store: Store, keys: int, tasks: int, now: float) -> None:
    rng = random.Random(7)
    names = [f"team-{i:03}" for i in range(keys)]
    for index, name in enumerate(names):
        budget = Decimal(rng.choice([50, 200, 1000])) if index % 3 else None
        _, key = issue_key(name, now=now - 90 * 86400, rpm=rng.choice([None, 60, 600]), monthly_budget_usd=budget)
        await store.create_key(key)
        await record(store, Actor.admin_api("10.0.0.1"), KEY_CREATED, name, {"rpm": key.rpm}, now=key.created_at)
    models = sorted(MODELS)
    for i in range(tasks):
        model = rng.choice(models)
        seconds = rng.choice([5, 10, 15])
        price = MODELS[model].list_price_usd_per_s
        at = now - rng.uniform(0, 60 * 86400)
        done = rng.random() < 0.8
        status = rng.choice(["completed", "completed", "completed", "failed"]) if done else "in_progress"
        settled = price * seconds if status == "completed" else Decimal(0)
        task = TaskRecord(
            task_id=f"task_{i:06}",
            key_name=rng.choice(names),
            model=model,
            mode=rng.choice(MODES),
            tier=MODELS[model].tier,
            audio=MODELS[model].audio,
            duration=seconds,
            duration_defaulted=False,
            estimate_seconds=seconds,
            estimate_usd=price * seconds,
            price_per_second_usd=price,
            mode_multiplier=Decimal(1),
            request_id=f"req-{i}",
            submitted_at=at,
            status=status,
            outcome=status if done else None,
            settled_seconds=Decimal(seconds) if done else None,
            settled_usd=settled if done else None,
            settled_at=at + 60 if done else None,
        )
        await store.resolve_intent(f"intent-{i}", task)


class Timed:
    """The app, timed: how long each request spent inside it (server time, no client or thread hop)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.last_ms = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.last_ms = (time.perf_counter() - t0) * 1000


def _stats(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], ordered[-1]


async def run(args: argparse.Namespace, data: Path) -> int:
    settings = load_settings(
        env={
            "UNIALL_BASE_URL": "http://127.0.0.1:9",
            "UNIALL_API_KEY": "sk-bench",
            "KLING_GATEWAY_SERVER_DATA_DIR": str(data),
            "KLING_GATEWAY_AUTH_MODE": "keys",
            "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "KLING_GATEWAY_SETTLER_ENABLED": "false",
            "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
            **({"KLING_GATEWAY_STORE_URL": args.store_url} if args.store_url else {}),
        }
    )
    app = create_app(settings, registry=CollectorRegistry(), log_stream=io.StringIO())
    timed = Timed(app)
    async with app.router.lifespan_context(app):
        store = app.state.services.store
        started = time.perf_counter()
        now = time.time()
        await seed(store, args.keys, args.tasks, now)
        print(f"seeded {args.keys} keys and {args.tasks} tasks in {time.perf_counter() - started:.1f} s")
        transport = httpx.ASGITransport(app=timed)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            signed = await client.post(f"{UI}/signin", data={"token": ADMIN_TOKEN})
            assert signed.status_code == 303, signed.text
            client.cookies.set(COOKIE, signed.cookies[COOKIE], path=UI)
            pages = {
                "sign-in": f"{UI}/signin",
                "keys": f"{UI}/keys",
                "usage by key (this month)": f"{UI}/usage",
                "usage by day, 60 days": f"{UI}/usage?since=60d&by=day",
                "usage by key,model, 60 days": f"{UI}/usage?since=60d&by=key%2Cmodel",
                "tasks": f"{UI}/tasks",
                "tasks of one key": f"{UI}/tasks?key=team-007",
                "tasks, status filter": f"{UI}/tasks?status=failed",
                "tasks, key and rare status": f"{UI}/tasks?status=in_progress&key=team-001",
                "accounts": f"{UI}/accounts",
                "audit": f"{UI}/audit",
            }
            medians: dict[str, list[float]] = {label: [] for label in pages}
            every: dict[str, list[float]] = {label: [] for label in pages}
            for _ in range(args.runs):
                for label, path in pages.items():
                    times = []
                    for _ in range(args.rounds):
                        response = await client.get(path)
                        assert response.status_code == 200, (path, response.status_code)
                        times.append(timed.last_ms)
                    medians[label].append(statistics.median(times))
                    every[label].extend(times)
            worst = 0.0
            print(f"{args.runs} runs x {args.rounds} requests per page; ms of server time")
            print(f"{'page':30} {'median of medians':>17} {'lowest':>7} {'highest':>8} {'p95 all':>8}")
            for label in pages:
                median = statistics.median(medians[label])
                worst = max(worst, median)
                p95 = _stats(every[label])[1]
                print(f"{label:30} {median:17.1f} {min(medians[label]):7.1f} {max(medians[label]):8.1f} {p95:8.1f}")
        month = month_bounds(time.time())
        print(f"{'the store query alone':30} {'median':>17} {'p95':>7} {'max':>8}")
        for label, query in {
            "usage month by key": (month[0], month[1], ("key",)),
            "usage 60 days by day": (time.time() - 60 * 86400, None, ("day",)),
            "usage 60 days by key,model": (time.time() - 60 * 86400, None, ("key", "model")),
        }.items():
            times = []
            for _ in range(args.rounds * args.runs):
                t0 = time.perf_counter()
                await store.usage(*query)
                times.append((time.perf_counter() - t0) * 1000)
            median, p95, most = _stats(times)
            print(f"{label:30} {median:17.1f} {p95:7.1f} {most:8.1f}")
    load = os.getloadavg()[0]
    verdict = "met" if worst < TARGET_MS else "missed"
    print(f"target: every page's median of medians under {TARGET_MS:.0f} ms: {verdict} (worst {worst:.1f} ms)")
    print(f"load average (1 min) at the end: {load:.2f} on {os.cpu_count()} cores")
    return 0 if worst < TARGET_MS else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20, help="requests per page in each run")
    parser.add_argument("--runs", type=int, default=5, help="passes over every page")
    parser.add_argument("--store-url", default="", help="an empty store to use instead of a fresh SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        return asyncio.run(run(args, Path(data)))


if __name__ == "__main__":
    sys.exit(main())
