"""The driver's scrape endpoint, read with prometheus-client's parser after real calls."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import streamwise
from streamwise.exceptions import RemoteError
from streamwise.proto import predict_pb2, predict_pb2_grpc


@streamwise.deployment(num_replicas=2, max_ongoing_requests=16)
class Back:
    async def double(self, x: int) -> int:
        return 2 * x

    async def nap(self, x: int) -> int:
        await asyncio.sleep(0.005)
        return 2 * x

    async def count(self, n: int):
        for i in range(n):
            yield i

    async def fail(self) -> None:
        raise ValueError("no")

    @streamwise.batch(max_batch_size=4, batch_wait_timeout_s=0.001)
    async def batched(self, xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]


@streamwise.deployment
class Front:
    def __init__(self, back):
        self.back = back

    async def __call__(self, inputs: dict) -> bytes:
        return str(await self.back.double.remote(int(inputs["x"]))).encode()


def _scrape() -> dict[str, list]:
    with urllib.request.urlopen(f"http://{streamwise.metrics_address()}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture
def app(serve):
    handle = serve(
        Front.bind(Back.bind()),
        grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"),
        metrics_port=0,
    )
    return handle


def test_counts_match_the_calls_made(app):
    """Each figure counts what the test did: calls, errors, stream items, batches,
    ingress calls, replica states, downstream calls of a replica."""
    from streamwise.routing.handle import DeploymentHandle

    back = DeploymentHandle("Back", "default", Back.methods)  # Back, called directly as well
    for i in range(7):
        assert back.double.remote(i).result() == 2 * i
    for _ in range(3):
        assert list(back.count.remote(5)) == list(range(5))
    with pytest.raises(RemoteError):
        back.fail.remote().result()

    async def batch() -> list[int]:
        return list(await asyncio.gather(*(back.batched.remote(i) for i in range(8))))

    assert asyncio.run(batch()) == list(range(1, 9))

    async def ingress() -> None:
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
            for x in (b"1", b"2"):
                await stub.Predict(predict_pb2.PredictRequest(input={"x": x}))

    asyncio.run(ingress())
    m = _scrape()

    requests = m["streamwise_replica_requests"]
    assert _value(requests, "streamwise_replica_requests_total", deployment="Back", method="double", status="OK") == 9
    assert _value(requests, "streamwise_replica_requests_total", deployment="Back", method="count", status="OK") == 3
    assert _value(requests, "streamwise_replica_requests_total", deployment="Back", method="batched") == 8
    assert _value(m["streamwise_replica_errors"], "streamwise_replica_errors_total", method="fail", status="INTERNAL") == 1
    replicas_seen = {s.labels["replica"] for s in requests if s.labels["deployment"] == "Back"}
    assert len(replicas_seen) <= 2 and all(r.startswith("Back#") for r in replicas_seen)
    items = m["streamwise_replica_stream_items"]
    assert _value(items, "streamwise_replica_stream_items_sum", method="count") == 15
    assert _value(items, "streamwise_replica_stream_items_count", method="count") == 3
    first = m["streamwise_replica_stream_first_item_seconds"]
    assert _value(first, "streamwise_replica_stream_first_item_seconds_count", method="count") == 3
    latency = m["streamwise_replica_request_duration_seconds"]
    assert _value(latency, "streamwise_replica_request_duration_seconds_count", method="double") == 9
    assert _value(latency, "streamwise_replica_request_duration_seconds_bucket", method="double", le="+Inf") == 9
    sizes = m["streamwise_batch_size"]
    assert _value(sizes, "streamwise_batch_size_sum", method="batched") == 8

    ingress_calls = m["streamwise_ingress_requests"]
    assert _value(ingress_calls, "streamwise_ingress_requests_total", status="OK", application="default") == 2
    # The driver's routers (its handle calls of Back, the ingress's of Front) are counted.
    assert {s.labels["caller"] for s in m["streamwise_router_ongoing_requests"]} >= {"driver"}
    assert _value(m["streamwise_replicas"], "streamwise_replicas", deployment="Back", state="RUNNING") == 2
    assert _value(m["streamwise_replicas"], "streamwise_replicas", deployment="Front", state="RUNNING") == 1
    assert _value(m["streamwise_deployment_target_replicas"], "streamwise_deployment_target_replicas", deployment="Back") == 2
    assert "streamwise_replica_ongoing_requests" in m


@streamwise.deployment(num_replicas=2)
class Caller:
    def __init__(self, slow):
        self.slow = slow

    async def spam(self, n: int) -> int:
        return sum(await asyncio.gather(*(self.slow.nap.remote(i) for i in range(n))))


def test_refusals_of_a_full_replica_show_as_retries_of_its_callers(serve):
    """Two caller replicas each keep one call in flight to a replica that takes one:
    the replica's refusals and the callers' retries (counted in the callers'
    processes, merged by the driver) are the same number, and not zero."""
    slow = Back.options(name="SlowForRetries", num_replicas=1, max_ongoing_requests=1)
    handle = serve(Caller.bind(slow.bind()), metrics_port=0)

    async def both() -> list[int]:
        return list(await asyncio.gather(*(handle.spam.remote(10) for _ in range(8))))

    assert asyncio.run(both()) == [2 * sum(range(10))] * 8
    m = _scrape()
    rejected = _value(
        m["streamwise_replica_rejected"], "streamwise_replica_rejected_total", deployment="SlowForRetries", reason="full"
    )
    retries = [s for s in m["streamwise_router_retries"] if s.labels["deployment"] == "SlowForRetries"]
    assert rejected > 0
    assert _value(retries, "streamwise_router_retries_total", reason="full") == rejected
    # Counted where the calls were made: in the two Caller replicas, not the driver.
    assert {s.labels["caller"].split("#")[0] for s in retries} == {"Caller"}


def test_ingress_connections_gauge_follows_open_client_connections(app):
    """Each client channel that has made a call holds one connection, counted by
    streamwise_ingress_connections; once the channels close the gauge falls back."""
    import time

    def connections() -> float:
        return _value(_scrape()["streamwise_ingress_connections"], "streamwise_ingress_connections")

    baseline = connections()
    n = 4
    # A local subchannel pool per channel: channels to one target would share a connection.
    channels = [
        grpc.insecure_channel(streamwise.ingress_address(), options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]
    try:
        for i, channel in enumerate(channels):
            reply = predict_pb2_grpc.PredictAPIsServiceStub(channel).Predict(
                predict_pb2.PredictRequest(input={"x": str(i).encode()}), timeout=30
            )
            assert reply.prediction == str(2 * i).encode()
        assert connections() >= baseline + n
    finally:
        for channel in channels:
            channel.close()
    deadline = time.monotonic() + 30
    while connections() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connections() <= baseline
