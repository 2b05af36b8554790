"""Shared fixtures: a scripted fake upstream and the real sandbox upstream, both on loopback; PostgreSQL URLs."""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient
from support.harness import ADMIN_TOKEN, SANDBOX_API_KEY, GatewayFactory, GatewayHarness
from support.upstream_fake import FakeUpstream, SandboxServer, ServerThread

from gateway.app import create_app
from gateway.config import load_settings
from gateway.sandbox import SandboxOptions, create_sandbox_app
from gateway.store import open_store
from gateway.store.base import Store

POSTGRES_URL_ENV = "KLING_GATEWAY_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

T = TypeVar("T")


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A scripted fake upstream on an ephemeral loopback port."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def sandbox_server() -> Iterator[SandboxServer]:
    """The sandbox app served by uvicorn in a background thread, with fast task timings."""
    options = SandboxOptions(api_key=SANDBOX_API_KEY, queued_s=0.2, run_s=0.5)
    with ServerThread(create_sandbox_app(options), lifespan="off") as server:
        yield SandboxServer(url=server.url, api_key=SANDBOX_API_KEY, options=options)


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Build gateways against a given upstream URL; settings come from ``env`` exactly as in production."""
    with ExitStack() as stack:

        def make(
            upstream_url: str,
            *,
            upstream_key: str = SANDBOX_API_KEY,
            env: dict[str, str] | None = None,
            **create_kwargs: Any,
        ) -> GatewayHarness:
            environ = {
                "UNIALL_BASE_URL": upstream_url,
                "UNIALL_API_KEY": upstream_key,
                "KLING_GATEWAY_SERVER_DATA_DIR": str(tmp_path / "data"),
                "KLING_GATEWAY_AUTH_MODE": "open",
                "KLING_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "KLING_GATEWAY_SETTLER_ENABLED": "false",
                "KLING_GATEWAY_VALIDATION_RESOLVE_MEDIA_HOSTS": "false",
                **(env or {}),
            }
            settings = load_settings(env=environ)
            logs = io.StringIO()
            registry = CollectorRegistry()
            app = create_app(settings, registry=registry, log_stream=logs, **create_kwargs)
            client = stack.enter_context(TestClient(app))
            return GatewayHarness(client=client, logs=logs, registry=registry, settings=settings)

        yield make


# -- Redis (shared status cache, rate limits, single flight) -----------------------------------------------------
# Imports stay inside the fixtures: redis-py is an optional dependency (the "scale" extra).

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a reachable Redis (env ``KLING_GATEWAY_TEST_REDIS_URL``, else 127.0.0.1:6379); skips if unreachable."""
    import os
    from urllib.parse import urlsplit

    url = os.environ.get("KLING_GATEWAY_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}"
    try:
        import redis
    except ImportError as exc:
        pytest.skip(f"redis-py not installed: {exc}")
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis not reachable at {where}: {exc}")
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix for one test; its keys are deleted afterwards (SCAN + DEL)."""
    import uuid

    import redis

    prefix = f"kling-gateway-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def run_in_own_loop(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``await factory()`` on a fresh event loop in a worker thread, leaving any test's loop alone."""

    async def main() -> T:
        return await factory()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``schema=<schema>`` added to its query string."""
    return f"{url}{'&' if urlsplit(url).query else '?'}schema={schema}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server's URL ($KLING_GATEWAY_TEST_POSTGRES_URL, default the local one).

    Tests using it are skipped, with the reason, when the server cannot be reached (or asyncpg is missing).
    """
    url = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
    try:
        import asyncpg
    except ImportError:
        pytest.skip("asyncpg is not installed (kling-gateway[scale])")
    parts = urlsplit(url)
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"  # never the password

    async def probe() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()

    try:
        run_in_own_loop(probe)
    except (OSError, asyncpg.CannotConnectNowError) as exc:  # TimeoutError is an OSError
        pytest.skip(f"PostgreSQL not reachable at {where}: {exc}")
    return url


async def drop_schema(url: str, schema: str) -> None:
    """Drop ``schema`` and everything in it."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """The test server's URL with a fresh ``?schema=`` (created by the store on open), dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    yield with_schema(postgres_url, schema)
    run_in_own_loop(lambda: drop_schema(postgres_url, schema))


# -- S3 (the video archive) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (an ephemeral port) for the session; skips if moto is not installed."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (test extra)")
    from support.s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the test S3 server, with test credentials in the standard AWS environment variables."""
    from support.s3_server import make_bucket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"videos-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_endpoint, name)
    return name


# -- one store of each backend, for the store-level suites -------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store URL: a SQLite file, or a PostgreSQL schema of its own (dropped afterwards)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[Store]:
    """The store at ``backend_url``, opened (created and migrated) and closed afterwards."""
    opened = await open_store(backend_url)
    yield opened
    await opened.close()
