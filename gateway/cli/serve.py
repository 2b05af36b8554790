"""``serve`` (the gateway, or the gateway with the built-in sandbox upstream) and ``sandbox`` (the upstream alone).

:func:`uvicorn_options` is where the gateway's uvicorn settings are built.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from gateway import __version__
from gateway.cli.common import EXIT_OK, Unreachable, open_store, shown_url
from gateway.config import ConfigError, Settings, load_settings, missing_scale_extra


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subcommands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML settings file (default: $KLING_GATEWAY_CONFIG, else built-in defaults)")
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides [server] workers)")
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="run against the built-in simulated upstream (no key, no network)",
    )
    serve.add_argument(
        "--new-dev-key",
        action="store_true",
        help="with --sandbox: issue a new 'dev' key (by default the one kept in the data directory is reused)",
    )
    serve.set_defaults(handler=run_serve)

    sandbox = subcommands.add_parser("sandbox", help="run only the simulated UniAll upstream")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument("--queued-s", type=float, default=1.0, help="seconds a task stays queued")
    sandbox.add_argument("--run-s", type=float, default=4.0, help="seconds a task runs before it completes")
    sandbox.add_argument("--fail-rate", type=float, default=0.0, help="fraction of tasks that fail (0-1)")
    sandbox.set_defaults(handler=run_sandbox)


def run_serve(args: argparse.Namespace) -> int:
    if args.config:
        os.environ["KLING_GATEWAY_CONFIG"] = str(Path(args.config).resolve())
    settings = load_settings(args.config, require_upstream_key=not args.sandbox)
    server = settings.server
    host = args.host or server.host
    port = args.port if args.port is not None else server.port
    workers = args.workers if args.workers is not None else server.workers
    if args.new_dev_key and not args.sandbox:
        raise ConfigError("--new-dev-key: only with --sandbox")
    if args.sandbox:
        if workers != 1:
            raise ConfigError("--workers: --sandbox runs a single process")
        sock = _bind(host, port)  # first: a busy port fails before the store or the dev key is touched
        _preflight_or_close(settings, sock)
        return _serve_with_sandbox(settings, host, sock, new_dev_key=args.new_dev_key)
    if workers > 1:
        asyncio.run(_preflight(settings))
        _prepare_multiprocess_metrics(Path(settings.server.data_dir))
        _print_listening(host, port, workers, settings)
        uvicorn.run(
            "gateway.asgi:app_from_environment", factory=True, workers=workers, **uvicorn_options(settings, host, port)
        )
        return EXIT_OK
    sock = _bind(host, port)
    _preflight_or_close(settings, sock)
    _print_listening(host, sock.getsockname()[1], 1, settings)
    _run_on(sock, _app_for(settings), settings, host)
    return EXIT_OK


def _bind(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, or a one-line error naming the address (exit status 1)."""
    from gateway.sandbox import bind_socket

    try:
        return bind_socket(host, port)
    except OSError as exc:
        raise Unreachable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _preflight_or_close(settings: Settings, sock: socket.socket) -> None:
    try:
        asyncio.run(_preflight(settings))
    except BaseException:
        sock.close()
        raise


def _print_listening(host: str, port: int, workers: int, settings: Settings) -> None:
    """The start-up line: where the gateway listens, with how many worker processes, on which store (stderr)."""
    shown = f"[{host}]" if ":" in host else host
    plural = "es" if workers != 1 else ""
    line = (
        f"kling-gateway {__version__}: listening on http://{shown}:{port} ({workers} process{plural}), "
        f"store {shown_url(settings.store_url)}"
    )
    print(line, file=sys.stderr)
    sys.stderr.flush()


def _run_on(sock: socket.socket, app: Any, settings: Settings, host: str) -> None:
    """Serve ``app`` on the already bound ``sock`` (uvicorn.run's single-process path, without binding again)."""
    config = uvicorn.Config(app, **uvicorn_options(settings, host, sock.getsockname()[1]))
    uvicorn.Server(config).run(sockets=[sock])


async def _preflight(settings: Settings) -> None:
    """Open the store (creating and migrating it once, before any worker starts) and reach Redis if configured,
    so a wrong URL or a server that is down is one clear line and exit status 1, not a traceback per worker."""
    store = await open_store(settings.store_url, announce=False)
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


def uvicorn_options(settings: Settings, host: str, port: int) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` for the gateway (one process or several)."""
    from gateway.web.listener import ListenerLimits
    from gateway.web.server_protocol import listener_protocol

    return {
        "host": host,
        "port": port,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        # uvicorn's httptools protocol: each response in one write, plus the listener's limits on request heads
        "http": listener_protocol(ListenerLimits.of(settings.server)),
        "timeout_keep_alive": settings.server.keep_alive_timeout_s,
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


def _serve_with_sandbox(settings: Settings, host: str, gateway_sock: socket.socket, *, new_dev_key: bool) -> int:
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
    dev_key = asyncio.run(_dev_key(settings, renew=new_dev_key)) if settings.auth.mode == "keys" else None
    port = gateway_sock.getsockname()[1]
    base_url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    print(f"kling-gateway {__version__} (sandbox upstream at {sandbox_url}, no network)")
    print(f"  base URL : {base_url}")
    auth = ""
    if dev_key:
        print(f"  dev key  : {dev_key}")
        print(f"             (kept in {_dev_key_file(settings)}; --new-dev-key issues another)")
        print(f"  set it   : export DEV_KEY={dev_key}")
        auth = ' -H "Authorization: Bearer $DEV_KEY"'
    print(
        f"  try      : curl -s {base_url}/v1/video/generations{auth} -H 'Content-Type: application/json' "
        """-d '{"model": "kling-v3-std-silent", "prompt": "a red fox in the snow", "duration": 5}'"""
    )
    sys.stdout.flush()
    try:
        _run_on(gateway_sock, _app_for(settings), settings, host)
    finally:
        sandbox.should_exit = True
        thread.join(timeout=5)
    return EXIT_OK


def _dev_key_file(settings: Settings) -> Path:
    return Path(settings.server.data_dir) / "sandbox-dev-key"


async def _dev_key(settings: Settings, *, renew: bool) -> str:
    """A ready key named 'dev' for the sandbox, the same across restarts.

    Its secret is kept in ``<data_dir>/sandbox-dev-key`` (owner-only); it is reused while the store's 'dev' key
    still accepts it. The first run creates it; ``renew`` (``--new-dev-key``), a lost file or a key rotated
    elsewhere rotates it (no grace).
    """
    from gateway.audit.trail import Actor
    from gateway.auth import key_admin
    from gateway.keys import hash_secret, looks_like_key
    from gateway.store.base import KeyRevoked

    path = _dev_key_file(settings)
    kept = path.read_text().strip() if path.is_file() else ""
    store = await open_store(settings.store_url)
    try:
        record = await store.get_key("dev")
        now = time.time()
        if record is None:
            secret = (await key_admin.create(store, "dev", actor=Actor.cli(), now=now)).secret
        elif not renew and looks_like_key(kept) and record.accepts(hash_secret(kept), now):
            return kept
        else:
            try:
                secret = (await key_admin.rotate(store, "dev", actor=Actor.cli(), now=now, grace_s=0)).secret
            except KeyRevoked:
                raise ConfigError("the sandbox's 'dev' key was revoked; create another with 'keys create'") from None
    finally:
        await store.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def run_sandbox(args: argparse.Namespace) -> int:
    from gateway.sandbox import SandboxOptions, create_sandbox_app

    key = os.environ.get("UNIALL_API_KEY") or None
    options = SandboxOptions(api_key=key, queued_s=args.queued_s, run_s=args.run_s, fail_rate=args.fail_rate)
    print(f"kling-gateway sandbox on http://{args.host}:{args.port} ({'checks UNIALL_API_KEY' if key else 'any key'})")
    sys.stdout.flush()
    uvicorn.run(create_sandbox_app(options), host=args.host, port=args.port, access_log=False, log_level="warning")
    return EXIT_OK
