"""The gRPC ingress against a plain grpc.aio server of the same .proto, in one run.

Run from the repository root:

    python benchmarks/ingress_bench.py           # full run, both paths, about two minutes on 2 cores
    python benchmarks/ingress_bench.py --quick   # smoke run with small counts

What is measured: an external gRPC client, in its own process, calling
``swbench.Bench`` (``benchmarks/protos/bench.proto``) on one replica of a
deployment, beside the same client code calling a plain grpc.aio server (its own
process) that implements the same service directly with the same generated code.
Both paths of the streamwise ingress are measured, one after the other, each next
to the plain server in the same run:

- direct (``GrpcOptions(direct=True)``, the default): client -> the replica, which
  listens on the public port itself;
- proxy (``direct=False``): client -> the ingress in the driver (this process) ->
  the replica.

                                                    direct           proxy
    unary req/s, 1 and 32 concurrent calls          32: >= 0.9x      32: >= 0.4x plain
    server-stream items/s, 1 and 8 concurrent       >= 0.9x          >= 0.6x plain, each
      streams of small messages (one message per item)
    time to first item of a server stream, p50     <= 1.3x          <= 2x plain
      and p99 (sequential calls that take the first message and cancel)

The replica runs on uvloop (``STREAMWISE_EVENT_LOOP``, see ``streamwise._event_loop``;
the run's header says which loop); the driver and the plain server run on asyncio's
own loop, as a bare grpc.aio server does unless its author picks another.

With ``ray[serve]`` installed (and unless ``--no-ray-serve``), Ray Serve's gRPC proxy
serving the same service follows, measured with the same client in the same run,
and each direct-path figure is printed as a multiple of Ray Serve's (target: >= 4x).

Each side has its own client process (this file run with a hidden ``--client``
flag): it takes commands as JSON lines on stdin and answers with JSON lines on
stdout, so both sides get the same commands, alternately, round after round.
Throughput figures are the best of a few rounds, after a warm-up of each side; the
first-item samples of all rounds are pooled. Code for the .proto is generated with
grpc_tools.protoc into a temporary directory (on sys.path here, on PYTHONPATH for
the child processes; replicas inherit sys.path) and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
from time import perf_counter
from typing import Any

# gRPC core logs routine connection events (a GOAWAY from a replica that shuts down)
# at INFO; keep the report to errors, as streamwise does for its replicas. This must
# be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import psutil  # noqa: E402
from _common import (
    Child,
    check_no_children,
    first_item_lines,
    generated_code,
    import_generated,
    percentile,
    rate_line,
    say,
    serve_until_stdin_closes,
    verdict,
    with_pythonpath,
)

import streamwise  # noqa: E402
from streamwise import _event_loop as event_loop  # noqa: E402

UNARY_DATA = bytes(range(16))  # the data of every unary request (echoed back)
ITEM_DATA = bytes(range(8))  # the data of every stream item
CALL_TIMEOUT_S = 60.0  # per RPC, so that a stuck server fails the run instead of hanging it
CONCURRENCY = 32
STREAM_CONCURRENCY = 8



@dataclasses.dataclass(frozen=True)
class Targets:
    unary_ratio_min: float | None  # unary req/s at 32 concurrent (None: no target)
    stream_ratio_min: float | None  # items/s
    first_item_ratio_max: float | None  # time to first item p50


TARGETS = {"direct": Targets(0.9, 0.9, 1.3), "proxy": Targets(0.4, 0.6, 2.0), "ray": Targets(None, None, None)}

# The generated modules; imported by _import_generated() once they exist.
bench_pb2: Any = None
bench_pb2_grpc: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    warmup_calls: int
    unary_calls: int  # sequential
    concurrent_calls: int  # made by CONCURRENCY callers
    stream_items: int  # items of the single stream
    concurrent_stream_items: int  # items of each of STREAM_CONCURRENCY streams
    first_item_calls: int  # per round and side; pooled over rounds
    first_item_stream: int  # items the stream would have if the client did not cancel
    rounds: int  # alternating rounds; the best throughput of each side counts


FULL = Sizes(
    warmup_calls=200,
    unary_calls=2_000,
    concurrent_calls=4_000,
    stream_items=20_000,
    concurrent_stream_items=20_000,
    first_item_calls=100,
    first_item_stream=1_000,
    rounds=3,
)
QUICK = Sizes(
    warmup_calls=30,
    unary_calls=200,
    concurrent_calls=400,
    stream_items=2_000,
    concurrent_stream_items=1_000,
    first_item_calls=20,
    first_item_stream=1_000,
    rounds=1,
)


def _import_generated() -> None:
    global bench_pb2, bench_pb2_grpc
    bench_pb2, bench_pb2_grpc = import_generated()


# -- the streamwise app: one deployment serving swbench.Bench through the ingress -------
# max_ongoing_requests is raised above CONCURRENCY so that the benchmark measures the
# data path: with the default of 5, calls beyond 5 at a time would be rejected by the
# replica and retried by the router after a backoff. The class is pickled by value
# (it lives in __main__); bench_pb2 travels by reference and the replica imports it
# from the sys.path it inherits.


@streamwise.deployment(max_ongoing_requests=64)
class BenchService:
    async def Unary(self, msg):
        return bench_pb2.Msg(data=msg.data, n=msg.n + 1)

    async def Stream(self, msg):
        for i in range(msg.n):
            yield bench_pb2.Msg(data=msg.data, n=i)


# -- Ray Serve, serving the same service through its gRPC proxy (when installed) --------


def _ray_serve_app() -> Any:
    from ray import serve

    @serve.deployment(max_ongoing_requests=64)
    class RayBench:
        async def Unary(self, msg):
            import bench_pb2

            return bench_pb2.Msg(data=msg.data, n=msg.n + 1)

        async def Stream(self, msg):
            import bench_pb2

            for i in range(msg.n):
                yield bench_pb2.Msg(data=msg.data, n=i)

    return RayBench.bind()


def _start_ray_serve(generated: str) -> str | None:
    """Ray Serve's gRPC proxy serving swbench.Bench on a free port; its address
    (None when ray[serve] is not installed)."""
    try:
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions
    except ImportError:
        return None
    os.environ["PYTHONPATH"] = with_pythonpath(dict(os.environ), generated)["PYTHONPATH"]  # for Ray's workers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=["bench_pb2_grpc.add_BenchServicer_to_server"]))
    serve.run(_ray_serve_app(), name="bench", route_prefix="/bench")
    return f"127.0.0.1:{port}"


def _stop_ray_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _for_ray_serve(sizes: Sizes) -> Sizes:
    """Fewer calls and items (rates stay comparable): Ray Serve runs about a tenth as
    fast, and its calls must end within the client's timeout."""
    return dataclasses.replace(
        sizes,
        unary_calls=max(50, sizes.unary_calls // 4),
        concurrent_calls=max(100, sizes.concurrent_calls // 4),
        stream_items=max(500, sizes.stream_items // 10),
        concurrent_stream_items=max(250, sizes.concurrent_stream_items // 10),
        rounds=1,
    )


def _ray_lines(direct: dict[str, float], ray_figures: dict[str, float]) -> None:
    for label, value in direct.items():
        ratio = value / ray_figures[label]
        say(f"{label:<26}direct / Ray Serve {ratio:8.1f}x   (target >= 4)  {verdict(ratio >= 4)}")


# -- the plain grpc.aio server, run in a child process ----------------------------------


class PlainBench:
    """swbench.Bench implemented directly on grpc.aio, doing what BenchService does."""

    async def Unary(self, request, context):
        return bench_pb2.Msg(data=request.data, n=request.n + 1)

    async def Stream(self, request, context):
        for i in range(request.n):
            yield bench_pb2.Msg(data=request.data, n=i)


async def _serve_plain() -> None:
    """Serve until stdin closes; the port bound is written to stdout first."""
    _import_generated()
    server = grpc.aio.server()
    bench_pb2_grpc.add_BenchServicer_to_server(PlainBench(), server)
    await serve_until_stdin_closes(server)


# -- the client, run in a child process per side ----------------------------------------


# Every side gets the app's name, as Ray Serve requires (the others ignore or accept it).
APP = (("application", "bench"),)


class Client:
    """Calls one server with the generated stub; every command returns a JSON-able dict."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = bench_pb2_grpc.BenchStub(self.channel)

    async def connect(self) -> dict[str, Any]:
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        return {}

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self) -> None:
        reply = await self.stub.Unary(bench_pb2.Msg(data=UNARY_DATA, n=7), timeout=CALL_TIMEOUT_S, metadata=APP)
        if reply.data != UNARY_DATA or reply.n != 8:
            raise RuntimeError(f"wrong unary reply: {reply!r}")

    async def _stream(self, n: int) -> int:
        count = 0
        async for msg in self.stub.Stream(bench_pb2.Msg(data=ITEM_DATA, n=n), timeout=CALL_TIMEOUT_S, metadata=APP):
            if msg.n != count or msg.data != ITEM_DATA:
                raise RuntimeError(f"wrong stream item {count}: {msg!r}")
            count += 1
        if count != n:
            raise RuntimeError(f"stream of {n} items ended after {count}")
        return count

    async def unary(self, calls: int, concurrency: int) -> dict[str, Any]:
        """Requests per second of ``calls`` calls made by ``concurrency`` callers."""
        left = calls

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self._unary()

        start = perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(caller())
        return {"rate": calls / (perf_counter() - start)}

    async def stream(self, streams: int, items: int) -> dict[str, Any]:
        """Items per second received over ``streams`` concurrent streams of ``items`` each."""
        start = perf_counter()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._stream(items)) for _ in range(streams)]
        elapsed = perf_counter() - start
        return {"rate": sum(t.result() for t in tasks) / elapsed}

    async def first_item(self, calls: int, items: int) -> dict[str, Any]:
        """Seconds from each call to its first message; the call is then cancelled."""
        samples = []
        for _ in range(calls):
            start = perf_counter()
            call = self.stub.Stream(bench_pb2.Msg(data=ITEM_DATA, n=items), timeout=CALL_TIMEOUT_S, metadata=APP)
            msg = await call.read()
            samples.append(perf_counter() - start)
            call.cancel()
            if msg is grpc.aio.EOF or msg.n != 0:
                raise RuntimeError(f"wrong first item: {msg!r}")
        return {"samples": samples}

    async def warmup(self, calls: int, items: int) -> dict[str, Any]:
        for _ in range(calls):
            await self._unary()
        await self.unary(calls, CONCURRENCY)
        await self._stream(items)
        await self.stream(STREAM_CONCURRENCY, items // STREAM_CONCURRENCY)
        await self.first_item(calls // 10 + 1, 10)
        return {}


def _client_main(address: str) -> None:
    """Answer each JSON command line on stdin with one JSON line on stdout, until EOF."""
    _import_generated()
    async def make() -> Client:  # the channel belongs to the runner's loop
        return Client(address)

    with asyncio.Runner() as runner:
        client = runner.run(make())
        try:
            for line in sys.stdin:
                command = json.loads(line)
                op = command.pop("op")
                try:
                    result = runner.run(getattr(client, op)(**command))
                except Exception as exc:  # reported to the driver, which stops the run
                    result = {"error": f"{op}: {type(exc).__name__}: {exc}"}
                print(json.dumps(result), flush=True)
        finally:
            runner.run(client.close())


# -- measuring and reporting ------------------------------------------------------------


# The layout of this report's lines: wider labels, the baseline named once.
_PLAIN: dict[str, Any] = {
    "base_label": "plain grpc.aio", "label_width": 26, "base_label_width": 15, "base_width": 17
}


def _rate_line(label: str, sw: float, plain: float, unit: str, minimum: float | None, who: str) -> str:
    return rate_line(label, sw, plain, unit, minimum, **_PLAIN, who=who)


def _best(sw: Child, plain: Child, rounds: int, op: str, **kwargs: Any) -> tuple[float, float]:
    """Best rate of each side over ``rounds`` alternating rounds."""
    sw_best = plain_best = 0.0
    for _ in range(rounds):
        sw_best = max(sw_best, sw.ask(op, **kwargs)["rate"])
        plain_best = max(plain_best, plain.ask(op, **kwargs)["rate"])
    return sw_best, plain_best


def _measure(sw: Child, plain: Child, sizes: Sizes, targets: Targets, who: str = "streamwise") -> dict[str, float]:
    """Print each figure of ``sw`` (``who``) beside ``plain``; return ``sw``'s figures."""
    figures: dict[str, float] = {}
    for side in (sw, plain):
        side.ask("warmup", calls=sizes.warmup_calls, items=sizes.stream_items // 10)

    sw_rate, plain_rate = _best(sw, plain, sizes.rounds, "unary", calls=sizes.unary_calls, concurrency=1)
    say(_rate_line("unary 1 concurrent", sw_rate, plain_rate, "req/s", None, who))
    figures["unary 1 concurrent"] = sw_rate
    sw_rate, plain_rate = _best(
        sw, plain, sizes.rounds, "unary", calls=sizes.concurrent_calls, concurrency=CONCURRENCY
    )
    say(_rate_line(f"unary {CONCURRENCY} concurrent", sw_rate, plain_rate, "req/s", targets.unary_ratio_min, who))
    figures[f"unary {CONCURRENCY} concurrent"] = sw_rate

    stream_min = targets.stream_ratio_min
    sw_rate, plain_rate = _best(sw, plain, sizes.rounds, "stream", streams=1, items=sizes.stream_items)
    say(_rate_line(f"1 stream x {sizes.stream_items:,}", sw_rate, plain_rate, "items/s", stream_min, who))
    figures["1 stream"] = sw_rate
    n = sizes.concurrent_stream_items
    sw_rate, plain_rate = _best(sw, plain, sizes.rounds, "stream", streams=STREAM_CONCURRENCY, items=n)
    say(_rate_line(f"{STREAM_CONCURRENCY} streams x {n:,}", sw_rate, plain_rate, "items/s", stream_min, who))
    figures[f"{STREAM_CONCURRENCY} streams"] = sw_rate

    sw_samples: list[float] = []
    plain_samples: list[float] = []
    for _ in range(sizes.rounds):
        kwargs = dict(calls=sizes.first_item_calls, items=sizes.first_item_stream)
        sw_samples += sw.ask("first_item", **kwargs)["samples"]
        plain_samples += plain.ask("first_item", **kwargs)["samples"]
    for line in first_item_lines(sw_samples, plain_samples, targets.first_item_ratio_max, **_PLAIN, who=who):
        say(line)
    say(
        f"{'  for reference':<26}{len(sw_samples)} sequential calls per side, each taking the first "
        f"item of a {sizes.first_item_stream:,}-item stream, then cancelling"
    )
    figures["first item p50 (1/s)"] = 1 / percentile(sw_samples, 50)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument(
        "--path", choices=("both", "direct", "proxy"), default="both", help="ingress path(s) to measure (default: both)"
    )
    parser.add_argument("--no-ray-serve", action="store_true", help="skip Ray Serve even when it is installed")
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_server:
        asyncio.run(_serve_plain())
        return 0
    if args.client:
        _client_main(args.client)
        return 0

    sizes = QUICK if args.quick else FULL
    began = perf_counter()
    say(
        f"ingress_bench: {'quick' if args.quick else 'full'} run, {psutil.cpu_count()} CPUs, "
        f"unary data {len(UNARY_DATA)} bytes, stream items of {len(ITEM_DATA)} bytes, one message each, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    say(
        "  streamwise direct: client process -> 1 replica process (listening on the public port); "
        "proxy: client process -> ingress (driver process) -> 1 replica process; "
        "plain: client process -> grpc.aio server process"
    )
    say(
        f"  event loops: replicas {event_loop.chosen()} (STREAMWISE_EVENT_LOOP), driver and plain server "
        "asyncio's own"
    )
    paths = ("direct", "proxy") if args.path == "both" else (args.path,)
    children: list[Child] = []
    with generated_code() as generated:
        try:
            sys.path.insert(0, generated)
            _import_generated()
            env = with_pythonpath(dict(os.environ), generated)

            plain_server = Child(__file__, ["--plain-server"], env)
            children.append(plain_server)
            plain_address = f"127.0.0.1:{int(plain_server.read_line())}"

            plain = Child(__file__, ["--client", plain_address], env)
            children.append(plain)
            plain.ask("connect")
            measured: dict[str, dict[str, float]] = {}
            for path in paths:
                streamwise.run(
                    BenchService.bind(),
                    name="bench",
                    grpc_options=streamwise.GrpcOptions(
                        port=0, host="127.0.0.1", servicer_functions=[bench_pb2_grpc.add_BenchServicer_to_server],
                        direct=path == "direct",
                    ),
                )
                sw = Child(__file__, ["--client", streamwise.ingress_address()], env)
                try:
                    sw.ask("connect")
                    say(f"-- {path} path, load average {os.getloadavg()[0]:.2f}")
                    measured[path] = _measure(sw, plain, sizes, TARGETS[path])
                finally:
                    sw.stop()
                    streamwise.shutdown()
            if "direct" in measured and not args.no_ray_serve:
                ray_address = _start_ray_serve(generated)
                if ray_address is None:
                    say("-- Ray Serve: not installed (pip install 'ray[serve]' to compare with it in the same run)")
                else:
                    ray_client = Child(__file__, ["--client", ray_address], env)
                    try:
                        ray_client.ask("connect")
                        say(f"-- Ray Serve gRPC proxy, load average {os.getloadavg()[0]:.2f}")
                        ray_figures = _measure(ray_client, plain, _for_ray_serve(sizes), TARGETS["ray"], who="Ray Serve ")
                    finally:
                        ray_client.stop()
                        _stop_ray_serve()
                    _ray_lines(measured["direct"], ray_figures)
        finally:
            # Clients first (they hold channels to both servers), then the servers.
            for child in reversed(children):
                child.stop()
            streamwise.shutdown()
            check_no_children()
            if generated in sys.path:
                sys.path.remove(generated)
    say(f"total {perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
