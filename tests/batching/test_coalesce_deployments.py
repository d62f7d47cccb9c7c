"""Frame shaping inside real deployments: @coalesce, the deployment default, chunks()."""

from __future__ import annotations

import asyncio

import pytest

import streamwise
from streamwise.exceptions import RemoteError

HUGE_S = 3600.0


@streamwise.deployment(coalesce=streamwise.CoalesceConfig(max_items=2, max_delay_s=HUGE_S))
class Shaped:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.finalized = asyncio.Event()

    async def deployment_default(self, n: int):
        for i in range(n):
            yield i
            await asyncio.sleep(0)

    @streamwise.coalesce(max_items=5, max_delay_s=HUGE_S)
    async def method_override(self, n: int):
        for i in range(n):
            yield i
            await asyncio.sleep(0)

    @streamwise.coalesce(max_items=1)
    async def one_per_frame(self, n: int):
        for i in range(n):
            yield i

    @streamwise.coalesce(max_items=100, max_delay_s=0.02)
    async def gated(self):
        yield "first"
        await self.gate.wait()
        yield "second"

    async def open_gate(self) -> None:
        self.gate.set()

    @streamwise.coalesce(max_items=3)
    async def fails_after(self, n: int):
        for i in range(n):
            yield i
        raise ValueError(f"broke after {n}")

    async def endless(self):
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            self.finalized.set()

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True


def test_frame_policies_reach_the_wire(serve):
    """Deployment-wide coalesce shapes frames; @coalesce on a method overrides it;
    chunks() shows the frames (sync and async)."""
    handle = serve(Shaped.bind())
    assert list(handle.deployment_default.remote(5).chunks()) == [[0, 1], [2, 3], [4]]
    assert list(handle.one_per_frame.remote(4).chunks()) == [[0], [1], [2], [3]]

    async def main():
        return [chunk async for chunk in handle.method_override.remote(12).chunks()]

    assert asyncio.run(main()) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_held_item_leaves_within_max_delay(serve):
    """An item held by max_delay_s reaches the caller while the generator waits for the
    caller: the hold ends on its own (otherwise this would never finish)."""
    handle = serve(Shaped.bind())
    chunks = handle.gated.remote().chunks()
    assert next(chunks) == ["first"]
    handle.open_gate.remote().result()
    assert list(chunks) == [["second"]]


def test_chunks_deliver_items_then_error_and_cancel_on_close(serve):
    """chunks() yields the items sent before an error, then raises it; closing a chunk
    iterator cancels the remote generator (its finally runs)."""
    handle = serve(Shaped.bind())
    got = []
    with pytest.raises(RemoteError, match="broke after 4"):
        for chunk in handle.fails_after.remote(4).chunks():
            got.extend(chunk)
    assert got == [0, 1, 2, 3]
    chunks = handle.endless.remote().chunks()
    assert next(chunks)[0] == 0
    chunks.close()
    assert handle.wait_finalized.remote().result(timeout_s=30)
