"""Tracing's cost on the hot paths, in one run: ``bench/asgi_cost.py`` for three variants, interleaved.

    .venv/bin/python bench/tracing_cost.py --base 495f4ca [--rounds 3] [--requests 4000]

* ``before``: the code at ``--base`` (a commit without tracing, unpacked with ``git archive`` into a temp dir);
* ``off``: this checkout with no OTLP endpoint set (the plain app: must cost what ``before`` costs);
* ``on``: this checkout exporting every span over OTLP/HTTP to a loopback receiver this script runs (its decoding
  is in this process, not counted; the gateway's span work and its exporter thread are).

Each round runs the three in turn (so a noisy stretch of the machine hits all three alike); the medians of the
in-app CPU µs per request are printed with the ratios to ``before``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import ASGI_COST_PATHS, asgi_cost, unpack_commit
from support.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent

_NO_OTEL = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _run(tree: Path, requests: int, extra_env: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in _NO_OTEL}
    return asgi_cost(sys.executable, tree, requests, {**env, **extra_env})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="a commit without tracing (the 'before' variant)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracing-cost-") as tmp, OtlpReceiver() as receiver:
        base = Path(tmp)
        unpack_commit(ROOT, args.base, base)
        variants = {
            "before": (base, {}),
            "off": (ROOT, {}),
            "on": (ROOT, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.url}/v1/traces"}),
        }
        results: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
        for round_no in range(1, args.rounds + 1):
            for name, (tree, env) in variants.items():
                for path, value in _run(tree, args.requests, env).items():
                    results[name].setdefault(path, []).append(value)
            print(f"round {round_no}/{args.rounds} done", file=sys.stderr)
        spans = len(receiver.spans)
    paths = ASGI_COST_PATHS
    print(f"{'µs CPU/request (median)':26}" + "".join(f"{name:>12}" for name in variants) + "    off/before  on/before")
    for path in paths:
        medians = {name: statistics.median(results[name][path]) for name in variants}
        row = "".join(f"{medians[name]:12.1f}" for name in variants)
        print(
            f"{path:26}{row}    {medians['off'] / medians['before']:9.2f}x  {medians['on'] / medians['before']:8.2f}x"
            f"   (on adds {medians['on'] - medians['before']:+.1f} µs)"
        )
    print(f"spans received by the loopback OTLP receiver: {spans:,}")


if __name__ == "__main__":
    main()
