"""Before/after in one run: ``bench/asgi_cost.py`` of an earlier commit and of this checkout, interleaved.

    .venv/bin/python bench/ab_cost.py --base bffd359 [--rounds 5] [--requests 4000] [--accounts 3] [--no-budget]

* ``before``: the code at ``--base`` (``git archive`` into a temp dir; its own ``bench/asgi_cost.py`` runs it);
* ``after``: this checkout, one upstream account (``UNIALL_API_KEY``, the default deployment);
* with ``--accounts N``, also ``after, N accounts``: this checkout with N accounts, each with a ``max_in_flight``
  (so capacity admission runs on every submission);
* with ``--no-budget``, also ``after, no budget``: this checkout with a bench key that has no monthly budget (no
  budget hold; ``before`` checked budgets in memory, so this isolates what the hold costs from everything else).

Each round runs every variant in turn, so a noisy stretch of the machine hits them alike; the script prints every
round, then the medians, the spread (min-max) and the ratio of the medians to ``before``. The figures are in-app
CPU µs per request (no server, no socket): see ``asgi_cost.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import ASGI_COST_PATHS, asgi_cost, unpack_commit

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the 'before' commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--accounts", type=int, default=1, help="also run this checkout with N accounts (N > 1)")
    parser.add_argument("--no-budget", action="store_true", help="also run this checkout with an unbudgeted key")
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="ab-cost-") as tmp:
        base = Path(tmp)
        unpack_commit(ROOT, args.base, base)
        variants: dict[str, tuple[Path, list[str]]] = {"before": (base, []), "after": (ROOT, [])}
        if args.accounts > 1:
            variants[f"after, {args.accounts} accounts"] = (ROOT, ["--accounts", str(args.accounts)])
        if args.no_budget:
            variants["after, no budget"] = (ROOT, ["--no-budget"])
        results: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
        for round_no in range(1, args.rounds + 1):
            for name, (tree, extra) in variants.items():
                figures = asgi_cost(sys.executable, tree, args.requests, env, extra)
                for path, value in figures.items():
                    results[name].setdefault(path, []).append(value)
                shown = ", ".join(f"{path} {value:.1f}" for path, value in figures.items())
                print(f"round {round_no}/{args.rounds} {name:>20}: {shown}", flush=True)
    print(f"\n{'µs CPU/request':16}" + "".join(f"{name:>30}" for name in variants) + "   ratio of medians to before")
    for path in ASGI_COST_PATHS:
        cells, ratios = [], []
        before = statistics.median(results["before"][path])
        for name in variants:
            values = results[name][path]
            median = statistics.median(values)
            cells.append(f"{median:9.1f} ({min(values):.0f}-{max(values):.0f})")
            if name != "before":
                ratios.append(f"{name} {median / before:.2f}x")
        print(f"{path:16}" + "".join(f"{cell:>30}" for cell in cells) + "   " + ", ".join(ratios))


if __name__ == "__main__":
    main()
