"""The ``kling-gateway`` command line: parse arguments, load settings, run. Also ``python -m gateway``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.cli import accounts, archive, audit, config_check, generate, keys, serve, store_copy, usage, validate
from gateway.cli.common import EXIT_INVALID, EXIT_USAGE, Unreachable
from gateway.config import ConfigError
from gateway.store.base import StoreError

COMMAND_FAMILIES = (serve, validate, generate, store_copy, config_check, keys, usage, accounts, audit, archive)
"""The modules whose ``add_parser(subcommands)`` build the subcommands, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kling-gateway",
        description="A validating gateway in front of UniAll's Kling v3 video API: run it, manage its client keys, "
        "read usage, validate or generate videos. 'kling-gateway COMMAND --help' shows each command.",
    )
    parser.add_argument("--version", action="version", version=f"kling-gateway {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in COMMAND_FAMILIES:
        family.add_parser(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except ConfigError as exc:
        print(f"kling-gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"kling-gateway: store unavailable: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Unreachable as exc:
        print(f"kling-gateway: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
