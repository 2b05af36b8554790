"""``validate``: check a request body offline, with the gateway's own rules and prices (exit 0 valid, 1 invalid)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from gateway.cli.common import EXIT_INVALID, EXIT_OK, EXIT_USAGE
from gateway.config import load_settings
from gateway.ledger.pricing import PriceTable
from gateway.validation.checks import ValidationOptions, validate
from gateway.web.verdict import unparseable, verdict


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = subcommands.add_parser("validate", help="validate a request body offline (exit 0 valid, 1 invalid)")
    check.add_argument("file", help="JSON file, or - for standard input")
    check.add_argument("--config", help="TOML settings file ([validation] and [pricing] apply)")
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"kling-gateway validate: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    options = ValidationOptions(
        allow_unknown_fields=settings.validation.allow_unknown_fields,
        block_private_media=settings.validation.block_private_media,
        passthrough_models=frozenset(settings.validation.passthrough_models),
    )
    prices = PriceTable.from_settings(settings.pricing)
    try:
        report = verdict(validate(orjson.loads(raw), options), prices)
    except orjson.JSONDecodeError as exc:
        report = unparseable(f"The body is not valid JSON: {exc}.")
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK if report["valid"] else EXIT_INVALID
