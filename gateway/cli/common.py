"""What the command families share: exit codes, errors main() reports, opening a store, printing a table."""

from __future__ import annotations

import sys
import time
from typing import Any

from gateway.config import ConfigError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class Unreachable(Exception):
    """A backend the configuration names did not answer at start-up."""


async def open_store(url: str, setting: str = "store.url") -> Any:
    """The store at ``url``; an unusable URL is a configuration error naming ``setting``."""
    from gateway.store import open_store as open_url

    try:
        return await open_url(url)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None


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

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines) if rows else "no keys"
