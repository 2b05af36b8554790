"""The ``kling-gateway`` command line: parse arguments, load settings, run. Also ``python -m gateway``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from gateway import __version__
from gateway.cli import accounts as cli_accounts
from gateway.config import ConfigError, Settings, load_settings, missing_scale_extra
from gateway.ledger.pricing import PriceTable
from gateway.store.base import StoreError
from gateway.validation.checks import ValidationOptions, validate
from gateway.web.verdict import unparseable, verdict

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kling-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kling-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML settings file (default: $KLING_GATEWAY_CONFIG, else built-in defaults)")
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides [server] workers)")
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="run against the built-in simulated upstream (no key, no network)",
    )

    sandbox = commands.add_parser("sandbox", help="run only the simulated UniAll upstream")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument("--queued-s", type=float, default=1.0, help="seconds a task stays queued")
    sandbox.add_argument("--run-s", type=float, default=4.0, help="seconds a task runs before it completes")
    sandbox.add_argument("--fail-rate", type=float, default=0.0, help="fraction of tasks that fail (0-1)")

    check = commands.add_parser("validate", help="validate a request body offline (exit 0 valid, 1 invalid)")
    check.add_argument("file", help="JSON file, or - for standard input")
    check.add_argument("--config", help="TOML settings file ([validation] and [pricing] apply)")

    copy = commands.add_parser(
        "copy-store", help="copy keys, tasks and intents from the configured store into an empty one (e.g. PostgreSQL)"
    )
    copy.add_argument("to_url", metavar="TO_URL", help="the destination store URL, e.g. postgresql://host/db")
    copy.add_argument("--config", help="TOML settings file (its [store] url is the source)")

    config = commands.add_parser("check-config", help="load and check the configuration")
    config.add_argument("--config", help="TOML settings file")

    keys = commands.add_parser("keys", help="manage client keys (list never shows secrets)")
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
    rotate = key_commands.add_parser("rotate", help="issue a new secret; the old one works for a grace period")
    rotate.add_argument("name")
    rotate.add_argument("--grace-s", type=float, help="seconds the old secret keeps working ([auth] rotation_grace_s)")

    usage = commands.add_parser("usage", help="usage and cost report from the ledger")
    usage.add_argument("--config", help="TOML settings file")
    usage.add_argument("--since", help="YYYY-MM-DD, ISO date-time, or relative like 7d / 24h")
    usage.add_argument("--until", help="YYYY-MM-DD (inclusive) or ISO date-time")
    usage.add_argument("--by", default="", help="group by any of key,model,mode,day,account")
    usage.add_argument("--format", default="table", choices=("table", "csv", "json"))
    cli_accounts.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = _COMMANDS[args.command]
        return handler(args)
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


# -- serve ------------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config:
        os.environ["KLING_GATEWAY_CONFIG"] = str(Path(args.config).resolve())
    settings = load_settings(args.config, require_upstream_key=not args.sandbox)
    server = settings.server
    host = args.host or server.host
    port = args.port if args.port is not None else server.port
    workers = args.workers if args.workers is not None else server.workers
    if args.sandbox:
        if workers != 1:
            raise ConfigError("--workers: --sandbox runs a single process")
        asyncio.run(_preflight(settings))
        return _serve_with_sandbox(settings, host, port)
    asyncio.run(_preflight(settings))
    if workers > 1:
        _prepare_multiprocess_metrics(Path(settings.server.data_dir))
    uvicorn.run(
        "gateway.asgi:app_from_environment" if workers > 1 else _app_for(settings),
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        **_uvicorn_options(settings, host, port),
    )
    return EXIT_OK


class Unreachable(Exception):
    """A backend the configuration names did not answer at start-up."""


async def _preflight(settings: Settings) -> None:
    """Open the store (creating and migrating it once, before any worker starts) and reach Redis if configured,
    so a wrong URL or a server that is down is one clear line and exit status 1, not a traceback per worker."""
    store = await _open_store(settings.store_url)
    await store.close()
    if settings.cache.url.startswith("memory:"):
        return
    try:
        from gateway.shared.redis_ops import CacheUnavailable, connect
    except ImportError as exc:
        raise missing_scale_extra("cache.url", exc) from exc
    try:
        client = await connect(settings.cache.url)
    except CacheUnavailable as exc:
        raise Unreachable(f"cache unavailable: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"cache.url: {exc}") from None
    await client.aclose()


def _prepare_multiprocess_metrics(data_dir: Path) -> None:
    """Prometheus multiprocess mode for ``--workers N``: every worker writes samples under one fresh directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = data_dir / "prometheus-multiproc"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _uvicorn_options(settings: Settings, host: str, port: int) -> dict[str, Any]:
    from gateway.web.server_protocol import HTTP_PROTOCOL

    return {
        "host": host,
        "port": port,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "http": HTTP_PROTOCOL,  # uvicorn's httptools protocol, each response's head and body in one write
        "lifespan": "on",
        "access_log": False,  # the gateway writes its own structured access line
        "server_header": False,
        "proxy_headers": False,  # the gateway never uses the client address; skip uvicorn's rewrite
        "timeout_graceful_shutdown": settings.server.shutdown_timeout_s,
        "h11_max_incomplete_event_size": settings.server.max_header_bytes,
        "log_level": "warning",
    }


def _app_for(settings: Settings) -> Any:
    from gateway.app import create_app
    from gateway.asgi import tune_gc

    tune_gc()
    return create_app(settings)


def _serve_with_sandbox(settings: Settings, host: str, port: int) -> int:
    """The gateway on ``host:port`` and the simulated upstream on an ephemeral loopback port, in one process."""
    from gateway.sandbox import SandboxOptions, bind_socket, create_sandbox_app

    upstream_key = "sk-sandbox-" + secrets.token_urlsafe(16)
    sock = bind_socket("127.0.0.1", 0)
    sandbox_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sandbox = uvicorn.Server(
        uvicorn.Config(
            create_sandbox_app(SandboxOptions(api_key=upstream_key, public_base_url=sandbox_url)),
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
    )
    # Its own thread and loop: only the gateway's server handles signals, and it stops the sandbox after itself.
    thread = threading.Thread(target=lambda: asyncio.run(sandbox.serve(sockets=[sock])), name="sandbox", daemon=True)
    thread.start()
    settings = settings.replace(  # the sandbox is one account, whatever upstream keys the environment holds
        upstream=dataclasses.replace(settings.upstream, base_url=sandbox_url),
        upstream_api_key=upstream_key,
        upstream_keys={},
        upstream_keys_file="",
        accounts={},
    )
    dev_key = asyncio.run(_dev_key(settings)) if settings.auth.mode == "keys" else None
    base_url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    print(f"kling-gateway {__version__} (sandbox upstream at {sandbox_url}, no network)")
    print(f"  base URL : {base_url}")
    auth = ""
    if dev_key:
        print(f"  dev key  : {dev_key}")
        auth = f" -H 'Authorization: Bearer {dev_key}'"
    print(
        f"  try      : curl -s {base_url}/v1/video/generations{auth} -H 'Content-Type: application/json' "
        """-d '{"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}'"""
    )
    sys.stdout.flush()
    try:
        uvicorn.run(_app_for(settings), **_uvicorn_options(settings, host, port))
    finally:
        sandbox.should_exit = True
        thread.join(timeout=5)
    return EXIT_OK


async def _dev_key(settings: Settings) -> str:
    """A ready key named 'dev' for the sandbox: created the first time, rotated (no grace) on later runs."""
    from gateway.auth import key_admin
    from gateway.store.base import KeyRevoked

    store = await _open_store(settings.store_url)
    try:
        if await store.get_key("dev") is None:
            return (await key_admin.create(store, "dev", now=time.time())).secret
        try:
            return (await key_admin.rotate(store, "dev", now=time.time(), grace_s=0)).secret
        except KeyRevoked:
            raise ConfigError("the sandbox's 'dev' key was revoked; create another key with 'keys create'") from None
    finally:
        await store.close()


# -- sandbox ----------------------------------------------------------------------------------------------------


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.sandbox import SandboxOptions, create_sandbox_app

    key = os.environ.get("UNIALL_API_KEY") or None
    options = SandboxOptions(api_key=key, queued_s=args.queued_s, run_s=args.run_s, fail_rate=args.fail_rate)
    print(f"kling-gateway sandbox on http://{args.host}:{args.port} ({'checks UNIALL_API_KEY' if key else 'any key'})")
    sys.stdout.flush()
    uvicorn.run(create_sandbox_app(options), host=args.host, port=args.port, access_log=False, log_level="warning")
    return EXIT_OK


# -- validate ---------------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
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


# -- check-config -----------------------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, require_upstream_key=True)
    print(
        f"configuration ok: upstream {settings.upstream.base_url}, auth {settings.auth.mode}, "
        f"store {settings.store_url.split('@')[-1]}, cache {settings.cache.url.split('@')[-1]}, "
        f"listening on {settings.server.host}:{settings.server.port}, "
        f"upstream accounts {', '.join(settings.upstream_keys)} (from {settings.upstream_keys_source})"
    )
    return EXIT_OK


# -- keys and usage -----------------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return asyncio.run(_keys(args, settings))


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import key_admin
    from gateway.keys import parse_model_globs
    from gateway.store.base import KeyExists, KeyNotFound, KeyRevoked

    store = await _open_store(settings.store_url)
    now = time.time()
    try:
        if args.keys_command == "list":
            records = await store.list_keys()
            rows = [key_admin.describe(r, now) for r in records]
            print(_table(rows, ("name", "prefix", "status", "models", "rpm", "monthly_budget_usd", "created_at")))
            return EXIT_OK
        if args.keys_command == "create":
            budget = None
            if args.monthly_budget is not None:
                try:
                    budget = Decimal(args.monthly_budget)
                except InvalidOperation:
                    return _fail(f"--monthly-budget: not an amount: {args.monthly_budget!r}")
            issued = await key_admin.create(
                store,
                args.name,
                now=now,
                models=parse_model_globs(args.models),
                rpm=args.rpm,
                monthly_budget_usd=budget,
                webhook_url=args.webhook_url,
            )
            print(f"created key '{issued.record.name}' (store the secret now, it is not shown again):")
            print(issued.secret)
            return EXIT_OK
        if args.keys_command == "revoke":
            await key_admin.revoke(store, args.name, now=now)
            print(f"revoked key '{args.name}' (in force in every gateway process within a second)")
            return EXIT_OK
        grace = args.grace_s if args.grace_s is not None else settings.auth.rotation_grace_s
        issued = await key_admin.rotate(store, args.name, now=now, grace_s=grace)
        print(f"rotated key '{args.name}'; the old secret works for {grace:g} more seconds. New secret:")
        print(issued.secret)
        return EXIT_OK
    except KeyExists:
        return _fail(f"a key named '{args.name}' exists already")
    except KeyNotFound:
        return _fail(f"no key named '{args.name}'")
    except KeyRevoked:
        return _fail(f"key '{args.name}' is revoked and cannot be rotated")
    except ValueError as exc:
        return _fail(str(exc))
    finally:
        await store.close()


def cmd_usage(args: argparse.Namespace) -> int:
    from gateway.ledger.reports import parse_group_by, parse_period, render

    settings = load_settings(args.config)
    try:
        since, until = parse_period(args.since, args.until, time.time())
        group_by = parse_group_by(args.by)
    except ValueError as exc:
        return _fail(str(exc))

    async def report() -> str:
        store = await _open_store(settings.store_url)
        try:
            rows = await store.usage(since, until, group_by)
        finally:
            await store.close()
        return render(rows, group_by, args.format, since=since, until=until)

    sys.stdout.write(asyncio.run(report()))
    return EXIT_OK


async def _open_store(url: str, setting: str = "store.url") -> Any:
    """The store at ``url``; an unusable URL is a configuration error naming ``setting``."""
    from gateway.store import open_store

    try:
        return await open_store(url)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def cmd_copy_store(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return asyncio.run(_copy_store(settings, args.to_url))


async def _copy_store(settings: Settings, to_url: str) -> int:
    from gateway.store.copy import DestinationNotEmpty, copy_store

    source = await _open_store(settings.store_url)
    try:
        destination = await _open_store(to_url, "TO_URL")
        try:
            report = await copy_store(
                source, destination, progress=lambda n: print(f"  {n:,} tasks copied", file=sys.stderr)
            )
        except DestinationNotEmpty as exc:
            return _fail(str(exc))
        finally:
            await destination.close()
    finally:
        await source.close()
    print(f"copied {report.keys} keys, {report.tasks:,} tasks and {report.intents} intents")
    if not report.verified:
        return _fail("the usage totals of the two stores differ after the copy: do not switch to the destination")
    print("verified: usage by key, model, mode and day is the same in both stores")
    return EXIT_OK


def _fail(message: str) -> int:
    print(f"kling-gateway: {message}", file=sys.stderr)
    return EXIT_INVALID


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(value) or "*"
        if isinstance(value, float):
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
        return "-" if value is None else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines) if rows else "no keys"


_COMMANDS = {
    "serve": cmd_serve,
    "accounts": cli_accounts.cmd_accounts,
    "keys": cmd_keys,
    "copy-store": cmd_copy_store,
    "usage": cmd_usage,
    "sandbox": cmd_sandbox,
    "validate": cmd_validate,
    "check-config": cmd_check_config,
}

if __name__ == "__main__":
    sys.exit(main())
