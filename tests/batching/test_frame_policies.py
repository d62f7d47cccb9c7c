"""send_frames under each coalescing policy, driven directly (one loop, a list as transport)."""

from __future__ import annotations

import asyncio

import cloudpickle
import pytest

import streamwise
from streamwise.actors._methods import coalesce_of
from streamwise.config import CoalesceConfig, DeploymentConfig
from streamwise.exceptions import UsageError
from streamwise.streaming.frames import send_frames

HUGE_S = 3600.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Transport:
    """Records frames; ``block_first`` keeps the first write pending until released."""

    def __init__(self, block_first: bool = False) -> None:
        self.frames: list[list] = []
        self.sizes: list[int] = []
        self.wrote = asyncio.Event()
        self._release = asyncio.Event()
        if not block_first:
            self._release.set()

    async def write(self, frame) -> None:
        self.frames.append(cloudpickle.loads(frame.items) if frame.count else [])
        self.sizes.append(len(frame.items))
        self.wrote.set()
        await self._release.wait()

    def release(self) -> None:
        self._release.set()


async def numbers(n: int, gap=None):
    for i in range(n):
        yield i
        if gap is not None:
            await gap(i)


def test_default_sends_first_item_alone_and_piles_up_the_rest():
    """Default: the first item leaves at once; items yielded while the transport is busy
    ride together in the next frame."""

    async def main():
        transport = Transport(block_first=True)
        wrote_first = transport.wrote

        async def gap(i):
            if i == 0:
                await wrote_first.wait()  # the first frame is on the wire (and stuck)
            if i == 4:
                transport.release()

        await send_frames(numbers(5, gap), transport.write, cloudpickle.dumps)
        return transport.frames

    assert run(main()) == [[0], [1, 2, 3, 4]]


def test_max_items_caps_every_frame():
    """max_items=3: no frame holds more than 3 items; all arrive in order."""

    async def main():
        transport = Transport()
        await send_frames(numbers(10), transport.write, cloudpickle.dumps, CoalesceConfig(max_items=3))
        return transport.frames

    frames = run(main())
    assert all(1 <= len(f) <= 3 for f in frames)
    assert [i for f in frames for i in f] == list(range(10))


def test_max_bytes_caps_every_frame_but_a_lone_large_item():
    """max_bytes: frames stay within the cap; an item larger than the cap travels alone."""
    items = [b"x" * 100] * 7 + [b"y" * 1000] + [b"z" * 100] * 3

    async def produce():
        for item in items:
            yield item

    async def main():
        transport = Transport()
        await send_frames(produce(), transport.write, cloudpickle.dumps, CoalesceConfig(max_bytes=350))
        return transport

    transport = run(main())
    assert [i for f in transport.frames for i in f] == items
    for frame, size in zip(transport.frames, transport.sizes, strict=True):
        assert size <= 350 or frame == [b"y" * 1000]


def test_max_delay_holds_items_to_fill_a_frame():
    """With a (huge) max_delay_s and max_items=3, items are held until a frame holds 3;
    the end of the stream sends what is left at once."""

    async def gap(i):
        await asyncio.sleep(0)  # a yield between items, so they arrive one by one

    async def main():
        transport = Transport()
        policy = CoalesceConfig(max_items=3, max_delay_s=HUGE_S)
        await send_frames(numbers(7, gap), transport.write, cloudpickle.dumps, policy)
        return transport.frames

    assert run(main()) == [[0, 1, 2], [3, 4, 5], [6]]


def test_max_delay_never_holds_an_item_forever():
    """A held item leaves once max_delay_s has passed even if no other item comes:
    the producer waits for the first frame before yielding again."""

    async def main():
        transport = Transport()

        async def gap(i):
            await transport.wrote.wait()

        policy = CoalesceConfig(max_items=100, max_delay_s=0.01)
        await send_frames(numbers(2, gap), transport.write, cloudpickle.dumps, policy)
        return transport.frames

    assert run(main()) == [[0], [1]]


def test_error_after_items_under_a_policy():
    """A generator error still arrives after its items when frames are shaped."""

    async def breaks():
        yield 1
        yield 2
        raise ValueError("broke")

    async def main():
        frames = []

        async def write(frame):
            frames.append(frame)

        error = await send_frames(breaks(), write, cloudpickle.dumps, CoalesceConfig(max_items=1, max_delay_s=HUGE_S))
        return frames, error

    frames, error = run(main())
    # Every item before the failure went out; the failure is the caller's to send.
    assert [cloudpickle.loads(f.items) for f in frames] == [[1], [2]]
    assert isinstance(error, ValueError) and str(error) == "broke"


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        ({"max_items": 0}, "max_items"),
        ({"max_bytes": -5}, "max_bytes"),
        ({"max_delay_s": -1}, "max_delay_s"),
        ({"max_delay_s": float("nan")}, "max_delay_s"),
        ({"max_items": True}, "max_items"),
    ],
)
def test_coalesce_knobs_validated_when_applied(knobs, named):
    """@coalesce and CoalesceConfig reject bad knobs at once, naming them."""
    with pytest.raises(UsageError, match=named):
        streamwise.coalesce(**knobs)
    with pytest.raises(UsageError, match=named):
        CoalesceConfig(**knobs)


def test_coalesce_only_on_generators():
    """@coalesce on a method that does not stream is a UsageError."""
    with pytest.raises(UsageError, match="not a generator"):

        @streamwise.coalesce(max_items=2)
        async def unary():
            return 1


def test_deployment_coalesce_option_is_checked():
    """The deployment-wide coalesce option must be a CoalesceConfig."""
    assert DeploymentConfig(name="d").coalesce == CoalesceConfig()
    with pytest.raises(UsageError, match="coalesce of 'd'"):
        DeploymentConfig(name="d", coalesce={"max_items": 2})


def test_coalesce_and_batch_stack_either_way():
    """@coalesce above or below @batch marks the streaming method the replica runs."""
    policy = CoalesceConfig(max_items=4)

    class Model:
        @streamwise.coalesce(max_items=4)
        @streamwise.batch
        async def above(self, items):
            yield items

        @streamwise.batch
        @streamwise.coalesce(max_items=4)
        async def below(self, items):
            yield items

    default = CoalesceConfig()
    assert coalesce_of(Model().above, default) == policy
    assert coalesce_of(Model().below, default) == policy
