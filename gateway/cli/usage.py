"""``usage``: the usage and cost report from the ledger, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from gateway.cli.common import EXIT_OK, fail, open_store
from gateway.config import load_settings


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = subcommands.add_parser("usage", help="usage and cost report from the ledger")
    usage.add_argument("--config", help="TOML settings file")
    usage.add_argument("--since", help="YYYY-MM-DD, ISO date-time, or relative like 7d / 24h")
    usage.add_argument("--until", help="YYYY-MM-DD (inclusive) or ISO date-time")
    usage.add_argument("--by", default="", help="group by any of key,model,mode,day,account")
    usage.add_argument("--format", default="table", choices=("table", "csv", "json"))
    usage.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gateway.ledger.reports import parse_group_by, parse_period, render

    settings = load_settings(args.config)
    try:
        since, until = parse_period(args.since, args.until, time.time())
        group_by = parse_group_by(args.by)
    except ValueError as exc:
        return fail(str(exc))

    async def report() -> str:
        store = await open_store(settings.store_url, create=False)
        try:
            rows = await store.usage(since, until, group_by)
        finally:
            await store.close()
        return render(rows, group_by, args.format, since=since, until=until)

    sys.stdout.write(asyncio.run(report()))
    return EXIT_OK
