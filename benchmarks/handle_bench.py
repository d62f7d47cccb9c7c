"""Handle calls against bare grpc.aio, measured side by side in one run.

Run from the repository root:

    python benchmarks/handle_bench.py           # full run, about a minute on 2 cores
    python benchmarks/handle_bench.py --quick   # smoke run with small counts

Every streamwise figure is printed beside the same measurement against a bare
grpc.aio server in its own process (generic handlers on raw bytes, no generated
code), with the same payloads, and judged as a ratio against it:

    unary calls/s, sequential and 32 concurrent   >= 0.6x bare unary calls/s
      (from a loop beside streamwise's core thread after run(), and again from the
      loop that runs streamwise itself with open_app())
    items/s of one stream of 200k 8-byte items    >= 3x bare, one message per item
    time to first item of a stream, p50           <= 1.5x bare unary latency p50
    run() to ready of a 2-deployment app          <= 1.5 s (median of 3)
    RSS of each replica process after the traffic <= 80 MB (1 MB = 10**6 bytes)

Calls come from async code on one event loop in this process (the driver); the
streamwise replicas and the bare server each run in their own process. Throughput
figures are the best of a few alternating rounds, after a warm-up of each side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
from collections.abc import Awaitable, Callable
from time import perf_counter

# gRPC core logs routine connection events (a GOAWAY from a replica that shuts down)
# at INFO; keep the report to errors, as streamwise does for its replicas. This must
# be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import psutil  # noqa: E402
from _common import (
    BARE_ECHO,
    BARE_ITEMS,
    BareServer,
    call_rate,
    check_no_children,
    expect,
    first_item_lines,
    percentile,
    rate_line,
    say,
    serve_bare,
    verdict,
)

import streamwise  # noqa: E402
from streamwise import _event_loop as event_loop  # noqa: E402

PAYLOAD = bytes(range(16))  # the argument and result of every unary call, both sides
CONCURRENCY = 32
MB = 10**6

UNARY_RATIO_MIN = 0.6
STREAM_RATIO_MIN = 3.0
FIRST_ITEM_RATIO_MAX = 1.5
RUN_TO_READY_MAX_S = 1.5
REPLICA_RSS_MAX_MB = 80.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    warmup_calls: int
    unary_calls: int
    concurrent_calls: int
    rounds: int  # alternating rounds of each unary measurement; the best one counts
    stream_items: int
    first_item_calls: int
    run_repeats: int


FULL = Sizes(
    warmup_calls=300,
    unary_calls=2_000,
    concurrent_calls=4_000,
    rounds=3,
    stream_items=200_000,
    first_item_calls=200,
    run_repeats=3,
)
QUICK = Sizes(
    warmup_calls=50,
    unary_calls=200,
    concurrent_calls=400,
    rounds=1,
    stream_items=10_000,
    first_item_calls=30,
    run_repeats=2,
)


def _item(i: int) -> bytes:
    """The i-th stream item: 8 distinct bytes (distinct, so pickle cannot memoize them)."""
    return i.to_bytes(8, "little")


# -- the streamwise app: a front deployment holding a handle to a back one -----------
# max_ongoing_requests is raised above CONCURRENCY so that the benchmark measures the
# data path: with the default of 5, calls beyond 5 at a time would be rejected by the
# replica and retried by the router after a backoff.


@streamwise.deployment(max_ongoing_requests=64)
class Backend:
    async def echo(self, payload: bytes) -> bytes:
        return payload


@streamwise.deployment(max_ongoing_requests=64)
class Frontend:
    def __init__(self, backend: streamwise.DeploymentHandle) -> None:
        self._backend = backend

    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def echo_via_backend(self, payload: bytes) -> bytes:
        return await self._backend.echo.remote(payload)

    async def items(self, n: int):
        for i in range(n):
            yield _item(i)

    async def first_then_wait(self, payload: bytes):
        """One item, then nothing until the caller goes away (like a slow token stream)."""
        yield payload
        await asyncio.sleep(3600)
        yield payload


def _app() -> streamwise.Application:
    return Frontend.bind(Backend.bind())


# -- measuring ------------------------------------------------------------------------

Call = Callable[[], Awaitable[object]]


async def _best_rates(sw: Call, bare: Call, n: int, concurrency: int, rounds: int) -> tuple[float, float]:
    """Best calls/s of each side over ``rounds`` alternating rounds."""
    sw_best = bare_best = 0.0
    for _ in range(rounds):
        sw_best = max(sw_best, await call_rate(sw, n, concurrency))
        bare_best = max(bare_best, await call_rate(bare, n, concurrency))
    return sw_best, bare_best


def _rate_line(label: str, sw: float, bare: float, unit: str, minimum: float) -> str:
    return rate_line(label, sw, bare, unit, minimum, base_label="bare grpc.aio")


def _info(label: str, text: str) -> str:
    return f"{label:<22}{text}"


async def _traffic(handle: streamwise.DeploymentHandle, address: str, sizes: Sizes) -> None:
    """Figures (a), (b) and (c): the same traffic through streamwise and bare grpc.aio."""
    async with grpc.aio.insecure_channel(address) as channel:
        bare_echo = channel.unary_unary(BARE_ECHO)
        bare_items = channel.unary_stream(BARE_ITEMS)

        async def sw_unary() -> object:
            return await handle.echo.remote(PAYLOAD)

        async def bare_unary() -> object:
            return await bare_echo(PAYLOAD)

        async def sw_stream(n: int) -> int:
            count = 0
            async with handle.items.remote(n) as stream:
                async for _ in stream:
                    count += 1
            return count

        async def bare_stream(n: int) -> int:
            count = 0
            async for _ in bare_items(n.to_bytes(8, "little")):
                count += 1
            return count

        # Warm up both sides (channels, routers, the replica's handle to Backend)
        # and check that both sides really echo the payload.
        for _ in range(sizes.warmup_calls):
            expect(await sw_unary(), PAYLOAD, "streamwise echo")
            expect(await bare_unary(), PAYLOAD, "bare echo")
        expect(await handle.echo_via_backend.remote(PAYLOAD), PAYLOAD, "streamwise echo via Backend")
        await call_rate(sw_unary, sizes.warmup_calls, CONCURRENCY)
        await call_rate(bare_unary, sizes.warmup_calls, CONCURRENCY)
        expect(await sw_stream(1_000), 1_000, "streamwise stream items")
        expect(await bare_stream(1_000), 1_000, "bare stream items")

        # (a) unary calls/s
        sw, bare = await _best_rates(sw_unary, bare_unary, sizes.unary_calls, 1, sizes.rounds)
        say(_rate_line("unary sequential", sw, bare, "calls/s", UNARY_RATIO_MIN))
        sw, bare = await _best_rates(sw_unary, bare_unary, sizes.concurrent_calls, CONCURRENCY, sizes.rounds)
        say(_rate_line(f"unary {CONCURRENCY} concurrent", sw, bare, "calls/s", UNARY_RATIO_MIN))

        # (b) items/s of one long stream
        n = sizes.stream_items
        start = perf_counter()
        got = await sw_stream(n)
        sw = got / (perf_counter() - start)
        expect(got, n, "streamwise stream items")
        start = perf_counter()
        got = await bare_stream(n)
        bare = got / (perf_counter() - start)
        expect(got, n, "bare stream items")
        say(_rate_line(f"stream {n:,} items", sw, bare, "items/s", STREAM_RATIO_MIN))

        # (c) time to first item of a stream vs bare unary latency, calls alternating
        first_item: list[float] = []
        bare_latency: list[float] = []
        sw_latency: list[float] = []
        for _ in range(sizes.first_item_calls):
            start = perf_counter()
            async with handle.first_then_wait.remote(PAYLOAD) as stream:
                item = await anext(stream)
                first_item.append(perf_counter() - start)
            expect(item, PAYLOAD, "streamwise first item")
            start = perf_counter()
            await bare_unary()
            bare_latency.append(perf_counter() - start)
            start = perf_counter()
            await sw_unary()
            sw_latency.append(perf_counter() - start)
        for line in first_item_lines(
            first_item, bare_latency, FIRST_ITEM_RATIO_MAX, base_label="bare grpc.aio unary p{q}"
        ):
            say(line)
        say(
            _info(
                "  for reference",
                f"streamwise unary p50 {percentile(sw_latency, 50) * 1e3:.2f} ms, "
                f"p99 {percentile(sw_latency, 99) * 1e3:.2f} ms ({sizes.first_item_calls} calls)",
            )
        )


def _run_to_ready(repeats: int) -> None:
    """Figure (d): run() of the 2-deployment app until ready, then shutdown()."""
    ready: list[float] = []
    stopped: list[float] = []
    for _ in range(repeats):
        start = perf_counter()
        handle = streamwise.run(_app(), name="startup")
        ready.append(perf_counter() - start)
        try:
            expect(handle.echo_via_backend.remote(PAYLOAD).result(30), PAYLOAD, "echo via Backend")
        finally:
            start = perf_counter()
            streamwise.shutdown()
            stopped.append(perf_counter() - start)
    median = statistics.median(ready)
    say(
        f"{'run() to ready':<22}median {median:.2f} s   min {min(ready):.2f} s   "
        f"({repeats} runs of a 2-deployment app)  (target <= {RUN_TO_READY_MAX_S:g} s)  "
        f"{verdict(median <= RUN_TO_READY_MAX_S)}"
    )
    say(_info("  for reference", f"shutdown() median {statistics.median(stopped):.2f} s"))


def _replica_rss(bare_pid: int) -> None:
    """Figure (e): RSS of every replica process (children of this driver)."""
    found = 0
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
            rss_mb = child.memory_info().rss / MB
        except psutil.NoSuchProcess:
            continue
        if "streamwise.actors.replica" not in cmdline:
            continue
        replica_id = cmdline[cmdline.index("--replica-id") + 1]
        found += 1
        say(
            f"{f'RSS {replica_id}':<22}{rss_mb:6.1f} MB   (target <= {REPLICA_RSS_MAX_MB:g} MB)  "
            f"{verdict(rss_mb <= REPLICA_RSS_MAX_MB)}"
        )
    if not found:
        say(f"{'RSS':<22}no replica process found  MISS")
    bare_mb = psutil.Process(bare_pid).memory_info().rss / MB
    say(
        _info("  for reference", f"bare server process {bare_mb:.1f} MB (it imports this file, so streamwise too)")
    )


async def _unary_on_own_loop(address: str, sizes: Sizes) -> None:
    """Figure (a) again, with streamwise running on the calling loop (open_app)."""
    async with grpc.aio.insecure_channel(address) as channel, streamwise.open_app(_app(), name="bench") as handle:
        bare_echo = channel.unary_unary(BARE_ECHO)

        async def sw_unary() -> object:
            return await handle.echo.remote(PAYLOAD)

        async def bare_unary() -> object:
            return await bare_echo(PAYLOAD)

        for _ in range(sizes.warmup_calls):
            expect(await sw_unary(), PAYLOAD, "streamwise echo")
            expect(await bare_unary(), PAYLOAD, "bare echo")
        sw, bare = await _best_rates(sw_unary, bare_unary, sizes.unary_calls, 1, sizes.rounds)
        say(_rate_line("unary seq, open_app", sw, bare, "calls/s", UNARY_RATIO_MIN))
        sw, bare = await _best_rates(sw_unary, bare_unary, sizes.concurrent_calls, CONCURRENCY, sizes.rounds)
        say(_rate_line(f"unary {CONCURRENCY}, open_app", sw, bare, "calls/s", UNARY_RATIO_MIN))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        asyncio.run(serve_bare())
        return 0

    sizes = QUICK if args.quick else FULL
    began = perf_counter()
    say(
        f"handle_bench: {'quick' if args.quick else 'full'} run, {psutil.cpu_count()} CPUs, "
        f"payload {len(PAYLOAD)} bytes, stream items 8 bytes, replicas on {event_loop.chosen()} "
        "(STREAMWISE_EVENT_LOOP), driver and bare server on asyncio's loop"
    )
    try:
        with BareServer(__file__) as bare:
            _run_to_ready(sizes.run_repeats)
            handle = streamwise.run(_app(), name="bench")
            # What asyncio.run() does, except that the loop is closed only after
            # shutdown(): grpc.aio can still deliver completions of this loop's
            # cancelled calls (closed streams, the router's replica-set watch) until
            # then, and into a closed loop it logs "Event loop is closed" tracebacks.
            with asyncio.Runner() as runner:
                try:
                    runner.run(_traffic(handle, bare.address, sizes))
                    _replica_rss(bare.pid)
                finally:
                    streamwise.shutdown()
            say(_info("open_app", "the same app run on the benchmark's own event loop: no hop to a core thread"))
            asyncio.run(_unary_on_own_loop(bare.address, sizes))
    finally:
        streamwise.shutdown()
        check_no_children()
    say(f"total {perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
