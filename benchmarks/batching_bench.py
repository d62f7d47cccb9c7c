"""Batching and stream coalescing, each figure beside its baseline measured in the same run.

Run from the repository root:

    python benchmarks/batching_bench.py           # full run, about a minute on 2 cores
    python benchmarks/batching_bench.py --quick   # smoke run with small counts

(a) A method costing 2 ms fixed + 0.05 ms per item, called by 64 concurrent
    callers, with ``@batch(max_batch_size=32, batch_wait_timeout_s=0.01)`` against
    the same method unbatched. The cost is simulated as an accelerator would spend
    it: ``await asyncio.sleep(cost)`` while holding the replica's one "device" lock,
    so the event loop stays free for RPCs but only one call (or batch) computes at
    a time. The 64 callers are tasks in a client deployment (its own process),
    calling through a handle. Targets: throughput >= 8x unbatched; p99 latency <=
    batch_wait_timeout_s + 2 x one batch's execution time (the median batch
    duration recorded in the batch stats). For reference, the same callers on a
    method that does nothing show the RPC path's own latency at this concurrency.
(b) One stream of 1,000,000 8-byte items, read item by item with ``async for``:
    items/s with default coalescing against ``@coalesce(max_items=1)`` and a bare
    grpc.aio server sending one message per item (its own process, generic handler
    on raw bytes). One message per item runs at a few thousand items/s, so those
    two baselines stream ``--baseline-items`` items (100,000 by default; items/s is
    a steady-state rate). Target: default >= 10x bare.
(c) Time to first item of a stream, p50 over alternating calls: default coalescing
    <= 1.2x ``max_items=1``.
(d) A producer yielding one item per millisecond (on a fixed schedule), with
    ``@coalesce(max_delay_s=0.005)``, against the same producer with default
    coalescing: frames must average >= 4 items, and no item may arrive later than
    5 ms plus transport time, i.e. its worst yield-to-receipt latency must stay
    within 5 ms of the default run's worst. Items carry ``time.monotonic()`` from
    the replica (one clock for every process of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from time import perf_counter

# Keep gRPC core's routine connection logs out of the report (set before grpc loads).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import psutil  # noqa: E402
from _common import (
    BARE_ITEMS,
    BareServer,
    check_no_children,
    expect,
    percentile,
    say,
    serve_bare,
    verdict,
)

import streamwise  # noqa: E402

FIXED_COST_S = 0.002
PER_ITEM_COST_S = 0.00005
CALLERS = 64
MAX_BATCH_SIZE = 32
BATCH_WAIT_S = 0.01
HOLD_S = 0.005
TICK_S = 0.001

THROUGHPUT_RATIO_MIN = 8.0
STREAM_RATIO_MIN = 10.0
FIRST_ITEM_RATIO_MAX = 1.2
ITEMS_PER_FRAME_MIN = 4.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    load_s: float  # seconds of traffic per round of (a)
    rounds: int  # alternating rounds of (a); the best throughput of each side counts
    stream_items: int
    baseline_items: int
    first_item_calls: int
    ticks: int


FULL = Sizes(load_s=3.0, rounds=2, stream_items=1_000_000, baseline_items=100_000, first_item_calls=200, ticks=2_000)
QUICK = Sizes(load_s=0.5, rounds=1, stream_items=100_000, baseline_items=5_000, first_item_calls=30, ticks=300)


def _item(i: int) -> bytes:
    return i.to_bytes(8, "little")


# -- (a): a model with a one-at-a-time device, and the clients calling it -------------
# max_ongoing_requests sits above the 64 callers so that no call is rejected and
# retried after a backoff: the figures measure batching, not admission control.


@streamwise.deployment(max_ongoing_requests=2 * CALLERS)
class Model:
    def __init__(self) -> None:
        self._device = asyncio.Lock()
        self._in_replica: list[float] = []  # per batched call: queued + batch run, in this process

    async def _compute(self, n: int) -> None:
        async with self._device:
            await asyncio.sleep(FIXED_COST_S + PER_ITEM_COST_S * n)

    async def predict(self, x: int) -> int:
        await self._compute(1)
        return x

    async def predict_batched(self, x: int) -> int:
        start = perf_counter()
        result = await self._infer(x)
        self._in_replica.append(perf_counter() - start)
        return result

    @streamwise.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _infer(self, xs: list[int]) -> list[int]:
        await self._compute(len(xs))
        return xs

    async def noop(self, x: int) -> int:
        return x

    async def batch_figures(self) -> tuple[float, float, int, list[float]]:
        """Since the last call: median batch duration, mean batch size, batch count,
        and each batched call's time in this replica (queued + its batch's run)."""
        stats = self._infer.stats.snapshot()
        self._infer.stats.clear()
        in_replica, self._in_replica = self._in_replica, []
        if not stats:
            return 0.0, 0.0, 0, in_replica
        return (
            statistics.median(s.duration_s for s in stats),
            statistics.fmean(s.size for s in stats),
            len(stats),
            in_replica,
        )


@streamwise.deployment
class Clients:
    def __init__(self, model: streamwise.DeploymentHandle) -> None:
        self._model = model

    async def drive(self, method: str, seconds: float, callers: int) -> tuple[int, float, list[float]]:
        """``callers`` tasks calling ``method`` back to back for ``seconds``."""
        call = getattr(self._model, method)
        latencies: list[float] = []
        stop = perf_counter() + seconds

        async def caller(seed: int) -> None:
            i = seed
            while perf_counter() < stop:
                start = perf_counter()
                if await call.remote(i) != i:
                    raise RuntimeError(f"{method} answered another caller's item")
                latencies.append(perf_counter() - start)
                i += callers

        start = perf_counter()
        async with asyncio.TaskGroup() as tg:
            for seed in range(callers):
                tg.create_task(caller(seed))
        return len(latencies), perf_counter() - start, latencies


# -- (b), (c), (d): streams ----------------------------------------------------------


@streamwise.deployment(max_ongoing_requests=16)
class Streamer:
    async def items(self, n: int):
        for i in range(n):
            yield _item(i)

    @streamwise.coalesce(max_items=1)
    async def items_one_per_frame(self, n: int):
        for i in range(n):
            yield _item(i)

    async def first_then_wait(self, payload: bytes):
        yield payload
        await asyncio.sleep(3600)  # until the caller goes away
        yield payload

    @streamwise.coalesce(max_items=1)
    async def first_then_wait_one_per_frame(self, payload: bytes):
        yield payload
        await asyncio.sleep(3600)
        yield payload

    async def ticks(self, n: int):
        """One monotonic timestamp per millisecond, on a fixed schedule."""
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * TICK_S - time.monotonic()))
            yield time.monotonic()

    @streamwise.coalesce(max_delay_s=HOLD_S)
    async def ticks_held(self, n: int):
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * TICK_S - time.monotonic()))
            yield time.monotonic()


# -- reporting ------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


# -- (a) --------------------------------------------------------------------------------


def _batching(clients: streamwise.DeploymentHandle, model: streamwise.DeploymentHandle, sizes: Sizes) -> None:
    say(
        f"(a) {CALLERS} callers, cost {FIXED_COST_S * 1e3:g} ms + {PER_ITEM_COST_S * 1e3:g} ms/item "
        f"(asyncio.sleep under a device lock), @batch(max_batch_size={MAX_BATCH_SIZE}, "
        f"batch_wait_timeout_s={BATCH_WAIT_S:g})"
    )
    for method in ("predict", "predict_batched", "noop"):  # warm up channels and queues
        clients.drive.remote(method, 0.3, CALLERS).result()
    model.batch_figures.remote().result()

    best: dict[str, tuple[float, list[float]]] = {}
    batch_s = mean_size = 0.0
    batches = 0
    in_replica: list[float] = []
    for _ in range(sizes.rounds):
        for method in ("predict", "predict_batched"):
            calls, elapsed, latencies = clients.drive.remote(method, sizes.load_s, CALLERS).result()
            figures = model.batch_figures.remote().result()
            rate = calls / elapsed
            if rate > best.get(method, (0.0, []))[0]:
                best[method] = (rate, latencies)
                if method == "predict_batched":
                    batch_s, mean_size, batches, in_replica = figures
    _, _, noop_latencies = clients.drive.remote("noop", sizes.load_s, CALLERS).result()

    plain_rate, plain_lat = best["predict"]
    batched_rate, batched_lat = best["predict_batched"]
    ratio = batched_rate / plain_rate
    say(
        f"    throughput        batched {batched_rate:8,.0f} calls/s   unbatched {plain_rate:8,.0f} calls/s   "
        f"ratio {ratio:5.2f}  (target >= {THROUGHPUT_RATIO_MIN:g})  {verdict(ratio >= THROUGHPUT_RATIO_MIN)}"
    )
    say(
        f"    latency p50/p99   batched {_ms(percentile(batched_lat, 50))} / {_ms(percentile(batched_lat, 99))}"
        f"   unbatched {_ms(percentile(plain_lat, 50))} / {_ms(percentile(plain_lat, 99))}"
    )
    bound = BATCH_WAIT_S + 2 * batch_s
    p99 = percentile(batched_lat, 99)
    say(
        f"    batched p99       {_ms(p99)}   bound {_ms(bound)} = {_ms(BATCH_WAIT_S)} wait + 2 x {_ms(batch_s)} "
        f"(median of {batches} batches, mean size {mean_size:.1f})  {verdict(p99 <= bound)}"
    )
    say(
        f"      for reference   batched p99 inside the replica (queued + batch run) "
        f"{_ms(percentile(in_replica, 99))}, p50 {_ms(percentile(in_replica, 50))}"
    )
    say(
        f"      for reference   no-op method, same {CALLERS} callers: p50 {_ms(percentile(noop_latencies, 50))}, "
        f"p99 {_ms(percentile(noop_latencies, 99))}, {len(noop_latencies) / sizes.load_s:,.0f} calls/s"
    )


# -- (b), (c), (d) --------------------------------------------------------------------


async def _count(stream: streamwise.DeploymentResponseGenerator) -> int:
    count = 0
    async with stream:
        async for _ in stream:
            count += 1
    return count


async def _streams(handle: streamwise.DeploymentHandle, address: str, sizes: Sizes) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        bare_items = channel.unary_stream(BARE_ITEMS)

        async def bare(n: int) -> int:
            count = 0
            async for _ in bare_items(n.to_bytes(8, "little")):
                count += 1
            return count

        async def rate(read, n: int) -> float:
            start = perf_counter()
            expect(await read(n), n, "items received")
            return n / (perf_counter() - start)

        # warm up all three paths
        for method in (handle.items, handle.items_one_per_frame):
            await rate(lambda k, method=method: _count(method.remote(k)), 2_000)
        await rate(bare, 2_000)

        # (b)
        n, m = sizes.stream_items, sizes.baseline_items
        default = await rate(lambda k: _count(handle.items.remote(k)), n)
        one = await rate(lambda k: _count(handle.items_one_per_frame.remote(k)), m)
        floor = await rate(bare, m)

        async def chunked(k: int) -> int:
            return sum([len(chunk) async for chunk in handle.items.remote(k).chunks()])

        chunks = await rate(chunked, n)
        ratio = default / floor
        say("(b) one stream of small items (8 bytes), read with async for")
        say(
            f"    default coalescing {default:12,.0f} items/s   ({n:,} items)\n"
            f"    max_items=1        {one:12,.0f} items/s   ({m:,} items)\n"
            f"    bare grpc.aio      {floor:12,.0f} items/s   ({m:,} items, one message per item)\n"
            f"    default / bare     ratio {ratio:7.1f}  (target >= {STREAM_RATIO_MIN:g})  "
            f"{verdict(ratio >= STREAM_RATIO_MIN)};  default / max_items=1 ratio {default / one:.1f}"
        )
        say(f"      for reference   read with chunks(): {chunks:,.0f} items/s ({n:,} items)")

        # (c)
        firsts: dict[str, list[float]] = {"default": [], "max_items=1": []}
        methods = {"default": handle.first_then_wait, "max_items=1": handle.first_then_wait_one_per_frame}
        for _ in range(sizes.first_item_calls):
            for label, method in methods.items():
                start = perf_counter()
                async with method.remote(b"x") as stream:
                    expect(await anext(stream), b"x", "first item")
                    firsts[label].append(perf_counter() - start)
        p50 = {label: percentile(samples, 50) for label, samples in firsts.items()}
        ratio = p50["default"] / p50["max_items=1"]
        say(f"(c) time to first item, p50 of {sizes.first_item_calls} alternating calls each")
        say(
            f"    default {_ms(p50['default'])}   max_items=1 {_ms(p50['max_items=1'])}   ratio {ratio:5.2f}  "
            f"(target <= {FIRST_ITEM_RATIO_MAX:g})  {verdict(ratio <= FIRST_ITEM_RATIO_MAX)}"
        )

        # (d)
        async def ticks(method) -> tuple[int, list[float]]:
            frames, latencies = 0, []
            async for chunk in method.remote(sizes.ticks).chunks():
                now = time.monotonic()
                frames += 1
                latencies.extend(now - stamp for stamp in chunk)
            expect(len(latencies), sizes.ticks, "ticks received")
            return frames, latencies

        plain_frames, plain_lat = await ticks(handle.ticks)
        held_frames, held_lat = await ticks(handle.ticks_held)
        per_frame = sizes.ticks / held_frames
        extra = max(held_lat) - max(plain_lat)
        say(f"(d) {sizes.ticks:,} items, one per {TICK_S * 1e3:g} ms, @coalesce(max_delay_s={HOLD_S:g})")
        say(
            f"    items per frame   held {per_frame:5.2f}   default {sizes.ticks / plain_frames:5.2f}   "
            f"(target held >= {ITEMS_PER_FRAME_MIN:g})  {verdict(per_frame >= ITEMS_PER_FRAME_MIN)}"
        )
        say(
            f"    latency p50/p99/max   held {_ms(percentile(held_lat, 50))} / {_ms(percentile(held_lat, 99))} / "
            f"{_ms(max(held_lat))}   default {_ms(percentile(plain_lat, 50))} / "
            f"{_ms(percentile(plain_lat, 99))} / {_ms(max(plain_lat))}"
        )
        say(
            f"    worst extra delay {_ms(extra)} over the default run's worst (target <= {_ms(HOLD_S)})  "
            f"{verdict(extra <= HOLD_S)}"
        )
        say(
            f"      for reference   p99 extra delay {_ms(percentile(held_lat, 99) - percentile(plain_lat, 99))} "
            "over the default run's p99"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--baseline-items", type=int, help="items streamed by the one-message-per-item baselines")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        asyncio.run(serve_bare(("Items",)))
        return 0

    sizes = QUICK if args.quick else FULL
    if args.baseline_items:
        sizes = dataclasses.replace(sizes, baseline_items=args.baseline_items)
    began = perf_counter()
    say(f"batching_bench: {'quick' if args.quick else 'full'} run, {psutil.cpu_count()} CPUs")
    try:
        with BareServer(__file__) as bare:
            clients = streamwise.run(Clients.bind(Model.bind()), name="batching")
            model = streamwise.DeploymentHandle("Model", "batching", Model.methods)
            _batching(clients, model, sizes)
            handle = streamwise.run(Streamer.bind(), name="streams")
            with asyncio.Runner() as runner:  # closed only after shutdown(), as in handle_bench
                try:
                    runner.run(_streams(handle, bare.address, sizes))
                finally:
                    streamwise.shutdown()
    finally:
        streamwise.shutdown()
        check_no_children()
    say(f"total {perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
