"""``kling-gateway accounts``: the upstream accounts as configured here, with every process's tasks in flight.

States: ``ok``, ``full`` (at ``max_in_flight``, or set aside after a capacity refusal), ``unauthorized`` (the
upstream rejected the key configured here) or ``removed`` (tasks in the ledger on an account no longer configured).
The set-asides are the running gateways' shared marks, read from Redis when ``[cache] url`` names one, else from
the store. Never prints key material, only fingerprints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from gateway.cli.common import aligned
from gateway.config import Settings, load_settings

if TYPE_CHECKING:
    from gateway.store.base import AccountMark, Store

COLUMNS = ("name", "state", "in_flight", "max_in_flight", "weight", "models", "key_fingerprint")


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    accounts = subcommands.add_parser("accounts", help="the upstream accounts: state, tasks in flight, limit")
    accounts.add_argument("--config", help="TOML settings file")
    accounts.add_argument("--format", default="table", choices=("table", "json"))
    accounts.set_defaults(handler=cmd_accounts)


def cmd_accounts(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    rows = asyncio.run(describe(settings))
    if args.format == "json":
        print(json.dumps({"data": rows}, indent=2))
    else:
        print(render(rows))
    return 0


async def describe(settings: Settings) -> list[dict[str, Any]]:
    """The ``GET /gateway/accounts`` rows, from the settings and the store."""
    from gateway.accounts.pool import AccountPool
    from gateway.cli.common import missing_store_file, open_store
    from gateway.logs import make_logs
    from gateway.metrics import create_metrics

    keys = {name: key for name, key in settings.account_keys.items() if key}
    pool = AccountPool(keys, settings.accounts, create_metrics(), make_logs(level="error").log)
    missing = missing_store_file(settings.store_url)
    if missing is not None:  # read-only: never creates an empty store; the accounts are in the settings anyway
        print(f"kling-gateway: no store at {missing}: tasks in flight not counted", file=sys.stderr)
        return pool.describe()
    store = await open_store(settings.store_url)
    try:
        await pool.refresh(store)
        marks = await shared_marks(settings, store)
        if marks is not None:
            pool.apply_marks(marks)
    finally:
        await store.close()
    return pool.describe()


async def shared_marks(settings: Settings, store: Store) -> dict[str, AccountMark] | None:
    """The running gateways' set-aside marks: from Redis when configured (None if it does not answer), else the
    store's."""
    from gateway.accounts.board import StoreBoard
    from gateway.logs import make_logs

    log = make_logs(level="error", stream=sys.stderr).log
    if settings.cache.url.startswith("memory:"):
        return await StoreBoard(store, log).read()
    try:
        from gateway.shared.fail_open import SharedState
        from gateway.shared.redis_ops import CacheUnavailable
    except ImportError as exc:
        print(f"kling-gateway: {exc} (the [scale] extra): set-asides not shown", file=sys.stderr)
        return None
    try:
        shared = await SharedState.connect(settings.cache, call_timeout_s=settings.upstream.timeout_s, log=log)
    except (CacheUnavailable, ValueError) as exc:  # the counts are still worth printing
        print(f"kling-gateway: cache unavailable, set-asides not shown: {exc}", file=sys.stderr)
        return None
    try:
        return await shared.accounts.read()
    finally:
        await shared.close()


def render(rows: list[dict[str, Any]]) -> str:
    """A plain table; ``max_in_flight`` 0 reads "none", models [] reads "*"."""
    if not rows:
        return "no upstream accounts (set UNIALL_API_KEY, UNIALL_API_KEYS or UNIALL_API_KEYS_FILE)"

    def cell(column: str, value: Any) -> str:
        if column == "models":
            return ",".join(value) or "*"
        if column == "max_in_flight" and value == 0:
            return "none"
        if column == "weight":
            return f"{value:g}"
        return "-" if value is None else str(value)

    return aligned(COLUMNS, [[cell(c, row[c]) for c in COLUMNS] for row in rows])
