"""A feature on vs off, in pairs of drivers measured in turn in the same run.

Two drivers run the same app, one with the feature's environment variable on and
one with it off, each in its own process with its own replicas. Rounds alternate
between the two of a pair, so both see the same machine, and several fresh pairs
are started in turn, so that where the scheduler happens to put one pair's
processes does not decide a figure; each figure is the median of all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from collections.abc import Callable
from time import perf_counter

import grpc
from _common import Child, call_rate, check_no_children, say, verdict

import streamwise
from streamwise.proto import predict_pb2, predict_pb2_grpc

PAYLOAD = bytes(range(16))
CONCURRENCY = 32
STREAM_ITEMS = 200_000


@streamwise.deployment(max_ongoing_requests=64)
class Echo:
    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def items(self, n: int):
        for i in range(n):
            yield i

    async def __call__(self, inputs: dict) -> bytes:
        return inputs["x"]


async def child_main() -> None:
    """A driver answering one measurement per line of its stdin, until it closes."""
    options = streamwise.GrpcOptions(port=0, host="127.0.0.1")
    async with streamwise.open_app(Echo.bind(), name="bench", grpc_options=options) as handle:
        print(json.dumps({"ingress": streamwise.ingress_address()}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            if command.get("stream"):
                n = command["n"]
                began = loop.time()
                got = 0
                async for _ in handle.items.remote(n):
                    got += 1
                print(json.dumps({"rate": got / (loop.time() - began)}), flush=True)
                continue

            async def call() -> object:
                return await handle.echo.remote(PAYLOAD)

            rate = await call_rate(call, command["n"], command["concurrency"])
            print(json.dumps({"rate": rate}), flush=True)


async def _ingress_rate(address: str, n: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
        request = predict_pb2.PredictRequest(input={"x": PAYLOAD})

        async def call() -> object:
            return await stub.Predict(request)

        await call_rate(call, max(1, n // 10), CONCURRENCY)  # warm the connection
        return await call_rate(call, n, CONCURRENCY)


def main(argv: list[str] | None, doc: str, name: str, report: Callable[[int, int, int], None]) -> int:
    """A benchmark script's main: ``--child`` serves as one driver of a pair; otherwise
    ``report(n, sets, rounds)`` measures and prints, with small counts for ``--quick``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child_main())
        return 0
    n, sets, rounds = (300, 1, 3) if args.quick else (3000, 4, 3)
    began = perf_counter()
    say(f"{name}: {sets} fresh pairs of drivers x {rounds} alternating rounds per figure, {os.cpu_count()} cores")
    report(n, sets, rounds)
    check_no_children()
    say(f"total {perf_counter() - began:.1f} s")
    return 0


def line(label: str, on: list[float], off: list[float], target: float | None, unit: str = "calls/s") -> str:
    """One figure: medians on and off, the cost, and its verdict against ``target``."""
    on_rate, off_rate = statistics.median(on), statistics.median(off)
    cost = 1 - on_rate / off_rate
    spread = max(abs(1 - a / b) for a, b in zip(on, off, strict=True))
    judged = f"target <= {target:.0%}  {verdict(cost <= target)}" if target is not None else "no target  -"
    return (
        f"{label:<26}on {on_rate:>11,.0f} {unit}   off {off_rate:>11,.0f} {unit}   "
        f"cost {cost:+6.1%} (rounds differ by up to {spread:.0%})  {judged}"
    )


def measure(
    script: str, env_of: Callable[[bool], dict[str, str]], sets: int, rounds: int, n: int, *, ingress: bool = True
) -> dict[str, tuple[list[float], list[float]]]:
    """Rates by figure, (on, off), over ``sets`` fresh pairs of drivers running
    ``script --child`` with ``env_of(on)`` added to this environment."""
    figures: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, rates: tuple[list[float], list[float]]) -> None:
        on, off = figures.setdefault(name, ([], []))
        on.extend(rates[0])
        off.extend(rates[1])

    def rounds_of(ask: Callable[[int], float]) -> tuple[list[float], list[float]]:
        rates: tuple[list[float], list[float]] = ([], [])
        for r in range(rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                rates[i].append(ask(i))
        return rates

    for _ in range(sets):
        pair, addresses = [], []
        for on in (True, False):
            child = Child(script, ["--child"], {**os.environ, **env_of(on)})
            child.what = f"driver ({'on' if on else 'off'})"
            pair.append(child)
            addresses.append(json.loads(child.read_line())["ingress"])
        try:
            for c in pair:  # warm-up of both sides
                c.ask("rate", n=max(1, n // 10), concurrency=CONCURRENCY)
            add("seq", rounds_of(lambda i: pair[i].ask("rate", n=n, concurrency=1)["rate"]))
            add("concurrent", rounds_of(lambda i: pair[i].ask("rate", n=n, concurrency=CONCURRENCY)["rate"]))
            items = STREAM_ITEMS if n >= 1000 else STREAM_ITEMS // 20
            add("stream", rounds_of(lambda i: pair[i].ask("rate", n=items, concurrency=1, stream=True)["rate"]))
            if ingress:
                add("ingress", rounds_of(lambda i: asyncio.run(_ingress_rate(addresses[i], n))))
        finally:
            for c in pair:
                c.stop()
    return figures
