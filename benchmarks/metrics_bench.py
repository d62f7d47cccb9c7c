"""What recording Prometheus metrics costs, against the same calls without it.

Run from the repository root:

    python benchmarks/metrics_bench.py           # full run, a couple of minutes on 2 cores
    python benchmarks/metrics_bench.py --quick   # smoke run with small counts

Pairs of drivers run the same app, one as shipped and one with
``STREAMWISE_METRICS=0`` (nothing is recorded); see ``_onoff`` for how rounds
alternate. Figures, each with a target of at most 3% loss:

    handle unary calls/s, sequential and 32 concurrent
    items/s of one stream of 200k small items
    ingress unary calls/s, 32 concurrent (no target)

A replica records each call with a few int increments and a bisect on its event
loop; streams are counted per frame, not per item; gauges are read at scrape time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from time import perf_counter

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import _onoff  # noqa: E402
from _common import check_no_children, say  # noqa: E402

COST_MAX = 0.03


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_onoff.child_main())
        return 0
    n, sets, rounds = (300, 1, 3) if args.quick else (3000, 4, 3)
    began = perf_counter()
    say(f"metrics_bench: {sets} fresh pairs of drivers x {rounds} alternating rounds per figure, {os.cpu_count()} cores")
    figures = _onoff.measure(__file__, lambda on: {"STREAMWISE_METRICS": "1" if on else "0"}, sets, rounds, n)
    say(_onoff.line("handle unary seq", *figures["seq"], COST_MAX))
    say(_onoff.line(f"handle unary {_onoff.CONCURRENCY}", *figures["concurrent"], COST_MAX))
    say(_onoff.line("stream items", *figures["stream"], COST_MAX, "items/s"))
    say(_onoff.line(f"ingress unary {_onoff.CONCURRENCY}", *figures["ingress"], None))
    check_no_children()
    say(f"total {perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
