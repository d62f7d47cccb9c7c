"""Autoscaling with real replica processes: up under load, down after it (draining,
nothing dropped), from and to zero, a custom policy, and operators' bounds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import streamwise
from streamwise.actors.management import running_drivers
from streamwise.proto import management_pb2, management_pb2_grpc

# Short delays so the tests decide within a fraction of a second.
FAST = dict(metrics_interval_s=0.05, look_back_period_s=0.2, upscale_delay_s=0.1, downscale_delay_s=0.5)

WANTED = [1]  # what the custom policy asks for; the controller runs in this process


def wanted_by_test(context: streamwise.AutoscalingContext) -> int:
    context.state["calls"] = context.state.get("calls", 0) + 1
    return WANTED[0]


class Worker:
    async def work(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    async def pid(self) -> int:
        return os.getpid()

    async def count(self, n: int, gap_s: float):
        for i in range(n):
            await asyncio.sleep(gap_s)
            yield i


def _deployment(**options):
    return streamwise.deployment(Worker, name="Worker", graceful_shutdown_timeout_s=30, **options)


def _stub():
    (driver,) = [d for d in running_drivers() if d.pid == os.getpid()]
    channel = grpc.insecure_channel(driver.target)
    return channel, management_pb2_grpc.ManagementStub(channel), driver.metadata()


def _status(deployment: str = "Worker") -> management_pb2.DeploymentStatus:
    channel, stub, metadata = _stub()
    with channel:
        app = stub.DescribeApplication(management_pb2.DescribeApplicationRequest(application="default"), metadata=metadata)
    (found,) = [d for d in app.deployments if d.name == deployment]
    return found


def _scrape() -> dict[str, float]:
    """The Worker deployment's gauges, from the driver's scrape endpoint."""
    with urllib.request.urlopen(f"http://{streamwise.metrics_address()}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("deployment") == "Worker" and "state" not in sample.labels
    }


def _wait_for(predicate, what: str, timeout_s: float = 30.0) -> management_pb2.DeploymentStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status()
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s}s; last status: {status}")
        time.sleep(0.05)


def test_scales_up_under_load_then_down_with_no_call_failed(serve):
    """Six callers of a 1-replica deployment (target 1 call each) make it scale to its
    maximum of 3; once they stop it returns to 1. Every call succeeds throughout."""
    autoscaling = streamwise.AutoscalingConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=1, **FAST)
    handle = serve(_deployment(autoscaling_config=autoscaling, max_ongoing_requests=2).bind(), metrics_port=0)
    assert _status().target_replicas == 1
    stop = threading.Event()
    results: list[int] = []
    errors: list[BaseException] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                results.append(handle.work.remote(0.05).result())
            except BaseException as exc:  # counted: the test fails on any
                errors.append(exc)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(caller)
        try:
            up = _wait_for(lambda s: s.running_replicas == 3, "scaling up to 3")
            mark = len(results)
            deadline = time.monotonic() + 30
            while len(results) < mark + 60 and time.monotonic() < deadline:
                time.sleep(0.02)
            after = set(results[mark:])
            metrics = _scrape()
        finally:
            stop.set()
    assert up.target_replicas == 3 and up.HasField("autoscaling")
    assert up.autoscaling.max_replicas == 3 and up.autoscaling.ongoing_requests + up.autoscaling.queued_requests > 0
    assert after <= {r.pid for r in up.replicas} and len(after) >= 2  # the new replicas take calls
    assert metrics["streamwise_deployment_target_replicas"] == 3
    assert metrics["streamwise_autoscaling_ongoing_requests"] + metrics["streamwise_autoscaling_queued_requests"] > 0
    down = _wait_for(lambda s: (s.target_replicas, s.running_replicas, len(s.replicas)) == (1, 1, 1), "scaling back to 1")
    assert errors == []
    assert handle.work.remote(0).result() == down.replicas[0].pid


def test_scale_down_by_a_policy_drains_open_streams(serve):
    """A custom policy scales to 3; six streams fill all three replicas (two each);
    the policy then asks for 1: two replicas drain, and every stream ends whole."""
    WANTED[0] = 3
    autoscaling = streamwise.AutoscalingConfig(min_replicas=1, max_replicas=3, policy=wanted_by_test, **FAST)
    handle = serve(_deployment(autoscaling_config=autoscaling, max_ongoing_requests=2).bind())
    _wait_for(lambda s: s.running_replicas == 3, "the policy's 3 replicas")
    results: list[list[int]] = []
    started = threading.Barrier(7)

    def consume() -> None:
        stream = handle.count.remote(40, 0.05)
        items = [next(iter(stream))]
        started.wait(30)
        items.extend(stream)
        results.append(items)

    threads = [threading.Thread(target=consume) for _ in range(6)]
    for thread in threads:
        thread.start()
    started.wait(30)  # six streams run: each replica holds two (max_ongoing_requests=2)
    WANTED[0] = 1
    draining = _wait_for(lambda s: s.target_replicas == 1, "the policy's scale-down", 10)
    for thread in threads:
        thread.join(60)
    assert results == [list(range(40))] * 6
    assert any(r.state == "DRAINING" for r in draining.replicas) or draining.running_replicas == 1
    final = _wait_for(lambda s: len(s.replicas) == 1, "two replicas gone")
    assert final.running_replicas == 1


def test_scales_from_zero_on_the_first_call_and_back_to_zero(serve):
    """With min_replicas=0 nothing runs at start; the first call starts a replica and
    waits for it; with no calls the deployment returns to zero, and starts again."""
    autoscaling = streamwise.AutoscalingConfig(min_replicas=0, max_replicas=2, **FAST)
    handle = serve(_deployment(autoscaling_config=autoscaling).bind())
    assert (_status().target_replicas, len(_status().replicas)) == (0, 0)
    first = handle.pid.remote().result()
    assert first > 0
    _wait_for(lambda s: s.target_replicas == 0 and len(s.replicas) == 0, "scaling to zero")
    second = handle.pid.remote().result()
    assert second > 0 and second != first


def test_num_replicas_auto_and_operator_bounds(serve):
    """num_replicas="auto" autoscales from 1 to 100; an operator's --min/--max (the
    ScaleDeployment bounds) narrow it and take effect at once; a fixed count turns
    autoscaling off; bounds that make no sense are refused with the reason."""
    handle = serve(_deployment(num_replicas="auto").bind())
    status = _status()
    assert (status.autoscaling.min_replicas, status.autoscaling.max_replicas) == (1, 100)
    channel, stub, metadata = _stub()
    with channel:
        request = management_pb2.ScaleDeploymentRequest(
            application="default", deployment="Worker", min_replicas=2, max_replicas=4
        )
        last = list(stub.ScaleDeployment(request, metadata=metadata, timeout=60))[-1]
        assert (last.autoscaling.min_replicas, last.autoscaling.max_replicas) == (2, 4)
        assert last.running_replicas == 2
        with pytest.raises(grpc.RpcError) as refused:
            bad = management_pb2.ScaleDeploymentRequest(
                application="default", deployment="Worker", min_replicas=5, max_replicas=3
            )
            list(stub.ScaleDeployment(bad, metadata=metadata, timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_replicas (5) must be <= max_replicas (3)" in refused.value.details()
        fixed = management_pb2.ScaleDeploymentRequest(application="default", deployment="Worker", num_replicas=1)
        last = list(stub.ScaleDeployment(fixed, metadata=metadata, timeout=60))[-1]
    assert not last.HasField("autoscaling") and last.running_replicas == 1
    assert handle.pid.remote().result() == last.replicas[0].pid
