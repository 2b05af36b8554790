"""``audit``: the audit trail of admin actions (key created, updated, revoked, rotated), as a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from gateway.cli.common import EXIT_OK, fail, open_store, table
from gateway.config import load_settings

_COLUMNS = ("at", "actor", "address", "action", "target", "changes")


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subcommands.add_parser("audit", help="the audit trail of admin actions (never a secret)")
    audit.add_argument("--config", help="TOML settings file")
    audit.add_argument("--since", help="YYYY-MM-DD, ISO date-time, or relative like 7d / 24h")
    audit.add_argument("--format", default="table", choices=("table", "json"))
    audit.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gateway.ledger.reports import parse_period

    settings = load_settings(args.config)
    try:
        since, _ = parse_period(args.since, None, time.time())
    except ValueError as exc:
        return fail(str(exc))
    entries = asyncio.run(_entries(settings.store_url, since))
    if args.format == "json":
        sys.stdout.write(json.dumps({"data": entries}, indent=2) + "\n")
    elif not entries:
        print("no admin actions recorded" + ("" if since is None else " since then"))
    else:
        print(table([_row(e) for e in entries], _COLUMNS))
    return EXIT_OK


async def _entries(store_url: str, since: float | None) -> list[dict[str, Any]]:
    """Every recorded action at or after ``since``, newest first."""
    from gateway.audit.trail import audit_view
    from gateway.store.rows import MAX_PAGE

    store = await open_store(store_url, create=False)
    try:
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page, cursor = await store.audit_list(since, MAX_PAGE, cursor)
            found += [audit_view(entry) for entry in page]
            if cursor is None:
                return found
    finally:
        await store.close()


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    changes = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(entry["changes"].items()))
    return {**entry, "changes": changes or None}
