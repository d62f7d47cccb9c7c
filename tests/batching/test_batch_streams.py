"""@batch on async generators, standalone: one list per step, per-caller streams, early ends."""

from __future__ import annotations

import asyncio

import pytest

import streamwise
from streamwise.exceptions import UsageError

HUGE_S = 3600.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def collect(stream) -> list:
    return [item async for item in stream]


def test_each_caller_gets_its_own_element_per_step():
    """Step k's list gives element i to caller i; every caller sees every step in order."""

    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S)
    async def count(prefixes):
        for step in range(3):
            yield [f"{p}{step}" for p in prefixes]

    async def main():
        return await asyncio.gather(*(collect(count(p)) for p in "abc"))

    assert run(main()) == [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]


def test_stop_iteration_ends_one_stream_while_others_go_on():
    """Yielding StopIteration() as a caller's element ends only that caller's stream."""

    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S)
    async def countdown(lengths):
        for step in range(max(lengths)):
            yield [step if step < n else StopIteration() for n in lengths]

    async def main():
        return await asyncio.gather(*(collect(countdown(n)) for n in (1, 3, 2)))

    assert run(main()) == [[0], [0, 1, 2], [0, 1]]


def test_generator_closed_once_every_caller_finished():
    """When every caller's stream has ended, the generator is closed (its finally runs)."""
    closed = []

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def endless(items):
        try:
            step = 0
            while True:
                yield [StopIteration() if step >= 2 else step for _ in items]
                step += 1
        finally:
            closed.append(True)

    async def main():
        return await asyncio.gather(collect(endless(0)), collect(endless(1)))

    assert run(main()) == [[0, 1], [0, 1]]
    assert closed == [True]


def test_caller_that_stops_consuming_does_not_stall_the_rest():
    """A caller that stops reading (then closes) leaves; the other caller gets every step."""
    steps = []
    finished = []

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def ticks(items):
        try:
            for step in range(50):
                steps.append(step)
                yield [step] * len(items)
        finally:
            finished.append(len(steps))

    async def main():
        quitter = ticks("q")
        reader = ticks("r")
        first = asyncio.ensure_future(anext(quitter))
        got = await collect(reader)  # the quitter reads nothing more meanwhile
        assert await first == 0
        await quitter.aclose()
        return got

    assert run(main()) == list(range(50))
    assert finished == [50]


def test_cancelled_caller_leaves_the_batch():
    """A caller whose stream is closed mid-batch gets no more items; when all have left,
    the generator is closed even though it would go on forever."""

    async def main():
        closed = asyncio.Event()

        @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
        async def forever(items):
            try:
                step = 0
                while True:
                    yield [step] * len(items)
                    step += 1
            finally:
                closed.set()

        a, b = forever("a"), forever("b")
        assert await asyncio.gather(anext(a), anext(b)) == [0, 0]
        await a.aclose()
        assert [await anext(b) for _ in range(100)] == list(range(1, 101))
        await b.aclose()
        await closed.wait()  # would time out if the generator were left running
        return True

    assert run(main())


def test_batch_waits_when_no_caller_reads():
    """A generator that never awaits is paced: with nobody reading, it stops stepping
    after a bounded backlog instead of filling memory."""
    steps = []

    @streamwise.batch(max_batch_size=1, batch_wait_timeout_s=HUGE_S)
    async def fast(items):
        for step in range(10_000):
            steps.append(step)
            yield items

    async def main():
        stream = fast("x")
        assert await anext(stream) == "x"
        for _ in range(200):  # turns of the loop, not a timed wait: an unpaced batch takes one step per turn
            await asyncio.sleep(0)
        stepped = len(steps)
        await stream.aclose()
        return stepped

    assert run(main()) < 100


def test_exception_mid_stream_reaches_every_caller_after_its_items():
    """Items yielded before an exception arrive; then every remaining caller gets it."""

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def breaks(items):
        yield list(items)
        raise ValueError("model fell over")

    async def consume(x):
        got = []
        with pytest.raises(ValueError, match="model fell over"):
            async for item in breaks(x):
                got.append(item)
        return got

    async def main():
        return await asyncio.gather(consume("a"), consume("b"))

    assert run(main()) == [["a"], ["b"]]


def test_wrong_step_length_fails_every_caller():
    """A step list with the wrong length fails every caller with a UsageError."""

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def short(items):
        yield items[:1]

    async def consume(x):
        with pytest.raises(UsageError, match="one element per caller"):
            await collect(short(x))
        return True

    async def main():
        return await asyncio.gather(consume("a"), consume("b"))

    assert run(main()) == [True, True]


def test_streams_batch_again_after_a_batch_ends():
    """Callers arriving after a streaming batch ended form the next batch (zero timeout)."""

    @streamwise.batch(max_batch_size=4, batch_wait_timeout_s=0)
    async def sizes(items):
        yield [len(items)] * len(items)

    async def main():
        first = await asyncio.gather(*(collect(sizes(i)) for i in range(3)))
        second = await collect(sizes(9))
        return first, second

    assert run(main()) == ([[3], [3], [3]], [1])
    assert [s.steps for s in sizes.stats.recent] == [1, 1]


def test_cancelled_batch_closes_generator_and_cancels_callers():
    """When a running streaming batch is cancelled (its loop is shutting down), the
    generator's finally runs at once and its callers are cancelled, not left waiting."""

    async def main():
        closed = asyncio.Event()

        @streamwise.batch(max_batch_size=1, batch_wait_timeout_s=0)
        async def forever(items):
            try:
                while True:
                    yield items
                    await asyncio.Event().wait()  # a step that never ends
            finally:
                closed.set()

        stream = forever("x")
        assert await anext(stream) == "x"
        runners = {t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "run_stream"}
        assert len(runners) == 1
        runners.pop().cancel()
        await closed.wait()
        with pytest.raises(asyncio.CancelledError):
            await anext(stream)
        return True

    assert run(main())
