"""``check-config``: load the configuration (upstream key required) and print a one-line summary of it."""

from __future__ import annotations

import argparse

from gateway.cli.common import EXIT_OK, shown_url
from gateway.config import load_settings


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = subcommands.add_parser("check-config", help="load and check the configuration")
    config.add_argument("--config", help="TOML settings file")
    config.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, require_upstream_key=True)
    print(
        f"configuration ok: upstream {settings.upstream.base_url}, auth {settings.auth.mode}, "
        f"store {shown_url(settings.store_url)}, cache {shown_url(settings.cache.url)}, "
        f"archive {shown_url(settings.archive.url) if settings.archive.url else 'off'}, "
        f"listening on {settings.server.host}:{settings.server.port}, "
        f"upstream accounts {', '.join(settings.upstream_keys)} (from {settings.upstream_keys_source})"
    )
    return EXIT_OK
