"""Calls on a Ray cluster: to a replica on the caller's node vs on another node.

Starts a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``; the
nodes share the machine but not their identity, so a call to the other node takes
the TCP + TLS path a call between machines takes, minus the network). The driver is
on node A; one replica runs on each node. Printed for each: unary calls/s (sequential
and 32 concurrent), items/s of a stream of small items, and a 100 MB numpy array
returned by reference (on the same node through shared memory; across nodes its
bytes follow the reply in chunks, over the TLS connection, into the caller's node
store) and by value, and passed as an argument (by reference). With ``ray[serve]`` installed, the same
figures for Ray Serve follow, measured on the same cluster in the same run.

    python benchmarks/cluster_bench.py [--calls 2000] [--items 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# By value, a 100 MB result needs a larger inline limit than the 4 MiB default (the
# replicas inherit it: the cluster's processes are started from here).
os.environ["STREAMWISE_GRPC_MAX_MESSAGE_LENGTH"] = str(256 * 2**20)

import numpy as np
from _common import call_rate, say, two_ray_nodes

import streamwise

ray = __import__("ray")

_NODE = dict(num_cpus=2, object_store_memory=300 * 2**20)
BIG = 100 * 2**20
CONCURRENCY = 32


class Echo:
    async def echo(self, x: int) -> int:
        return x

    async def items(self, n: int):
        for i in range(n):
            yield i

    async def big(self) -> np.ndarray:
        return self.array

    async def size(self, array: np.ndarray) -> int:
        return array.nbytes

    def __init__(self) -> None:
        self.array = np.ones(BIG, dtype=np.uint8)


def _pinned(name: str, node: str) -> streamwise.Deployment:
    return streamwise.deployment(
        Echo, name=name, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0, "resources": {node: 1}}
    )


async def _figures(handle, calls: int, items: int) -> dict[str, float]:
    await handle.echo.remote(0)
    out = {
        "seq": await call_rate(lambda: handle.echo.remote(1), calls),
        "conc": await call_rate(lambda: handle.echo.remote(1), calls * 2, CONCURRENCY),
    }
    start = time.perf_counter()
    count = 0
    async for _ in handle.items.remote(items):
        count += 1
    out["items"] = count / (time.perf_counter() - start)
    for key, by_reference in (("big_ms", True), ("big_value_ms", False)):
        big = handle.options(by_reference=by_reference).big
        await big.remote()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            array = await big.remote()
            runs.append(time.perf_counter() - start)
            assert array.nbytes == BIG
            del array
        out[key] = min(runs) * 1e3
    out["arg_ms"] = await _argument(handle.size)
    return out


async def _argument(method) -> float:
    """Best of 3: a call whose argument is a 100 MB array (each call a new array)."""
    await method.remote(np.ones(1, dtype=np.uint8))
    runs = []
    for _ in range(3):
        array = np.ones(BIG, dtype=np.uint8)
        start = time.perf_counter()
        assert await method.remote(array) == BIG
        runs.append(time.perf_counter() - start)
    return min(runs) * 1e3


async def _streamwise(calls: int, items: int) -> tuple[dict[str, float], dict[str, float]]:
    near, far = _pinned("Near", "node_a"), _pinned("Far", "node_b")
    async with streamwise.open_app(near.bind(), name="near", cluster="ray") as near_handle:
        near_figures = await _figures(near_handle, calls, items)
    async with streamwise.open_app(far.bind(), name="far", cluster="ray") as far_handle:
        far_figures = await _figures(far_handle, calls, items)
    return near_figures, far_figures


def _serve(calls: int, items: int) -> tuple[dict[str, float], dict[str, float]] | None:
    try:
        from ray import serve
    except ImportError:
        return None

    @serve.deployment(max_ongoing_requests=64)
    class ServeEcho:
        def __init__(self) -> None:
            self.array = np.ones(BIG, dtype=np.uint8)

        async def echo(self, x: int) -> int:
            return x

        async def items(self, n: int):
            for i in range(n):
                yield i

        async def big(self) -> np.ndarray:
            return self.array

        async def size(self, array: np.ndarray) -> int:
            return array.nbytes

    async def measure(handle) -> dict[str, float]:
        await handle.echo.remote(0)
        out = {
            "seq": await call_rate(lambda: handle.echo.remote(1), calls),
            "conc": await call_rate(lambda: handle.echo.remote(1), calls * 2, CONCURRENCY),
        }
        start = time.perf_counter()
        count = 0
        async for _ in handle.options(stream=True).items.remote(items):
            count += 1
        out["items"] = count / (time.perf_counter() - start)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            array = await handle.big.remote()
            runs.append(time.perf_counter() - start)
            assert array.nbytes == BIG
        out["big_ms"] = min(runs) * 1e3
        out["arg_ms"] = await _argument(handle.size)
        return out

    results = []
    for app, node in (("serve_near", "node_a"), ("serve_far", "node_b")):
        options = {"num_cpus": 0, "resources": {node: 1}}
        handle = serve.run(ServeEcho.options(ray_actor_options=options).bind(), name=app, route_prefix=f"/{app}")
        results.append(asyncio.run(measure(handle)))
        serve.delete(app)
    serve.shutdown()
    return results[0], results[1]


def _line(label: str, near: float, far: float, unit: str, fmt: str = ",.0f") -> str:
    return f"{label:<26} same node {near:>{14}{fmt}} {unit:<8} other node {far:>{14}{fmt}} {unit:<8} ratio {far / near:5.2f}"


def _report(who: str, near: dict[str, float], far: dict[str, float]) -> None:
    say(_line(f"{who} unary seq", near["seq"], far["seq"], "calls/s"))
    say(_line(f"{who} unary {CONCURRENCY}", near["conc"], far["conc"], "calls/s"))
    say(_line(f"{who} stream items", near["items"], far["items"], "items/s"))
    say(_line(f"{who} 100 MB result", near["big_ms"], far["big_ms"], "ms", ",.1f"))
    say(_line(f"{who} 100 MB argument", near["arg_ms"], far["arg_ms"], "ms", ",.1f"))
    if "big_value_ms" in near:
        say(_line(f"{who} 100 MB, by value", near["big_value_ms"], far["big_value_ms"], "ms", ",.1f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--items", type=int, default=200_000)
    args = parser.parse_args()
    with two_ray_nodes(_NODE):
        say("two Ray nodes on this machine; the driver on node A; each figure to a replica on A, then on B")
        near, far = asyncio.run(_streamwise(args.calls, args.items))
        _report("streamwise", near, far)
        serve_figures = _serve(args.calls // 4, args.items // 10)
        if serve_figures is None:
            say("Ray Serve: not installed (pip install 'ray[serve]' to measure it here too)")
        else:
            _report("Ray Serve", *serve_figures)
            for key, label in (("seq", "unary seq"), ("conc", f"unary {CONCURRENCY}"), ("items", "stream items")):
                say(f"streamwise / Ray Serve, {label:<14} same node {near[key] / serve_figures[0][key]:6.1f}x   "
                    f"other node {far[key] / serve_figures[1][key]:6.1f}x")


if __name__ == "__main__":
    main()
