"""Streams end to end: items arrive as produced, cancellation reaches the generator."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

import streamwise
from streamwise.exceptions import RemoteError, ReplicaDiedError

pytestmark = pytest.mark.both_transports


@streamwise.deployment(max_ongoing_requests=8)
class Producer:
    def __init__(self):
        self.gate = asyncio.Event()
        self.finalized = asyncio.Event()
        self.started = asyncio.Event()

    async def gated(self):
        """Yield one item, wait for open_gate(), then yield another."""
        yield "first"
        await self.gate.wait()
        yield "second"

    async def open_gate(self) -> None:
        self.gate.set()

    async def endless(self):
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            self.finalized.set()

    async def slow_unary(self) -> None:
        try:
            self.started.set()
            await asyncio.sleep(3600)
        finally:
            self.finalized.set()

    async def wait_started(self) -> bool:
        await asyncio.wait_for(self.started.wait(), 10)
        return True

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True

    async def many(self, n: int):
        for i in range(n):
            yield i

    async def fails_after(self, n: int):
        for i in range(n):
            yield i
        raise ValueError(f"broke after {n}")

    async def odd_items(self):
        yield 1
        yield object()

    def sync_gen(self, n: int):
        for i in range(n):
            yield i * 10

    async def pid(self) -> int:
        return os.getpid()


@streamwise.deployment
class Relay:
    def __init__(self, producer: streamwise.DeploymentHandle):
        self.producer = producer
        self.finalized = asyncio.Event()

    async def relay(self):
        try:
            async for item in self.producer.endless.remote():
                yield item
        finally:
            self.finalized.set()

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True

    async def producer_finalized(self) -> bool:
        return await self.producer.wait_finalized.remote()


def test_items_arrive_as_produced(serve):
    """The first item reaches the caller while the generator is still suspended.

    The producer waits for open_gate() after its first item; if items were held back
    until the stream ended, this test would never get "first" and would time out.
    """
    handle = serve(Producer.bind())
    stream = handle.gated.remote()
    assert next(stream) == "first"
    handle.open_gate.remote().result()
    assert list(stream) == ["second"]


def test_long_stream_complete_and_in_order(serve):
    """A fast stream of 20k items arrives complete and in order (frames coalesce)."""
    handle = serve(Producer.bind())
    assert list(handle.many.remote(20_000)) == list(range(20_000))


def test_sync_generator_method_streams(serve):
    """A plain `def ... yield` method streams too (run in the thread pool)."""
    handle = serve(Producer.bind())
    assert list(handle.sync_gen.remote(4)) == [0, 10, 20, 30]


def test_error_mid_stream(serve):
    """Items yielded before an exception arrive, then the caller gets RemoteError."""
    handle = serve(Producer.bind())
    got = []
    with pytest.raises(RemoteError) as info:
        for item in handle.fails_after.remote(3):
            got.append(item)
    assert got == [0, 1, 2]
    assert info.value.remote_type == "ValueError"
    assert "broke after 3" in info.value.remote_message
    assert "fails_after" in info.value.remote_traceback


def test_unencodable_item_fails_stream_naming_codec(serve):
    """An item the response codec cannot encode ends the stream with an error naming it."""
    handle = serve(Producer.bind())
    stream = handle.options(method_name="odd_items", response_serialization="msgpack").remote()
    with pytest.raises(RemoteError, match="msgpack"):
        list(stream)
    assert list(handle.many.remote(2)) == [0, 1]


def test_break_cancels_remote_generator(serve):
    """A consumer that stops after 3 items cancels the remote generator (finally runs)."""
    handle = serve(Producer.bind())
    got = []
    for item in handle.endless.remote():
        got.append(item)
        if len(got) == 3:
            break
    assert got == [0, 1, 2]
    assert handle.wait_finalized.remote().result()


def test_async_break_cancels_remote_generator(serve):
    """Breaking out of `async for` cancels the remote generator too."""
    handle = serve(Producer.bind())

    async def main():
        async for item in handle.endless.remote():
            if item == 2:
                break
        return await handle.wait_finalized.remote()

    assert asyncio.run(main())


def test_async_with_closes_stream(serve):
    """Leaving `async with` closes the stream and cancels the generator."""
    handle = serve(Producer.bind())

    async def main():
        async with handle.endless.remote() as stream:
            assert await stream.__anext__() == 0
        return await handle.wait_finalized.remote()

    assert asyncio.run(main())


def test_cancel_propagates_downstream(serve):
    """Stopping a stream cancels every stream it was consuming, across deployments."""
    handle = serve(Relay.bind(Producer.bind()))
    stream = handle.relay.remote()
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert handle.wait_finalized.remote().result()
    assert handle.producer_finalized.remote().result()


def test_unary_cancel_reaches_replica(serve):
    """Cancelling a unary call cancels the user coroutine (its finally runs)."""
    handle = serve(Producer.bind())
    response = handle.slow_unary.remote()
    assert handle.wait_started.remote().result()
    response.cancel()
    assert handle.wait_finalized.remote().result()


def test_killed_replica_fails_stream_then_recovers(serve):
    """SIGKILL mid-stream fails the stream with ReplicaDiedError; the next call succeeds."""
    handle = serve(Producer.bind())
    pid = handle.pid.remote().result()
    stream = handle.endless.remote()
    assert next(stream) == 0
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ReplicaDiedError) as info:
        for _ in stream:
            pass
    assert "Producer" in str(info.value)
    assert list(handle.many.remote(3)) == [0, 1, 2]
    assert handle.pid.remote().result() != pid


@streamwise.deployment
class Accumulator:
    async def total(self, numbers, scale: int = 1) -> int:
        """Client streaming: consume an input stream, return one value."""
        return scale * sum([n async for n in numbers])

    async def running(self, numbers):
        """Bidirectional: yield a running total per input item."""
        acc = 0
        async for n in numbers:
            acc += n
            yield acc

    async def echo_gated(self, items):
        async for item in items:
            yield item


async def _numbers(n):
    for i in range(n):
        yield i


def test_input_stream_to_unary_method(serve):
    """An async iterable first argument streams to the replica (client streaming)."""
    handle = serve(Accumulator.bind())
    assert handle.total.remote(_numbers(5), scale=2).result() == 20


def test_bidirectional_stream(serve):
    """Input items and output items flow at once (bidirectional streaming)."""
    handle = serve(Accumulator.bind())
    assert list(handle.running.remote(_numbers(4))) == [0, 1, 3, 6]


def test_bidirectional_is_interactive(serve):
    """Each output arrives before the next input is sent: nothing is buffered whole."""
    handle = serve(Accumulator.bind())

    async def main():
        queue: asyncio.Queue = asyncio.Queue()

        async def inputs():
            while (item := await queue.get()) is not None:
                yield item

        out = []
        async with handle.echo_gated.remote(inputs()) as stream:
            for word in ("a", "b", "c"):
                await queue.put(word)
                out.append(await stream.__anext__())
            await queue.put(None)
            out.extend([x async for x in stream])
        return out

    assert asyncio.run(main()) == ["a", "b", "c"]


@streamwise.deployment(max_ongoing_requests=1)
class Quirky:
    def __init__(self):
        self.release = threading.Event()
        self.finalized = threading.Event()

    async def raises_cancelled(self):
        yield 1
        raise asyncio.CancelledError()

    async def unary_cancelled(self):
        raise asyncio.CancelledError()

    async def ok(self) -> str:
        return "ok"

    async def numbers(self):
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0.001)

    def blocking_gen(self):
        try:
            yield "first"
            self.release.wait(30)  # blocks inside next() until released
            yield "second"
        finally:
            self.finalized.set()

    def let_go(self) -> None:
        self.release.set()

    def sync_finalized(self) -> bool:
        return self.finalized.wait(10)


def test_user_cancelled_error_is_an_error_not_a_hang(serve):
    """User code raising CancelledError ends its call with RemoteError and frees the slot."""
    handle = serve(Quirky.bind())
    with pytest.raises(RemoteError, match="CancelledError"):
        list(handle.raises_cancelled.remote())
    with pytest.raises(RemoteError, match="CancelledError"):
        handle.unary_cancelled.remote().result(timeout_s=30)
    assert handle.ok.remote().result(timeout_s=30) == "ok"  # max_ongoing_requests=1: slot freed


def test_close_from_another_thread_ends_iteration(serve):
    """Closing a stream while another thread iterates it ends that iteration cleanly."""
    handle = serve(Quirky.bind())
    stream = handle.numbers.remote()
    assert next(stream) == 0
    seen = []
    errors = []

    def consume():
        try:
            for item in stream:
                seen.append(item)
        except Exception as exc:  # the invariant is that none is raised
            errors.append(exc)

    reader = threading.Thread(target=consume)
    reader.start()
    stream.close()
    reader.join(30)
    assert not reader.is_alive() and errors == []
    assert handle.ok.remote().result(timeout_s=30) == "ok"


def test_open_then_close_leaks_nothing(serve):
    """Closing streams right after starting them leaves no call counted against the replica."""
    handle = serve(Quirky.bind())
    for _ in range(100):
        handle.numbers.remote().close()
    # max_ongoing_requests=1: a leaked in-flight count would make this wait forever
    assert handle.ok.remote().result(timeout_s=30) == "ok"


def test_sync_generator_cancelled_inside_next_still_finalizes(serve):
    """A sync generator closed while blocked in next() runs its finally once next() returns."""
    handle = serve(Quirky.options(max_ongoing_requests=4).bind())
    stream = handle.blocking_gen.remote()
    assert next(stream) == "first"
    stream.close()  # the generator is now blocked inside next()
    handle.let_go.remote().result(timeout_s=30)
    assert handle.sync_finalized.remote().result(timeout_s=30)
