"""``python -m gateway.docs``: rewrite README.md's generated sections from the code (``--check``: only compare)."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.docs.readme import render_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def main(argv: list[str]) -> int:
    current = README.read_text()
    rendered = render_readme(current)
    if "--check" in argv:
        if rendered != current:
            print("README.md: generated sections are stale; run python -m gateway.docs", file=sys.stderr)
            return 1
        return 0
    README.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
