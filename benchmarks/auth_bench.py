"""What authenticating the internal plane costs, against the same calls without it.

Run from the repository root:

    python benchmarks/auth_bench.py           # full run, a few minutes on 2 cores
    python benchmarks/auth_bench.py --quick   # smoke run with small counts

Pairs of drivers run the same app, one as shipped and one with
``STREAMWISE_INTERNAL_AUTH=0`` (its internal servers then check no secret); other
pairs do the same with every call over gRPC (``STREAMWISE_LOCAL_TRANSPORT=0``). See
``_onoff`` for how rounds alternate. Figures:

    handle unary calls/s, sequential and 32 concurrent   cost <= 3% (the target)
    the same over gRPC (the interceptor's cost per call)  no target
    stream items/s, ingress unary calls/s (32 concurrent)  no target

The same-node socket checks the secret once per connection (connections are pooled),
the gRPC servers once per call; the ingress's own port is public and unchanged, so
an ingress call pays only for its hop to the replica.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import _onoff  # noqa: E402
from _common import say  # noqa: E402

COST_MAX = 0.03


def report(n: int, sets: int, rounds: int) -> None:
    for local in (True, False):
        def env_of(on: bool, local: bool = local) -> dict[str, str]:
            return {"STREAMWISE_INTERNAL_AUTH": "1" if on else "0", "STREAMWISE_LOCAL_TRANSPORT": "1" if local else "0"}

        figures = _onoff.measure(__file__, env_of, sets, rounds, n, ingress=local)
        path, target = ("", COST_MAX) if local else (", gRPC", None)
        say(_onoff.line(f"handle unary seq{path}", *figures["seq"], target))
        say(_onoff.line(f"handle unary {_onoff.CONCURRENCY}{path}", *figures["concurrent"], target))
        say(_onoff.line(f"stream items{path}", *figures["stream"], None, "items/s"))
        if local:
            say(_onoff.line(f"ingress unary {_onoff.CONCURRENCY}", *figures["ingress"], None))


if __name__ == "__main__":
    sys.exit(_onoff.main(None, __doc__, "auth_bench", report))
