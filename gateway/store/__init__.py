"""The durable store: ``open_store(url)`` opens the backend the URL names; the interface lives in ``base``."""

from __future__ import annotations

import re
from typing import Final

from gateway.store.base import Store

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}")


def sqlite_path(url: str) -> str:
    """The file path in ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``sqlite:///:memory:``."""
    rest = url[len("sqlite://") :]
    if not rest.startswith("/") or len(rest) < 2:
        raise ValueError("store URL must look like sqlite:///relative/path.db or sqlite:////absolute/path.db")
    path = rest[1:]
    if "?" in path or "#" in path:
        raise ValueError("store URL: sqlite URLs take no query or fragment")
    return path


async def open_store(url: str) -> Store:
    """Open (creating and migrating if needed) the store at ``url``; ValueError for an unusable URL.

    ``sqlite:///./data/gateway.db`` (relative), ``sqlite:////var/lib/gateway/gateway.db`` (absolute),
    ``sqlite:///:memory:`` (tests); ``postgresql://user:pw@host:5432/db`` (or ``postgres://``), optionally with
    ``?schema=name`` to keep every table in that PostgreSQL schema; PostgreSQL needs ``kling-gateway[scale]``
    (asyncpg). Every backend is imported on demand. The error names the scheme at most, never the rest of the URL.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or _SCHEME.fullmatch(scheme) is None:
        raise ValueError("store URL must start with a scheme, e.g. sqlite:///./data/gateway.db")
    scheme = scheme.lower()
    if scheme == "sqlite":
        from gateway.store.sqlite import SQLiteStore  # on demand: one backend per process

        return await SQLiteStore.open(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        try:
            from gateway.store.postgres import PostgresStore
        except ImportError as exc:  # asyncpg is an optional dependency
            if (exc.name or "").partition(".")[0] != "asyncpg":
                raise
            raise ValueError("store URL: PostgreSQL needs asyncpg: install kling-gateway[scale]") from None
        return await PostgresStore.open(url)
    raise ValueError(f"unsupported store URL scheme {scheme!r} (supported: 'sqlite', 'postgresql', 'postgres')")
