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

import os
import sys

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import _onoff  # noqa: E402
from _common import say  # noqa: E402

COST_MAX = 0.03


def report(n: int, sets: int, rounds: int) -> None:
    figures = _onoff.measure(__file__, lambda on: {"STREAMWISE_METRICS": "1" if on else "0"}, sets, rounds, n)
    say(_onoff.line("handle unary seq", *figures["seq"], COST_MAX))
    say(_onoff.line(f"handle unary {_onoff.CONCURRENCY}", *figures["concurrent"], COST_MAX))
    say(_onoff.line("stream items", *figures["stream"], COST_MAX, "items/s"))
    say(_onoff.line(f"ingress unary {_onoff.CONCURRENCY}", *figures["ingress"], None))


if __name__ == "__main__":
    sys.exit(_onoff.main(None, __doc__, "metrics_bench", report))
