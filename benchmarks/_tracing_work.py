"""Tracing's work per call, for tracing_bench.py: timed alone, sampled in situ, paired.

The throughput of a shared 2-core VM drifts by more than the 3% allowed at sampling
0.01 from one process to the next; the work tracing adds to a call does not. Three
measurements of it:

- ``hop_seconds``: the tracing helpers the router, the replica and the ingress run
  for one call, as the app runs them, with nothing else around them: the caller's
  route span writing the call's traceparent, the request encoded and decoded, and the
  replica's span parented from it; for the ingress, all of it inside the ingress's
  span of an RPC that came without trace context. "off" runs the same code with
  tracing off: the baseline. The process is configured as a replica, so every server
  span is written as it ends (at 1.0 the ingress's too, which the app's driver
  batches instead: one write per call more than the app does); other spans are
  batched on the running loop as in the app.
- ``paired`` (in situ, everything included): the driver and its replica serve the
  same load in turn with tracing on and paused (``spans.pause``), in the same
  processes, many times over; each pair's difference is free of the differences
  between processes, which on a shared VM are larger than the targets. Pausing keeps
  the SDK installed; the rounds of tracing_bench compare with no SDK at all.
- ``profile``: py-spy, when installed, samples the stacks of the driver and its
  replica from outside while the app serves; the samples with streamwise.tracing or
  OpenTelemetry code on their stack are counted ("off" counts the checks that find
  tracing off). Unlike the timing alone, this runs with the caches as the app leaves
  them.

Neither the timing alone nor py-spy counts what tracing costs other code (more
garbage to collect, colder caches, a changed rhythm of the event loops); ``paired``
and tracing_bench's throughput and CPU figures do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from time import perf_counter
from typing import Any

import psutil

import streamwise
from streamwise.proto import replica_pb2
from streamwise.streaming import _wire
from streamwise.tracing import setup as tracing_setup
from streamwise.tracing import spans as tracing_spans

HOP_REPS = 5  # timings per path; the median counts (the best would favour the timing with the fewest sampled calls)
PY_SPY = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
PROFILE_RATE_HZ = 250
# A sample is in tracing code when a frame of its stack is (py-spy --full-filenames).
TRACING_CODE = re.compile(r"/streamwise/tracing/|/opentelemetry/")


async def _hop_calls(n: int, ingress: bool, payload: bytes) -> None:
    def replica_attributes() -> dict[str, Any]:
        return {
            "streamwise.deployment": "Hop",
            "streamwise.replica_id": "Hop#1",
            "streamwise.method": "call",
            "streamwise.streaming": False,
            "streamwise.request_id": received.metadata.get(_wire.REQUEST_ID, ""),
        }

    def ingress_attributes() -> dict[str, Any]:
        return {"rpc.system": "grpc", "rpc.service": "swbench.Hop", "rpc.method": "Call"}

    no_rpc = contextlib.nullcontext()
    for i in range(n):
        with tracing_spans.serve("swbench.Hop/Call", {}, ingress_attributes, external=True) if ingress else no_rpc:
            request = replica_pb2.CallRequest(method="call", args=payload)
            request.metadata[_wire.REQUEST_ID] = f"{i:016x}"
            with tracing_spans.route("Hop", "call", request.metadata, tracing_spans.capture()) as route:
                route.chose("Hop#1")
                received = replica_pb2.CallRequest.FromString(request.SerializeToString())
                with tracing_spans.serve("Hop.call", received.metadata, replica_attributes):
                    pass
        if i % 32 == 31:
            await asyncio.sleep(0)  # let batched writes fall due, as between calls in the app


def hop_seconds(mode: str, traces_dir: str, calls: int, payload: bytes) -> dict[str, float]:
    """Seconds per call of the tracing helpers on the handle and ingress paths in
    ``mode`` (off, or a sampling ratio with the jsonl exporter into ``traces_dir``,
    deleted afterwards): the median of HOP_REPS timings of ``calls`` calls."""
    if mode != "off":
        config = streamwise.TracingConfig(sampling_ratio=float(mode), exporter="jsonl", jsonl_dir=traces_dir)
        tracing_setup.configure(config, "hop", replica=True)
    timings: dict[str, list[float]] = {"handle": [], "ingress": []}

    async def measure() -> None:
        for path in timings:
            await _hop_calls(calls // 10, path == "ingress", payload)  # warm-up
        for _ in range(HOP_REPS):
            for path, seconds in timings.items():
                start = perf_counter()
                await _hop_calls(calls, path == "ingress", payload)
                seconds.append((perf_counter() - start) / calls)

    try:
        asyncio.run(measure())
    finally:
        tracing_setup.shutdown()
        shutil.rmtree(traces_dir, ignore_errors=True)
    return {path: statistics.median(seconds) for path, seconds in timings.items()}


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


# A path's load: runs one measurement, returns (calls per second, calls made).
Load = Callable[[], tuple[float, int]]


def paired(
    processes: list[psutil.Process], pairs: int, pause: Callable[[bool], None], loads: dict[str, Load]
) -> dict[str, list[list[float]]]:
    """Per path, ``pairs`` of [CPU seconds per call paused, on, calls/s paused, on] of
    ``processes``: each load is measured with tracing paused (``pause(True)``) and on,
    back to back, in turn first (paused-on, then on-paused), so that a drift falls on
    both alike. Tracing is left on."""
    out: dict[str, list[list[float]]] = {path: [] for path in loads}
    try:
        for i in range(pairs):
            for path, load in loads.items():
                measured: dict[bool, tuple[float, float]] = {}
                for paused in (True, False) if i % 2 == 0 else (False, True):
                    pause(paused)
                    used = cpu_seconds(processes)
                    rate, calls = load()
                    measured[paused] = ((cpu_seconds(processes) - used) / calls, rate)
                out[path].append([measured[True][0], measured[False][0], measured[True][1], measured[False][1]])
    finally:
        pause(False)
    return out


def profile(processes: list[psutil.Process], seconds: int, out_dir: str, load: Callable[[], object]) -> list[int] | str:
    """[samples in tracing code, all samples] of ``processes`` while ``load()`` runs
    in turn for ``seconds``; CPU time only (py-spy skips idle threads). Why not, as a
    string, when py-spy is missing or cannot sample (it needs permission to read
    other processes' memory). Every py-spy started is stopped before this returns."""
    if PY_SPY is None:
        return "py-spy is not installed (pip install py-spy)"
    os.makedirs(out_dir, exist_ok=True)
    spies: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for process in processes:
            out = os.path.join(out_dir, f"{process.pid}-{len(os.listdir(out_dir))}.txt")
            args = [PY_SPY, "record", "--nonblocking", "--full-filenames", "--format", "raw"]
            args += ["--rate", str(PROFILE_RATE_HZ), "-d", str(seconds), "-p", str(process.pid), "-o", out]
            spies.append((subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
        while any(spy.poll() is None for spy, _ in spies):
            load()
    finally:
        said = []
        for spy, _ in spies:
            if spy.poll() is None:
                spy.kill()
            said.append(spy.communicate()[0])
    hits = total = 0
    for (spy, out), output in zip(spies, said):
        if spy.returncode != 0 or not os.path.exists(out):
            return f"py-spy could not sample (exit code {spy.returncode}): {output.strip()[-200:]}"
        with open(out) as lines:
            for line in lines:  # "frame;frame;... count"
                stack, _, count = line.rstrip().rpartition(" ")
                total += int(count)
                hits += int(count) if TRACING_CODE.search(stack) else 0
    if total == 0:
        return "py-spy took no sample"
    return [hits, total]
