"""``keys create|list|update|revoke|rotate|webhook-secret``: manage client keys (list never shows secrets)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from gateway.cli.common import EXIT_OK, fail, open_store, table
from gateway.config import Settings, load_settings
from gateway.store.base import Store


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subcommands.add_parser("keys", help="manage client keys (list never shows secrets)")
    keys.add_argument("--config", help="TOML settings file")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="issue a key; prints the secret once")
    create.add_argument("name")
    create.add_argument("--models", default="", help="allowed model globs, comma separated (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    create.add_argument("--monthly-budget", help="USD per calendar month (UTC), e.g. 250.00")
    create.add_argument("--webhook-url", help="completion webhook for this key's tasks")
    listing = key_commands.add_parser("list", help="list keys with this month's spend and remaining budget")
    listing.add_argument("--format", default="table", choices=("table", "json", "csv"))
    update = key_commands.add_parser(
        "update", help="change a key's models, rpm or monthly budget (in force everywhere within a second)"
    )
    update.add_argument("name")
    update.add_argument("--models", help="allowed model globs, comma separated ('' or '*': all models)")
    update.add_argument("--rpm", help="requests per minute ('none': unlimited)")
    update.add_argument("--monthly-budget", help="USD per calendar month, e.g. 250.00 ('none': no budget)")
    update.add_argument("--webhook-url", help="completion webhook ('none': remove)")
    revoke = key_commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("name")
    hook_secret = key_commands.add_parser(
        "webhook-secret", help="print the whsec_ secret this key's webhook receiver verifies with"
    )
    hook_secret.add_argument("name")
    rotate = key_commands.add_parser("rotate", help="issue a new secret; the old one works for a grace period")
    rotate.add_argument("name")
    rotate.add_argument("--grace-s", type=float, help="seconds the old secret keeps working ([auth] rotation_grace_s)")
    keys.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return asyncio.run(_keys(args, settings))


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.audit.trail import Actor
    from gateway.auth import key_admin
    from gateway.keys import parse_model_globs
    from gateway.store.base import KeyExists, KeyNotFound, KeyRevoked

    store = await open_store(settings.store_url, create=args.keys_command != "list")
    now = time.time()
    actor = Actor.cli()
    known_models = settings.known_models
    try:
        if args.keys_command == "list":
            print(await _listing(store, now, args.format), end="")
            return EXIT_OK
        if args.keys_command == "update":
            record = await key_admin.update_limits(
                store,
                args.name,
                _changes(args),
                actor=actor,
                now=now,
                allow_private_webhooks=settings.webhooks.allow_private_targets,
                known_models=known_models,
            )
            shown = key_admin.describe(record, now)
            limits = ", ".join(f"{k}={_cell(shown[k])}" for k in key_admin.UPDATABLE)
            print(f"updated key '{args.name}': {limits} (in force in every gateway process within a second)")
            return EXIT_OK
        if args.keys_command == "create":
            budget = None
            if args.monthly_budget is not None:
                try:
                    budget = Decimal(args.monthly_budget)
                except InvalidOperation:
                    return fail(f"--monthly-budget: not an amount: {args.monthly_budget!r}")
            issued = await key_admin.create(
                store,
                args.name,
                actor=actor,
                now=now,
                models=parse_model_globs(args.models),
                rpm=args.rpm,
                monthly_budget_usd=budget,
                webhook_url=args.webhook_url,
                allow_private_webhooks=settings.webhooks.allow_private_targets,
                known_models=known_models,
            )
            print(f"created key '{issued.record.name}' (store the secret now, it is not shown again):")
            print(issued.secret)
            return EXIT_OK
        if args.keys_command == "webhook-secret":
            return await _webhook_secret(store, args.name, settings)
        if args.keys_command == "revoke":
            await key_admin.revoke(store, args.name, actor=actor, now=now)
            print(f"revoked key '{args.name}' (in force in every gateway process within a second)")
            return EXIT_OK
        grace = args.grace_s if args.grace_s is not None else settings.auth.rotation_grace_s
        issued = await key_admin.rotate(store, args.name, actor=actor, now=now, grace_s=grace)
        print(f"rotated key '{args.name}'; the old secret works for {grace:g} more seconds. New secret:")
        print(issued.secret)
        return EXIT_OK
    except key_admin.NameRevoked:
        return fail(
            f"a key named '{args.name}' was revoked; names stay reserved (tasks and usage are recorded by name), "
            "choose another name"
        )
    except KeyExists:
        return fail(f"a key named '{args.name}' exists already")
    except KeyNotFound:
        return fail(f"no key named '{args.name}'")
    except KeyRevoked:
        return fail(f"key '{args.name}' is revoked and cannot be {args.keys_command}d")
    except ValueError as exc:
        return fail(str(exc))
    finally:
        await store.close()


_LIST_COLUMNS = (
    "name",
    "prefix",
    "status",
    "models",
    "rpm",
    "monthly_budget_usd",
    "spent_usd",
    "remaining_usd",
    "created_at",
)


async def _listing(store: Store, now: float, fmt: str) -> str:
    """Every key with its month-to-date spend (settled + outstanding estimates) and remaining budget."""
    from gateway.auth import key_admin
    from gateway.ledger.pricing import to_report
    from gateway.ledger.service import month_bounds

    start, end = month_bounds(now)
    rows: list[dict[str, Any]] = []
    for record in await store.list_keys():
        spent = await store.outstanding_and_settled_usd(record.name, start, end)
        budget = record.monthly_budget_usd
        row = key_admin.describe(record, now)
        row["spent_usd"] = to_report(spent)
        row["remaining_usd"] = None if budget is None else to_report(max(budget - spent, Decimal(0)))
        rows.append(row)
    if fmt == "json":
        return orjson.dumps({"data": rows}, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_LIST_COLUMNS)
        writer.writerows([_cell(row[c]) if row[c] is not None else "" for c in _LIST_COLUMNS] for row in rows)
        return out.getvalue()
    return table(rows, _LIST_COLUMNS) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) or "*"
    return "none" if value is None else str(value)


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields ``keys update`` was given (ValueError for a malformed one)."""
    from gateway.keys import parse_model_globs

    changes: dict[str, Any] = {}
    if args.models is not None:
        changes["models"] = () if args.models.strip() in ("", "*") else parse_model_globs(args.models)
    if args.rpm is not None:
        changes["rpm"] = None if args.rpm.lower() == "none" else _integer("--rpm", args.rpm)
    if args.monthly_budget is not None:
        changes["monthly_budget_usd"] = None if args.monthly_budget.lower() == "none" else _amount(args.monthly_budget)
    if args.webhook_url is not None:
        changes["webhook_url"] = None if args.webhook_url.lower() == "none" else args.webhook_url
    if not changes:
        raise ValueError("nothing to change: give --models, --rpm, --monthly-budget or --webhook-url")
    return changes


def _integer(flag: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{flag}: not a whole number: {text!r}")
    return int(text)


def _amount(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"--monthly-budget: not an amount: {text!r}") from None


async def _webhook_secret(store: Store, name: str, settings: Settings) -> int:
    """Print the signing secret of ``name``'s deliveries (derived from KLING_GATEWAY_WEBHOOK_SECRET)."""
    from gateway.webhooks.signing import key_secret, secret_key

    if not settings.webhook_secret:
        return fail("KLING_GATEWAY_WEBHOOK_SECRET: not set (webhooks are off)")
    try:
        master = secret_key(settings.webhook_secret)
    except ValueError as exc:
        return fail(f"KLING_GATEWAY_WEBHOOK_SECRET: {str(exc).removeprefix('webhook secret: ')}")
    if await store.get_key(name) is None:
        return fail(f"no key named '{name}'")
    print(key_secret(master, name))
    return EXIT_OK
