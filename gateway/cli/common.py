"""What the command families share: exit codes, errors main() reports, opening a store, printing a table."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings
from gateway.url_secrets import redact_url, scrub, url_secrets

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class Unreachable(Exception):
    """A backend the configuration names did not answer at start-up."""


DEFAULT_STORE_URL = Settings().store_url
_POINT_AT_IT = (
    "run from the folder holding it, or point at it with --config, KLING_GATEWAY_SERVER_DATA_DIR "
    "or KLING_GATEWAY_STORE_URL"
)


def shown_url(url: str) -> str:
    """``url`` with its scheme and any password masked, fit for a message."""
    return scrub(redact_url(url), url_secrets(url))


async def open_store(url: str, setting: str = "store.url", *, create: bool = True, announce: bool = True) -> Any:
    """The store at ``url``; an unusable URL is a configuration error naming ``setting``.

    ``create=False`` (read-only commands) refuses a SQLite file that does not exist rather than creating an
    empty store. A store other than the built-in default, and a newly created one, is named on stderr (unless
    ``announce`` is False: ``serve`` names it in its start-up line), so a command run from the wrong folder says
    where it looked.
    """
    from gateway.store import open_store as open_url

    missing = missing_store_file(url, setting)
    if missing is not None and not create:
        raise ConfigError(f"{setting}: no store at {missing} ({_POINT_AT_IT})")
    created = missing is not None
    try:
        store = await open_url(url)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    if not announce:
        return store
    if created:
        print(f"kling-gateway: created a new store at {shown_url(url)}", file=sys.stderr)
    elif url != DEFAULT_STORE_URL:
        print(f"kling-gateway: store {shown_url(url)}", file=sys.stderr)
    return store


def missing_store_file(url: str, setting: str = "store.url") -> Path | None:
    """The absolute path of a SQLite store file that does not exist yet, else None (other backends too)."""
    from gateway.store import sqlite_path

    if not url.lower().startswith("sqlite://"):
        return None
    try:
        path = Path(sqlite_path(url))
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    return None if str(path) == ":memory:" or path.exists() else path.resolve()


def fail(message: str) -> int:
    """Print ``message`` as the command's error and return the exit status for it."""
    print(f"kling-gateway: {message}", file=sys.stderr)
    return EXIT_INVALID


def table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """``rows`` as aligned text columns (lists joined by commas, floats as UTC times, None as ``-``)."""

    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(value) or "*"
        if isinstance(value, float):
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
        return "-" if value is None else str(value)

    return aligned(columns, [[cell(row[c]) for c in columns] for row in rows]) if rows else "no keys"


def aligned(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A header line and one line per row of ``cells``, each column padded to its widest; no trailing spaces."""
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [columns, *cells]
    )
