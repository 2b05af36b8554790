"""``kling-gateway archive backfill [--since D]`` and ``archive status``; ``archive_reachable`` for check-config.

Backfill copies the videos of tasks that completed before the archive was on (or that the running gateways gave
up on), with the same claim, verification and ledger record as the background copier, so it is safe to run while
gateways run. Status prints the ledger's counts and bytes per archive state. Neither creates a store: both refuse
one that does not exist (exit 2, naming the path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

import orjson
from prometheus_client import CollectorRegistry

from gateway.cli.common import EXIT_INVALID, EXIT_OK, fail, open_store
from gateway.config import ConfigError, Settings, load_settings
from gateway.content.archive_store import ArchiveBackend, ArchiveError, open_archive
from gateway.content.fetch import VideoFetcher
from gateway.content.metrics import create_content_metrics
from gateway.content.origin import account_keys, origin_of
from gateway.content.wiring import make_archiver
from gateway.logs import make_logs


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``archive`` command and its actions, on the CLI's subparsers."""
    archive = subcommands.add_parser("archive", help="the video archive: backfill older tasks, show counts")
    archive.add_argument("--config", help="TOML settings file")
    actions = archive.add_subparsers(dest="archive_command", required=True, metavar="ACTION")
    backfill = actions.add_parser("backfill", help="archive completed tasks not archived yet")
    backfill.add_argument("--since", help="only tasks completed since: YYYY-MM-DD, ISO date-time, or 30d / 24h")
    status = actions.add_parser("status", help="archived, failed and pending tasks, with bytes")
    status.add_argument("--format", default="table", choices=("table", "json"))
    archive.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if not settings.archive.url and args.archive_command == "backfill":
        raise ConfigError("archive.url: not set (KLING_GATEWAY_ARCHIVE_URL); the archive is off")
    if args.archive_command == "backfill":
        return asyncio.run(_backfill(settings, args.since))
    return asyncio.run(_status(settings, args.format))


async def _backfill(settings: Settings, since_text: str | None) -> int:
    from gateway.ledger.reports import parse_period

    try:
        since, _ = parse_period(since_text, None, time.time())
    except ValueError as exc:
        return fail(str(exc))
    store = await open_store(settings.store_url, create=False)  # it writes, but to the gateways' existing store
    try:
        archive = _archive(settings)
    except ConfigError:
        await store.close()
        raise
    fetcher = VideoFetcher(settings.content, origin_of(settings.upstream.base_url))
    logs = make_logs(level=settings.logging.level, secrets=(settings.upstream_api_key,), stream=sys.stderr)
    metrics = create_content_metrics(CollectorRegistry())
    keys = dict(settings.account_keys)
    key_for = account_keys(keys.get)
    try:
        archiver = make_archiver(settings, archive, store, fetcher, key_for, metrics, logs.log, time.time)
        stored, failed = await archiver.backfill(since or 0.0)
    finally:
        logs.access.flush()
        await fetcher.aclose()
        await archive.aclose()
        await store.close()
    print(f"archived {stored} videos; {failed} attempts failed (retried later by the running gateways)")
    return EXIT_OK if failed == 0 else EXIT_INVALID


async def _status(settings: Settings, fmt: str) -> int:
    store = await open_store(settings.store_url, create=False)
    try:
        summary = await store.archive_summary()
    finally:
        await store.close()
    rows = [{"state": state, "tasks": tasks, "bytes": size} for state, (tasks, size) in summary.items()]
    if fmt == "json":
        document = {"archive": settings.archive.url.split("@")[-1] or None, "states": rows}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    print(f"archive: {settings.archive.url.split('@')[-1] or 'off'}")
    print(f"{'state':<12}{'tasks':>10}{'bytes':>16}")
    for row in rows:
        print(f"{row['state']:<12}{row['tasks']:>10}{row['bytes']:>16}")
    return EXIT_OK


def _archive(settings: Settings) -> ArchiveBackend:
    try:
        archive = open_archive(settings.archive)
    except ArchiveError as exc:
        raise ConfigError(str(exc)) from None
    if archive is None:
        raise ConfigError("archive.url: not set; the archive is off")
    return archive


async def archive_reachable(settings: Settings) -> str | None:
    """Why the configured archive cannot be written and read back, or None (also None while it is off).

    For ``check-config --connect``: writes, reads and deletes a small probe object.
    """
    if not settings.archive.url:
        return None
    try:
        archive = _archive(settings)
    except ConfigError as exc:
        return str(exc)
    try:
        async with asyncio.timeout(30):
            await archive.check()
    except (ArchiveError, TimeoutError) as exc:
        return f"archive {archive.description}: {exc or 'timed out'}"
    finally:
        with contextlib.suppress(ArchiveError):
            await archive.aclose()
    return None
