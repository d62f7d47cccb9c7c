"""max_queued_requests: past it a call fails at once instead of waiting without bound."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

import streamwise
from streamwise.exceptions import BackPressureError
from streamwise.proto import predict_pb2, predict_pb2_grpc


@streamwise.deployment(max_ongoing_requests=2, max_queued_requests=3)
class Busy:
    async def hold(self, gate: str) -> str:
        while not os.path.exists(gate):  # the test opens the gate once it has seen the refusals
            await asyncio.sleep(0.01)
        return "done"

    async def __call__(self, inputs: dict) -> bytes:
        return (await self.hold(inputs["gate"].decode())).encode()


async def _settle(calls: list[asyncio.Future], refused: int) -> None:
    """Wait until ``refused`` of ``calls`` have failed (the rest still wait)."""
    while sum(c.done() and c.exception() is not None for c in calls) < refused:
        await asyncio.wait([c for c in calls if not c.done()], return_when=asyncio.FIRST_COMPLETED)


def test_handle_calls_past_the_queue_fail_at_once(serve, tmp_path):
    """With 2 running and 3 waiting, the other 5 of 10 calls raise BackPressureError
    while those still wait; once the replica frees up, the 5 kept ones complete."""
    handle = serve(Busy.bind())
    gate = tmp_path / "open"

    async def flood() -> tuple[list[BaseException], list[str]]:
        calls = [asyncio.ensure_future(handle.hold.remote(str(gate))) for _ in range(10)]
        await _settle(calls, 5)
        assert sum(c.done() for c in calls) == 5  # the kept five are still waiting or running
        gate.touch()
        await asyncio.wait(calls)
        failed = [c.exception() for c in calls if c.exception() is not None]
        return failed, [c.result() for c in calls if c.exception() is None]

    failed, done = asyncio.run(flood())
    assert done == ["done"] * 5
    assert len(failed) == 5 and all(isinstance(e, BackPressureError) for e in failed)
    assert "max_queued_requests=3" in str(failed[0]) and "Busy" in str(failed[0])
    assert handle.hold.remote(str(gate)).result() == "done"  # and it keeps serving


def test_ingress_calls_past_the_queue_get_resource_exhausted(serve, tmp_path):
    """External calls past the queue get RESOURCE_EXHAUSTED naming the limit."""
    serve(Busy.bind(), grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"))
    gate = tmp_path / "open"

    async def flood() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
            request = predict_pb2.PredictRequest(input={"gate": str(gate).encode()})
            calls = [asyncio.ensure_future(stub.Predict(request, timeout=60)) for _ in range(10)]
            await _settle(calls, 5)
            gate.touch()
            await asyncio.wait(calls)
            codes = []
            for call in calls:
                error = call.exception()
                codes.append(grpc.StatusCode.OK if error is None else error.code())
                if error is not None:
                    assert "max_queued_requests=3" in error.details()
            return codes

    codes = asyncio.run(flood())
    assert sorted(c.name for c in codes) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 5


def test_max_queued_requests_is_validated():
    """A limit below -1 is refused when the decorator is applied, naming the option."""
    with pytest.raises(streamwise.exceptions.UsageError, match="max_queued_requests"):
        Busy.options(max_queued_requests=-2)
