"""``kling-gateway accounts``: the upstream accounts as configured here, with every process's tasks in flight.

States come from this command's own view: ``ok``, ``full`` (at ``max_in_flight``) or ``removed`` (tasks in the
ledger on an account no longer configured). Whether the upstream rejects a key is known only to running gateways:
``GET /gateway/accounts`` on one of them shows ``unauthorized``. Never prints key material, only fingerprints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from gateway.catalog import DEFAULT_ACCOUNT
from gateway.cli.common import aligned
from gateway.config import Settings, load_settings

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

    keys = settings.upstream_keys or ({DEFAULT_ACCOUNT: settings.upstream_api_key} if settings.upstream_api_key else {})
    pool = AccountPool(keys, settings.accounts, create_metrics(), make_logs(level="error").log)
    missing = missing_store_file(settings.store_url)
    if missing is not None:  # read-only: never creates an empty store; the accounts are in the settings anyway
        print(f"kling-gateway: no store at {missing}: tasks in flight not counted", file=sys.stderr)
        return pool.describe()
    store = await open_store(settings.store_url)
    try:
        await pool.refresh(store)
    finally:
        await store.close()
    return pool.describe()


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
