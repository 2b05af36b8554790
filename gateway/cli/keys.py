"""``keys create|list|revoke|rotate|webhook-secret``: manage client keys (list never shows secrets)."""

from __future__ import annotations

import argparse
import asyncio
import time
from decimal import Decimal, InvalidOperation

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
    key_commands.add_parser("list", help="list keys")
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

    store = await open_store(settings.store_url)
    now = time.time()
    actor = Actor.cli()
    try:
        if args.keys_command == "list":
            records = await store.list_keys()
            rows = [key_admin.describe(r, now) for r in records]
            print(table(rows, ("name", "prefix", "status", "models", "rpm", "monthly_budget_usd", "created_at")))
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
    except KeyExists:
        return fail(f"a key named '{args.name}' exists already")
    except KeyNotFound:
        return fail(f"no key named '{args.name}'")
    except KeyRevoked:
        return fail(f"key '{args.name}' is revoked and cannot be rotated")
    except ValueError as exc:
        return fail(str(exc))
    finally:
        await store.close()


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
