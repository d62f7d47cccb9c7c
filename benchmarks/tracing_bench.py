"""What OpenTelemetry tracing costs on the handle and ingress paths, in one run.

Run from the repository root:

    python benchmarks/tracing_bench.py             # full run, about five minutes on 2 cores
    python benchmarks/tracing_bench.py --quick     # smoke run with small counts
    python benchmarks/tracing_bench.py --pairs 100 # and tracing on vs paused in the same processes

Three modes: tracing off (``run(..., tracing=None)``), and sampling 0.01 and 1.0, both
with the JSON-lines exporter writing every sampled span to a file in a temporary
directory (within 50 ms, in a replica before the reply): an exporter doing real
work, cheap next to a network exporter's tail. Each figure is the loss against off,
with the targets <= 3% at 0.01 and <= 15% at 1.0:

    handle unary calls/s, 32 concurrent    ``await handle.echo.remote(16 bytes)`` from the driver
    handle stream items/s, one stream      of 200k 8-byte items; tracing costs per call, not per
                                             item, so expect ~no loss
    ingress unary req/s, 32 concurrent     an external client process (ingress_bench.py's, with
                                             benchmarks/protos/bench.proto) -> ingress -> replica

For reference, the CPU time per unary call of the driver and its replica (not the
ingress client): on a CPU-bound server, the loss is 1 - (CPU off / CPU with tracing).
It is less disturbed than wall time, though it still differs by 10-20% from one
process to the next on a shared VM, which cannot resolve 3% in throughput either. So
the work tracing adds is measured three more ways, each judged as the loss of a
CPU-bound server (see _tracing_work.py): timed alone (a process per mode and round,
hidden ``--task hop``, added to the CPU per call off of the same round); sampled by
py-spy in situ (``pip install py-spy``; it needs permission to read other processes'
memory); and, with ``--pairs``, tracing on vs paused in the same processes. From the
spans read back at 1.0: how many each call wrote (a stream of 200k items must write
as many as a unary call). The traces directory is deleted afterwards.

A process sets its global tracer provider once, so each mode runs in a driver
process of its own (this file with a hidden ``--mode``), which starts the app (one
replica), warms up, measures each figure a few times, shuts down, reads back the
spans and prints one JSON line (the best of its measurements of each figure). The
modes run in rounds, forwards and backwards in turn, and each is compared with off
of its own round; the figure is the median of the rounds' losses, printed with
their range, which keeps the drift of a shared machine and the odd outlier out of
it; the load average is printed at start and end. ``STREAMWISE_TRACING*`` variables
are removed from the drivers' environment, so that off is off. The .proto's code is
generated (grpc_tools.protoc) into a temporary directory, on the children's
PYTHONPATH, and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from time import perf_counter
from typing import Any

# gRPC core logs routine connection events (a GOAWAY from a replica that shuts down)
# at INFO; keep the report to errors, as streamwise does for its replicas. This must
# be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import psutil
from _common import (
    Child,
    call_rate,
    check_no_children,
    expect,
    generated_code,
    import_generated,
    say,
    with_pythonpath,
)
from _tracing_report import LOSS_MAX_PERCENT, MODES, paired_line, profile_line, progress, report, span_stats
from _tracing_work import cpu_seconds, hop_seconds, paired, profile

import streamwise
from streamwise.tracing import spans as tracing_spans

PAYLOAD = bytes(range(16))  # the argument and result of every unary handle call, as in handle_bench
CONCURRENCY = 32  # as in handle_bench and ingress_bench
# ingress_bench.py --client ADDRESS: its external client process, driven by JSON lines.
INGRESS_BENCH = str(pathlib.Path(__file__).resolve().with_name("ingress_bench.py"))
DRIVER_TIMEOUT_S = 180.0  # one driver run; a stuck run fails the benchmark instead of hanging it
PAIR_TIMEOUT_S = 20.0  # and this more per pair of --task paired
RESULT_PREFIX = "RESULT "

# The generated modules; imported by _import_generated() once they exist.
bench_pb2: Any = None
bench_pb2_grpc: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    rounds: int  # interleaved rounds of the three modes, one driver process each
    reps: int  # measurements of each figure within one driver run; the best counts
    warmup_calls: int
    handle_calls: int  # unary handle calls per measurement, made by CONCURRENCY callers
    stream_items: int  # items of the measured stream
    ingress_calls: int  # unary ingress calls per measurement, made by CONCURRENCY callers
    hop_calls: int  # calls per timing of the tracing helpers alone (_tracing_work.hop_seconds)
    profile_s: int  # seconds of py-spy sampling per path and mode (_tracing_work.profile)


FULL = Sizes(
    rounds=10, reps=2, warmup_calls=300, handle_calls=4_000, stream_items=200_000, ingress_calls=2_500,
    hop_calls=5_000, profile_s=10,
)  # fmt: skip
QUICK = Sizes(
    rounds=1, reps=1, warmup_calls=30, handle_calls=200, stream_items=10_000, ingress_calls=200,
    hop_calls=200, profile_s=2,
)  # fmt: skip
WARMUP_STREAM_ITEMS = 1_000


def _import_generated() -> None:
    global bench_pb2, bench_pb2_grpc
    bench_pb2, bench_pb2_grpc = import_generated()


# -- the app: one deployment, called through handles and served through the ingress ----
# max_ongoing_requests is raised above CONCURRENCY so that the benchmark measures the
# data path, not the router's retries (see handle_bench). The class lives in __main__
# of the driver, so it is pickled by value; bench_pb2 travels by reference and the
# replica imports it from the sys.path it inherits.


@streamwise.deployment(max_ongoing_requests=64)
class Bench:
    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def items(self, n: int):
        for i in range(n):
            yield i.to_bytes(8, "little")  # distinct, so pickle cannot memoize them

    async def Unary(self, msg):  # swbench.Bench/Unary, as ingress_bench's BenchService
        return bench_pb2.Msg(data=msg.data, n=msg.n + 1)

    def pause_tracing(self, paused: bool) -> None:  # for --task paired, in the replica's process
        tracing_spans.pause(paused)


# -- the driver: one tracing mode, in its own process -----------------------------------


@dataclasses.dataclass
class Counts:
    """Calls made by one driver run, to relate the spans written to them."""

    echo: int = 0
    items: int = 0
    streams: list[int] = dataclasses.field(default_factory=list)  # items asked of each stream
    Unary: int = 0

    def calls(self) -> dict[str, int]:
        return {"echo": self.echo, "items": self.items, "Unary": self.Unary}


async def _stream(handle: streamwise.DeploymentHandle, n: int, counts: Counts) -> float:
    """Items per second of one stream of ``n`` items, from the call to its last item."""
    got = 0
    start = perf_counter()
    async with handle.items.remote(n) as stream:
        async for _ in stream:
            got += 1
    rate = got / (perf_counter() - start)
    counts.items += 1
    counts.streams.append(n)
    expect(got, n, "stream items")
    return rate


async def _unary_rate(handle: streamwise.DeploymentHandle, n: int, concurrency: int, counts: Counts) -> float:
    async def call() -> object:
        return await handle.echo.remote(PAYLOAD)

    rate = await call_rate(call, n, concurrency)
    counts.echo += n
    return rate


async def _warm_handle(handle: streamwise.DeploymentHandle, sizes: Sizes, counts: Counts) -> None:
    for _ in range(sizes.warmup_calls):
        expect(await handle.echo.remote(PAYLOAD), PAYLOAD, "echo")
    counts.echo += sizes.warmup_calls
    await _unary_rate(handle, sizes.warmup_calls, CONCURRENCY, counts)
    await _stream(handle, WARMUP_STREAM_ITEMS, counts)


def _drive(mode: str, traces_dir: str, sizes: Sizes, task: str = "measure", pairs: int = 0) -> dict[str, Any]:
    """Start the app in ``mode``, measure (task "profile": sample it with py-spy;
    "paired": ``pairs`` pairs of tracing on and paused instead), shut down; the
    results as a JSON-able dict."""
    load = os.getloadavg()[0]
    began = perf_counter()
    _import_generated()
    tracing = None
    if mode != "off":
        tracing = streamwise.TracingConfig(sampling_ratio=float(mode), exporter="jsonl", jsonl_dir=traces_dir)
    counts = Counts()
    best = {"handle_unary": 0.0, "stream": 0.0, "ingress_unary": 0.0}
    # CPU seconds per call of this process and its replica (not the ingress client),
    # one sample per measurement: what tracing costs, without the scheduling noise of
    # a throughput on a shared machine.
    cpu: dict[str, list[float]] = {"handle_unary": [], "ingress_unary": []}
    shares: dict[str, list[int] | str] = {}  # sampled: [in tracing code, all], or why not
    in_pairs: dict[str, list[list[float]]] = {}
    client: Child | None = None
    try:
        handle = streamwise.run(
            Bench.bind(),
            name="bench",
            grpc_options=streamwise.GrpcOptions(
                port=0, host="127.0.0.1", servicer_functions=[bench_pb2_grpc.add_BenchServicer_to_server]
            ),
            tracing=tracing,
        )
        client = Child(INGRESS_BENCH, ["--client", streamwise.ingress_address()], dict(os.environ))
        client.ask("connect")
        # What asyncio.run() does, except that the loop is closed only after
        # shutdown() (see handle_bench). The ingress client's commands block this
        # thread while the ingress serves them on streamwise's own loop.
        with asyncio.Runner() as runner:
            try:
                runner.run(_warm_handle(handle, sizes, counts))
                client.ask("unary", calls=sizes.warmup_calls, concurrency=1)
                client.ask("unary", calls=sizes.warmup_calls, concurrency=CONCURRENCY)
                counts.Unary += 2 * sizes.warmup_calls
                servers = _server_processes(client)
                if task == "paired":

                    def pause(paused: bool) -> None:
                        tracing_spans.pause(paused)  # the driver: the caller's routes, the ingress
                        handle.pause_tracing.remote(paused).result(timeout_s=30)
                        runner.run(_unary_rate(handle, 2 * CONCURRENCY, CONCURRENCY, counts))  # settle, unmeasured

                    def handle_load() -> tuple[float, int]:
                        return runner.run(_unary_rate(handle, sizes.handle_calls, CONCURRENCY, counts)), sizes.handle_calls

                    def ingress_load() -> tuple[float, int]:
                        rate = client.ask("unary", calls=sizes.ingress_calls, concurrency=CONCURRENCY)["rate"]
                        return rate, sizes.ingress_calls

                    in_pairs = paired(servers, pairs, pause, {"handle": handle_load, "ingress": ingress_load})
                if task == "profile":
                    samples_dir = os.path.join(traces_dir, "py-spy")
                    shares["handle"] = profile(
                        servers, sizes.profile_s, samples_dir,
                        lambda: runner.run(_unary_rate(handle, 500, CONCURRENCY, counts)),
                    )  # fmt: skip
                    shares["ingress"] = profile(
                        servers, sizes.profile_s, samples_dir,
                        lambda: client.ask("unary", calls=300, concurrency=CONCURRENCY),
                    )  # fmt: skip
                for _ in range(sizes.reps if task == "measure" else 0):
                    used = cpu_seconds(servers)
                    rate = runner.run(_unary_rate(handle, sizes.handle_calls, CONCURRENCY, counts))
                    cpu["handle_unary"].append((cpu_seconds(servers) - used) / sizes.handle_calls)
                    best["handle_unary"] = max(best["handle_unary"], rate)
                    rate = runner.run(_stream(handle, sizes.stream_items, counts))
                    best["stream"] = max(best["stream"], rate)
                    used = cpu_seconds(servers)
                    rate = client.ask("unary", calls=sizes.ingress_calls, concurrency=CONCURRENCY)["rate"]
                    cpu["ingress_unary"].append((cpu_seconds(servers) - used) / sizes.ingress_calls)
                    counts.Unary += sizes.ingress_calls
                    best["ingress_unary"] = max(best["ingress_unary"], rate)
            finally:
                client.stop()
                streamwise.shutdown()  # flushes the spans of every process
    finally:
        if client is not None:
            client.stop()
        streamwise.shutdown()
        check_no_children()
    spans = span_stats(traces_dir, counts.calls(), counts.streams) if task == "measure" else {}  # paired: too many to read back
    shutil.rmtree(traces_dir, ignore_errors=True)  # keep the disk use of a run to one driver's
    return {
        "mode": mode, "load": load, "seconds": perf_counter() - began, **best, "cpu": cpu, "trace": spans,
        "profile": shares, "paired": in_pairs,
    }  # fmt: skip


def _server_processes(client: Child) -> list[psutil.Process]:
    """This process and its replicas: everything but the ingress client."""
    me = psutil.Process()
    return [me, *(p for p in me.children(recursive=True) if p.pid != client.process.pid)]


# -- the orchestrator: rounds of driver processes -----------------------------------------


def _stop_driver(process: subprocess.Popen[str], descendants: list[psutil.Process]) -> None:
    """Wait for a driver to finish its cleanup, kill it if it lingers, then its leftovers."""
    if process.poll() is None:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    check_no_children(descendants)  # its replicas and client, in case it died without stopping them


def _run_driver(
    mode: str, traces_root: str, index: int, env: dict[str, str], quick: bool, task: str = "measure", pairs: int = 0
) -> dict[str, Any]:
    """One driver process in ``mode`` doing ``task`` (measure, hop, profile or paired); its JSON result."""
    traces_dir = os.path.join(traces_root, f"{index:02d}-{mode}-{task}")
    args = [sys.executable, __file__, "--mode", mode, "--traces-dir", traces_dir, "--task", task, "--pairs", str(pairs)]
    args += ["--quick"] if quick else []
    timeout_s = DRIVER_TIMEOUT_S + pairs * PAIR_TIMEOUT_S
    process = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
    descendants: list[psutil.Process] = []
    try:
        try:
            out, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Interrupt it: KeyboardInterrupt runs its cleanup (clients, shutdown()).
            process.send_signal(signal.SIGINT)
            raise RuntimeError(f"driver --mode {mode} --task {task} did not finish within {timeout_s:g} s") from None
        results = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
        if process.returncode != 0 or not results:
            raise RuntimeError(f"driver --mode {mode} --task {task} failed (exit code {process.returncode})")
        return json.loads(results[-1][len(RESULT_PREFIX):])
    finally:
        # On an error or Ctrl-C here (which the driver gets too), note what the driver
        # started while it still runs, so that nothing it leaves behind survives.
        if process.poll() is None:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(process.pid).children(recursive=True)
        _stop_driver(process, descendants)


def _orchestrate(quick: bool, pairs: int) -> None:
    sizes = QUICK if quick else FULL
    began = perf_counter()
    say(
        f"tracing_bench: {'quick' if quick else 'full'} run, {psutil.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start; modes off / sampling_ratio 0.01 / 1.0, "
        f"interleaved over {sizes.rounds} round(s), one driver process (app with 1 replica) each"
    )
    say(
        "  exporter: TracingConfig(exporter='jsonl') into a temporary directory, every sampled span "
        "written to a file (driver and replica) within 50 ms; deleted afterwards"
    )
    say(
        f"  handle: {CONCURRENCY} concurrent `await handle.echo.remote(16 bytes)` and one stream of "
        f"{sizes.stream_items:,} 8-byte items, from the driver; ingress: external client process "
        f"(ingress_bench.py --client) -> ingress (driver) -> replica, {CONCURRENCY} concurrent unary"
    )
    traces_root = tempfile.mkdtemp(prefix="streamwise-bench-traces-")
    try:
        with generated_code() as generated:
            env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMWISE_TRACING")}
            with_pythonpath(env, generated)
            runs: list[dict[str, Any]] = []
            for round_no in range(1, sizes.rounds + 1):
                for mode in MODES if round_no % 2 else MODES[::-1]:
                    result = _run_driver(mode, traces_root, len(runs), env, quick)
                    result["hop"] = _run_driver(mode, traces_root, len(runs), env, quick, "hop")["hop"]
                    result["round"] = round_no
                    runs.append(result)
                    say(progress(round_no, sizes.rounds, result))
            report(runs, reps=sizes.reps, stream_items=sizes.stream_items, concurrency=CONCURRENCY)
            profiles = {mode: _run_driver(mode, traces_root, len(runs), env, quick, "profile") for mode in MODES}
            for path in ("handle", "ingress"):
                say(profile_line(path, {mode: r["profile"][path] for mode, r in profiles.items()}))
            for mode in MODES[1:] if pairs else ():
                rows = _run_driver(mode, traces_root, len(runs), env, quick, "paired", pairs)["paired"]
                for path in ("handle", "ingress"):
                    label = f"paired, {path} unary"
                    say(paired_line(label, mode, rows[path], LOSS_MAX_PERCENT[mode]))
    finally:
        check_no_children()
        shutil.rmtree(traces_root, ignore_errors=True)
    say(f"load average {os.getloadavg()[0]:.2f} at end; total {perf_counter() - began:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--traces-dir", help=argparse.SUPPRESS)
    parser.add_argument(
        "--pairs", type=int, default=0, metavar="N",
        help="also measure N pairs of tracing on and paused in the same processes, per sampling ratio "
        "(0: skip; 100 pairs take about 8 minutes per ratio on 2 cores)",
    )  # fmt: skip
    parser.add_argument("--task", choices=("measure", "hop", "profile", "paired"), default="measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs < 0 or args.pairs % 2:
        parser.error("--pairs must be an even number >= 0 (half of the pairs measure tracing paused first)")
    if args.mode:
        if not args.traces_dir:
            parser.error("--mode needs --traces-dir")
        sizes = QUICK if args.quick else FULL
        if args.task == "hop":
            result = {"mode": args.mode, "hop": hop_seconds(args.mode, args.traces_dir, sizes.hop_calls, PAYLOAD)}
        else:
            result = _drive(args.mode, args.traces_dir, sizes, args.task, args.pairs)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    _orchestrate(args.quick, args.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
