"""``check-config``: load the configuration (upstream key required) and print a one-line summary of it.

``--connect`` also reaches every backend the configuration names, one line each (``ok`` or ``FAILED`` with the
reason, never a secret), and exits 1 if any failed:

* the store: opened (schema migrations applied) and pinged;
* the cache: Redis answers PING (an in-process ``memory://`` cache has nothing to reach);
* the archive, when ``[archive] url`` is set: a probe object written, read back and deleted;
* the upstream, once per upstream account (section 9; the line says which): ``GET /v1/videos/<an id that cannot
  exist>`` with that account's key, which costs nothing: 404 proves the upstream answers and accepts the key,
  401/403 that it refuses the key.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import uuid
from collections.abc import Awaitable, Callable

from gateway.cli.common import EXIT_INVALID, EXIT_OK, shown_url
from gateway.config import Settings, load_settings
from gateway.url_secrets import redact_url, scrub, url_secrets

_PROBE_TIMEOUT_S = 10.0


class CheckFailed(Exception):
    """A backend did not answer as it should; the message says why (and holds no secret)."""


def add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = subcommands.add_parser("check-config", help="load and check the configuration")
    config.add_argument("--config", help="TOML settings file")
    config.add_argument(
        "--connect",
        action="store_true",
        help="also reach the store, the cache, the archive and the upstream (one line each)",
    )
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
    if not args.connect:
        return EXIT_OK
    return EXIT_OK if asyncio.run(connect_all(settings)) else EXIT_INVALID


async def connect_all(settings: Settings) -> bool:
    """Run every check, print one line each; True if all passed."""
    secrets = _secrets(settings)
    passed = True
    checks = list(_CHECKS)
    keys = settings.account_keys
    for account, key in keys.items():
        label = "upstream" if len(keys) == 1 else f"upstream {account}"
        checks.append((label, functools.partial(_upstream, key=key, account=account)))
    for name, check in checks:
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                detail = await check(settings)
        except TimeoutError:
            passed = False
            print(f"{name}: FAILED: no answer within {_PROBE_TIMEOUT_S:g} s")
        except Exception as exc:
            passed = False
            reason = str(exc) or type(exc).__name__
            print(f"{name}: FAILED: {scrub(reason, secrets)}")
        else:
            print(f"{name}: ok: {scrub(detail, secrets)}")
    return passed


async def _store(settings: Settings) -> str:
    from gateway.cli.common import open_store

    store = await open_store(settings.store_url)
    try:
        if not await store.ping():
            raise CheckFailed(f"{redact_url(settings.store_url)} opened but does not answer")
    finally:
        await store.close()
    return redact_url(settings.store_url)


async def _cache(settings: Settings) -> str:
    url = settings.cache.url
    if url.startswith("memory:"):
        return f"{url} (in-process, nothing to reach)"
    from gateway.shared.redis_ops import connect  # the [scale] extra, present when a Redis URL is configured

    client = await connect(url)  # raises CacheUnavailable (its message names the host, not the password)
    try:
        await client.ping()
    finally:
        await client.aclose()
    return f"Redis at {redact_url(url)} answers PING"


async def _upstream(settings: Settings, *, key: str, account: str) -> str:
    from gateway.builders import upstream_transport
    from gateway.upstream.client import outbound_headers

    transport = upstream_transport(settings.upstream)
    path = f"/v1/videos/kling-gateway-check-{uuid.uuid4().hex}"
    url = settings.upstream.base_url.rstrip("/") + path
    headers = outbound_headers((), key, f"check-config-{uuid.uuid4().hex[:12]}")
    try:
        response = await transport.send("GET", url, headers, None)
    finally:
        await transport.aclose()
    base = settings.upstream.base_url
    if response.status in (401, 403):
        raise CheckFailed(
            f"{base} refuses the upstream key of account '{account}' (HTTP {response.status}): "
            f"check {settings.upstream_keys_source or 'UNIALL_API_KEY'}"
        )
    if response.status == 404 or 200 <= response.status < 300:
        return f"{base} answers and accepts the key (GET of an unknown task: HTTP {response.status})"
    raise CheckFailed(f"{base} answered HTTP {response.status} to GET {path}")


async def _archive(settings: Settings) -> str:
    from gateway.content.archive_store import open_archive

    archive = open_archive(settings.archive)  # ArchiveError for an s3:// URL without the [archive] extra
    if archive is None:
        return "off ([archive] url is not set; nothing to reach)"
    try:
        await archive.check()  # ArchiveError saying what failed
    finally:
        await archive.aclose()
    return f"{archive.description}: a probe object written, read back and deleted"


_CHECKS: tuple[tuple[str, Callable[[Settings], Awaitable[str]]], ...] = (
    ("store", _store),
    ("cache", _cache),
    ("archive", _archive),
)
"""The checks every configuration gets; ``connect_all`` adds one upstream check per account."""


def _secrets(settings: Settings) -> tuple[str, ...]:
    found = [settings.upstream_api_key, settings.admin_token, settings.metrics.token, settings.webhook_secret]
    found += settings.upstream_keys.values()
    found += url_secrets(settings.store_url) + url_secrets(settings.cache.url)
    found.append(os.environ.get("AWS_SECRET_ACCESS_KEY", ""))  # the S3 archive's credentials
    return tuple(secret for secret in found if secret)
