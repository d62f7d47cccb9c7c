"""What authenticating the internal plane costs, against the same calls without it.

Run from the repository root:

    python benchmarks/auth_bench.py           # full run, about a minute on 2 cores
    python benchmarks/auth_bench.py --quick   # smoke run with small counts

Two drivers run the same app, one as shipped and one with
``STREAMWISE_INTERNAL_AUTH=0`` (its internal servers then check no secret), each in
its own process with its own replicas; other pairs do the same with every call over
gRPC (``STREAMWISE_LOCAL_TRANSPORT=0``). Rounds alternate between the two of a pair,
so both see the same machine, and several fresh pairs are started in turn, so that
where the scheduler happens to put one pair's processes does not decide a figure;
each figure is the median of all rounds:

    handle unary calls/s, sequential and 32 concurrent   cost <= 3% (the target)
    the same over gRPC (the interceptor's cost per call)  no target
    ingress unary calls/s, 32 concurrent, from this process  no target

The same-node socket checks the secret once per connection (connections are pooled),
the gRPC servers once per call; the ingress's own port is public and unchanged, so
an ingress call pays only for its hop to the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from time import perf_counter

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from _common import Child, call_rate, check_no_children, say, verdict  # noqa: E402

import streamwise  # noqa: E402
from streamwise.proto import predict_pb2, predict_pb2_grpc  # noqa: E402

PAYLOAD = bytes(range(16))
CONCURRENCY = 32
COST_MAX = 0.03


@streamwise.deployment(max_ongoing_requests=64)
class Echo:
    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def __call__(self, inputs: dict) -> bytes:
        return inputs["x"]


# -- the child: one driver, answering one command per line ---------------------------


async def _child() -> None:
    options = streamwise.GrpcOptions(port=0, host="127.0.0.1")
    async with streamwise.open_app(Echo.bind(), name="bench", grpc_options=options) as handle:
        print(json.dumps({"ingress": streamwise.ingress_address()}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)

            async def call() -> object:
                return await handle.echo.remote(PAYLOAD)

            rate = await call_rate(call, command["n"], command["concurrency"])
            print(json.dumps({"rate": rate}), flush=True)


# -- the parent ----------------------------------------------------------------------


async def _ingress_rate(address: str, n: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
        request = predict_pb2.PredictRequest(input={"x": PAYLOAD})

        async def call() -> object:
            return await stub.Predict(request)

        await call_rate(call, max(1, n // 10), CONCURRENCY)  # warm the connection
        return await call_rate(call, n, CONCURRENCY)


def _start(auth: bool, local: bool) -> tuple[Child, str]:
    env = dict(os.environ)
    env["STREAMWISE_INTERNAL_AUTH"] = "1" if auth else "0"
    env["STREAMWISE_LOCAL_TRANSPORT"] = "1" if local else "0"
    child = Child(__file__, ["--child"], env)
    child.what = f"driver (auth {'on' if auth else 'off'}, {'same-node socket' if local else 'gRPC'})"
    return child, json.loads(child.read_line())["ingress"]


def _line(label: str, on: list[float], off: list[float], target: float | None) -> str:
    on_rate, off_rate = statistics.median(on), statistics.median(off)
    cost = 1 - on_rate / off_rate
    spread = max(abs(1 - a / b) for a, b in zip(on, off, strict=True))
    judged = f"target <= {target:.0%}  {verdict(cost <= target)}" if target is not None else "no target  -"
    return (
        f"{label:<26}auth on {on_rate:>9,.0f} calls/s   auth off {off_rate:>9,.0f} calls/s   "
        f"cost {cost:+6.1%} (rounds differ by up to {spread:.0%})  {judged}"
    )


def _pair_rounds(pair: list[Child], rounds: int, n: int, concurrency: int) -> tuple[list[float], list[float]]:
    rates: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            rates[i].append(pair[i].ask("rate", n=n, concurrency=concurrency)["rate"])
    return rates


def _measure(local: bool, sets: int, rounds: int, n: int) -> dict[str, tuple[list[float], list[float]]]:
    """Rates by figure, (auth on, auth off), over ``sets`` fresh pairs of drivers."""
    figures: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, rates: tuple[list[float], list[float]]) -> None:
        on, off = figures.setdefault(name, ([], []))
        on.extend(rates[0])
        off.extend(rates[1])

    for _ in range(sets):
        started = [_start(True, local), _start(False, local)]
        pair = [child for child, _ in started]
        try:
            for c in pair:  # warm-up of both sides
                c.ask("rate", n=max(1, n // 10), concurrency=CONCURRENCY)
            add("seq", _pair_rounds(pair, rounds, n, 1))
            add("concurrent", _pair_rounds(pair, rounds, n, CONCURRENCY))
            if local:
                ingress: tuple[list[float], list[float]] = ([], [])
                for r in range(rounds):
                    for i in (0, 1) if r % 2 == 0 else (1, 0):
                        ingress[i].append(asyncio.run(_ingress_rate(started[i][1], n)))
                add("ingress", ingress)
        finally:
            for c in pair:
                c.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_child())
        return 0
    n, sets, rounds = (300, 1, 3) if args.quick else (3000, 4, 3)
    began = perf_counter()
    say(
        f"auth_bench: {sets} fresh pairs of drivers x {rounds} alternating rounds of {n} calls per figure, "
        f"{os.cpu_count()} cores"
    )
    for local in (True, False):
        figures = _measure(local, sets, rounds, n)
        path, target = ("", COST_MAX) if local else (", gRPC", None)
        say(_line(f"handle unary seq{path}", *figures["seq"], target))
        say(_line(f"handle unary {CONCURRENCY}{path}", *figures["concurrent"], target))
        if local:
            say(_line(f"ingress unary {CONCURRENCY}", *figures["ingress"], None))
    check_no_children()
    say(f"total {perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
