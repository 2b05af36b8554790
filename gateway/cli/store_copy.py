"""``copy-store``: copy keys, tasks and intents from the configured store into an empty one, then verify totals."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.cli.common import EXIT_OK, fail, open_store, shown_url
from gateway.config import Settings, load_settings


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    copy = subcommands.add_parser(
        "copy-store", help="copy keys, tasks and intents from the configured store into an empty one (e.g. PostgreSQL)"
    )
    copy.add_argument("to_url", metavar="TO_URL", help="the destination store URL, e.g. postgresql://host/db")
    copy.add_argument("--config", help="TOML settings file (its [store] url is the source)")
    copy.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return asyncio.run(_copy_store(settings, args.to_url))


async def _copy_store(settings: Settings, to_url: str) -> int:
    from gateway.store.copy import DestinationNotEmpty, copy_store

    # Both stores are named in the result line rather than announced as they open.
    source = await open_store(settings.store_url, announce=False)
    try:
        destination = await open_store(to_url, "TO_URL", announce=False)
        try:
            report = await copy_store(
                source, destination, progress=lambda n: print(f"  {n:,} tasks copied", file=sys.stderr)
            )
        except DestinationNotEmpty as exc:
            return fail(str(exc))
        finally:
            await destination.close()
    finally:
        await source.close()
    print(
        f"copied {report.keys} keys, {report.tasks:,} tasks and {report.intents} intents "
        f"from {shown_url(settings.store_url)} to {shown_url(to_url)}"
    )
    if report.webhooks:
        print(f"copied {report.webhooks} webhook outbox rows (pending and failed)")
    if report.audit:
        print(f"copied {report.audit} audit trail entries")
    if not report.verified:
        return fail("the usage totals of the two stores differ after the copy: do not switch to the destination")
    print("verified: usage by key, model, mode and day is the same in both stores")
    return EXIT_OK
