"""Continuous batching, standalone: who joins and who leaves, only at step boundaries."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

import streamwise
from streamwise.exceptions import UsageError
from streamwise.streaming.context import _CURRENT, RequestContext


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Script:
    """A continuous token generator a test drives step by step.

    Each caller passes ``(name, length)`` and gets ``length`` tokens ``(name, step)``,
    then its stream ends. Steps given to ``hold()`` wait for ``release()`` before
    yielding, so a test can act while the batch is inside a known step.
    """

    def __init__(self, max_batch_size: int = 3) -> None:
        self.steps: list[streamwise.BatchStep] = []
        self.ended = 0
        self._reached: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._gates: dict[int, asyncio.Event] = {}

        @streamwise.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0, continuous=True)
        async def generate(batch: streamwise.ContinuousBatch):
            counts = {}
            async for step in batch:
                self.steps.append(step)
                self._reached[step.index].set()
                gate = self._gates.get(step.index)
                if gate is not None:
                    await gate.wait()
                for request in step.joined:
                    counts[request] = 0
                for request in step.left:
                    del counts[request]
                out = []
                for request in step.requests:
                    name, length = request.item
                    if counts[request] >= length:
                        out.append(StopIteration())
                    else:
                        out.append((name, step.index))
                        counts[request] += 1
                yield out
            self.ended += 1

        self.generate = generate

    def hold(self, *indices: int) -> None:
        for index in indices:
            self._gates[index] = asyncio.Event()

    def release(self, index: int) -> None:
        self._gates[index].set()

    async def reached(self, index: int) -> streamwise.BatchStep:
        await self._reached[index].wait()
        return self.steps[index]

    async def start(self, *items, model_id: str = "") -> list[asyncio.Future]:
        """Start one caller per item; returns once all are queued (in one batch, if the
        batch is not running yet). Each task collects its caller's tokens."""
        queued = [asyncio.Event() for _ in items]

        async def consume(item, queued):
            # What the replica does for a call with a multiplexed model id.
            _CURRENT.set(RequestContext(multiplexed_model_id=model_id))
            stream = self.generate(item)
            queued.set()  # the first anext below queues the caller before this task yields
            return [token async for token in stream]

        tasks = [asyncio.ensure_future(consume(item, event)) for item, event in zip(items, queued, strict=True)]
        for event in queued:
            await event.wait()
        return tasks


def items(requests) -> list:
    return [request.item[0] for request in requests]


def test_caller_joins_at_the_next_step_boundary():
    """A caller queued while step k runs joins at step k+1 (in `joined`), never mid-step."""

    async def main():
        script = Script()
        script.hold(0)
        (a,) = await script.start(("a", 3))
        first = await script.reached(0)
        (b,) = await script.start(("b", 2))  # queued while step 0 is running
        script.release(0)
        second = await script.reached(1)
        return first, second, await a, await b

    first, second, a, b = run(main())
    assert (items(first.requests), items(first.joined), first.left) == (["a"], ["a"], ())
    assert (items(second.requests), items(second.joined), second.left) == (["a", "b"], ["b"], ())
    assert a == [("a", 0), ("a", 1), ("a", 2)]
    assert b == [("b", 1), ("b", 2)]  # nothing from step 0, which ran before it joined


def test_finished_caller_leaves_at_the_next_step():
    """A caller whose element was StopIteration() is in the next step's `left`, not cancelled."""

    async def main():
        script = Script()
        a, b = await script.start(("a", 1), ("b", 3))
        await asyncio.gather(a, b)
        return script.steps

    steps = run(main())
    assert [items(s.requests) for s in steps] == [["a", "b"], ["a", "b"], ["b"], ["b"]]
    assert [items(s.left) for s in steps] == [[], [], ["a"], []]
    assert steps[2].left[0].cancelled is False


def test_cancelled_caller_leaves_at_the_next_step():
    """A caller that closes its stream mid-step is in the next step's `left`, cancelled,
    and gets nothing more; the others go on."""

    async def main():
        script = Script()
        script.hold(1)
        queued = asyncio.Event()

        async def quitter():
            stream = script.generate(("c", 10))
            queued.set()
            token = await anext(stream)
            await script.reached(1)  # step 1 is running (held)
            await stream.aclose()
            return token

        c = asyncio.ensure_future(quitter())
        (a,) = await script.start(("a", 4))
        await queued.wait()
        c_token = await c
        script.release(1)
        return script.steps, c_token, await a

    steps, c_token, a = run(main())
    assert c_token == ("c", 0)
    assert items(steps[1].requests) == ["c", "a"]
    assert items(steps[2].left) == ["c"] and steps[2].left[0].cancelled is True
    assert all("c" not in items(s.requests) for s in steps[2:])
    assert a == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]


def test_joiners_wait_for_room():
    """A full batch admits no one; a queued caller joins at the step after one leaves."""

    async def main():
        script = Script(max_batch_size=2)
        script.hold(0)
        a, b = await script.start(("a", 1), ("b", 3))
        await script.reached(0)
        (c,) = await script.start(("c", 1))
        script.release(0)
        return script.steps, await a, await b, await c

    steps, a, b, c = run(main())
    assert [items(s.requests) for s in steps[:3]] == [["a", "b"], ["a", "b"], ["b", "c"]]
    assert items(steps[2].joined) == ["c"] and items(steps[2].left) == ["a"]
    assert all(len(s.requests) <= 2 for s in steps)
    assert (a, c) == ([("a", 0)], [("c", 2)])


def test_batch_ends_when_everyone_left_and_next_caller_starts_another():
    """With no request left the generator's loop ends; a later caller starts a new batch."""

    async def main():
        script = Script()
        first = await (await script.start(("a", 1)))[0]
        second = await (await script.start(("b", 1)))[0]
        return script, first, second

    script, first, second = run(main())
    assert (first, second) == ([("a", 0)], [("b", 0)])
    assert script.ended == 2
    stats = list(script.generate.stats.recent)
    assert [(s.size, s.steps) for s in stats] == [(1, 2), (1, 2)]


def test_stats_count_joiners():
    """A continuous batch's stats count the callers that joined after it started."""

    async def main():
        script = Script()
        script.hold(0)
        (a,) = await script.start(("a", 2))
        await script.reached(0)
        (b,) = await script.start(("b", 1))
        script.release(0)
        await asyncio.gather(a, b)
        return list(script.generate.stats.recent)

    (stats,) = run(main())
    assert (stats.size, stats.joined, stats.peak_size) == (1, 1, 2)


def test_step_must_be_answered_before_the_next():
    """Asking for the next step without yielding fails every caller with a UsageError."""

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=0, continuous=True)
    async def rude(batch):
        async for step in batch:
            await anext(batch)
            yield [1] * len(step.requests)

    async def main():
        with pytest.raises(UsageError, match="was not answered"):
            async for _ in rude("x"):
                pass
        return True

    assert run(main())


def test_joiners_of_a_busy_model_do_not_starve_another():
    """Once a caller of another model id is overdue, no one joins the running batch:
    it drains, the other model's batch runs, and the late joiner waits its turn."""

    async def main():
        script = Script()
        script.hold(0)
        (a,) = await script.start(("a", 3), model_id="m1")
        await script.reached(0)
        (b,) = await script.start(("b", 1), model_id="m2")  # overdue at once (zero timeout)
        (late,) = await script.start(("late", 1), model_id="m1")
        script.release(0)
        await asyncio.gather(a, b, late)
        return [items(step.requests) for step in script.steps]

    # three batches, one after another: steps restart at index 0 for each
    assert run(main()) == [["a"]] * 4 + [["b"]] * 2 + [["late"]] * 2
