"""How an autoscaled deployment follows a step load, next to a fixed one sized for the peak.

Load: closed-loop callers of a method that takes 20 ms, 1 caller, then 64, then 1
again. The autoscaled deployment starts at 1 replica (target 8 calls per replica, so
the peak wants 8); the fixed one runs 8 replicas throughout. Printed, for each:
time from the step up until 8 replicas run, p50/p99 latency while ramping (the same
number of seconds after the step for the fixed one) and over the whole peak, time
from the step down until 1 replica is left, and calls failed (target: 0).

    python benchmarks/autoscaling_bench.py [--peak-s 12] [--quiet-s 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from _common import check_no_children, percentile, say

import streamwise
from streamwise.actors.management import running_drivers
from streamwise.proto import management_pb2, management_pb2_grpc

WORK_S = 0.02
PEAK_CALLERS = 64
PEAK_REPLICAS = 8
AUTOSCALING = streamwise.AutoscalingConfig(
    min_replicas=1,
    max_replicas=PEAK_REPLICAS,
    target_ongoing_requests=PEAK_CALLERS / PEAK_REPLICAS,
    metrics_interval_s=0.25,
    look_back_period_s=2.0,
    upscale_delay_s=1.0,
    downscale_delay_s=3.0,
)


class Model:
    async def work(self) -> None:
        await asyncio.sleep(WORK_S)


def _app(autoscaled: bool) -> streamwise.Application:
    options = dict(autoscaling_config=AUTOSCALING) if autoscaled else dict(num_replicas=PEAK_REPLICAS)
    return streamwise.deployment(Model, name="Model", max_ongoing_requests=16, **options).bind()


class Load:
    """Closed-loop callers; each call's (start time, latency), and the failures."""

    def __init__(self, handle: streamwise.DeploymentHandle) -> None:
        self.handle = handle
        self.samples: list[tuple[float, float]] = []
        self.failed = 0
        self.stops: list[asyncio.Event] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def _caller(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                await self.handle.work.remote()
            except streamwise.exceptions.StreamwiseError:
                self.failed += 1
            self.samples.append((start, time.perf_counter() - start))

    def set_callers(self, n: int) -> None:
        while len(self.tasks) < n:
            stop = asyncio.Event()
            self.stops.append(stop)
            self.tasks.append(asyncio.get_running_loop().create_task(self._caller(stop)))
        while len(self.tasks) > n:
            self.stops.pop().set()
            self.tasks.pop()

    async def stop(self) -> None:
        for stop in self.stops:
            stop.set()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()

    def latencies(self, since: float, until: float) -> list[float]:
        return [latency for start, latency in self.samples if since <= start < until]


async def _running(stub: management_pb2_grpc.ManagementStub, metadata) -> tuple[int, int]:
    app = await stub.DescribeApplication(management_pb2.DescribeApplicationRequest(application="bench"), metadata=metadata)
    (dep,) = app.deployments
    return dep.running_replicas, len(dep.replicas)


async def _until(stub, metadata, test, limit_s: float) -> float | None:
    """Seconds until test(running, present) holds, polled every 50 ms; None past limit_s."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if test(*await _running(stub, metadata)):
            return time.perf_counter() - start
        await asyncio.sleep(0.05)
    return None


async def _scenario(autoscaled: bool, peak_s: float, quiet_s: float) -> dict[str, object]:
    async with streamwise.open_app(_app(autoscaled), name="bench") as handle:
        (driver,) = [d for d in running_drivers() if d.pid == os.getpid()]
        async with grpc.aio.insecure_channel(driver.target) as channel:
            stub = management_pb2_grpc.ManagementStub(channel)
            metadata = driver.metadata()
            load = Load(handle)
            load.set_callers(1)
            await asyncio.sleep(2.0)
            step_up = time.perf_counter()
            load.set_callers(PEAK_CALLERS)
            reached = await _until(stub, metadata, lambda running, _: running >= PEAK_REPLICAS, peak_s)
            left = peak_s - (time.perf_counter() - step_up)
            if left > 0:
                await asyncio.sleep(left)
            step_down = time.perf_counter()
            load.set_callers(1)
            back = await _until(stub, metadata, lambda running, present: running == present == 1, quiet_s)
            if back is None or not autoscaled:
                await asyncio.sleep(max(0.0, quiet_s - (time.perf_counter() - step_down)))
            await load.stop()
    return {
        "reached": reached,
        "load": load,
        "step_up": step_up,
        "step_down": step_down,
        "back": back,
        "failed": load.failed,
        "calls": len(load.samples),
    }


def _ms(samples: list[float], q: float) -> str:
    return f"{percentile(samples, q) * 1000:7.1f} ms" if samples else "      - ms"


def _seconds(value: float | None, limit: float) -> str:
    return f"{value:6.2f} s" if value is not None else f" >{limit:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-s", type=float, default=12.0, help="seconds at the peak load")
    parser.add_argument("--quiet-s", type=float, default=8.0, help="seconds at 1 caller after the peak")
    args = parser.parse_args()
    say(f"step load: 1 -> {PEAK_CALLERS} -> 1 callers of a {WORK_S * 1000:.0f} ms method; "
        f"autoscaled 1..{PEAK_REPLICAS} replicas (target {AUTOSCALING.target_ongoing_requests:g}, "
        f"upscale delay {AUTOSCALING.upscale_delay_s:g} s, downscale delay {AUTOSCALING.downscale_delay_s:g} s) "
        f"vs fixed {PEAK_REPLICAS}")
    results = {}
    for autoscaled in (True, False):
        results[autoscaled] = asyncio.run(_scenario(autoscaled, args.peak_s, args.quiet_s))
    check_no_children()
    auto, fixed = results[True], results[False]
    ramp_s = auto["reached"] if auto["reached"] is not None else args.peak_s
    for result in (auto, fixed):  # the same window after the step for both
        load, up = result["load"], result["step_up"]
        result["ramp"] = load.latencies(up, up + ramp_s)
        result["peak"] = load.latencies(up, result["step_down"])
    say(f"time to {PEAK_REPLICAS} replicas      autoscaled {_seconds(auto['reached'], args.peak_s)}   "
        f"fixed {PEAK_REPLICAS} from the start")
    for label, key in ((f"ramp ({ramp_s:.2f} s)", "ramp"), ("whole peak", "peak")):
        say(f"latency {label:<19} autoscaled p50 {_ms(auto[key], 50)} p99 {_ms(auto[key], 99)}   "
            f"fixed p50 {_ms(fixed[key], 50)} p99 {_ms(fixed[key], 99)}")
    say(f"back to 1 replica after step down  autoscaled {_seconds(auto['back'], args.quiet_s)}")
    for name, result in (("autoscaled", auto), ("fixed", fixed)):
        mark = "OK" if result["failed"] == 0 else "MISS"
        say(f"calls failed {name:<22} {result['failed']} of {result['calls']}   target 0  {mark}")


if __name__ == "__main__":
    main()
