"""@batch on coroutines, standalone (one event loop, no deployment): forming and running batches."""

from __future__ import annotations

import asyncio

import pytest

import streamwise
from streamwise.actors._methods import MethodKind, kind_of
from streamwise.exceptions import UsageError

HUGE_S = 3600.0  # a timeout no test reaches: batches must form by size


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Seen:
    """A batch_size_fn that counts items and lets a test wait until the queue held some."""

    def __init__(self) -> None:
        self.looked_at: list[list] = []
        self._waiters: list[tuple[list, asyncio.Event]] = []

    def __call__(self, items: list) -> int:
        self.looked_at.append(list(items))
        for wanted, event in self._waiters:
            if items == wanted:
                event.set()
        return len(items)

    async def queued(self, items: list) -> None:
        """Wait until the dispatcher has weighed exactly ``items`` as a batch."""
        event = asyncio.Event()
        self._waiters.append((items, event))
        if items in self.looked_at:
            event.set()
        await event.wait()


def test_full_batch_runs_without_waiting_for_timeout():
    """With a huge timeout, batches run as soon as they hold max_batch_size callers."""
    calls = []

    @streamwise.batch(max_batch_size=4, batch_wait_timeout_s=HUGE_S)
    async def double(items):
        calls.append(items)
        return [i * 2 for i in items]

    async def main():
        return await asyncio.gather(*(double(i) for i in range(8)))

    assert run(main()) == [i * 2 for i in range(8)]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_zero_timeout_runs_a_lone_caller():
    """With batch_wait_timeout_s=0 a lone caller runs at once in a batch of one."""

    @streamwise.batch(max_batch_size=100, batch_wait_timeout_s=0)
    async def echo(items):
        return items

    assert run(echo("x")) == "x"
    assert [s.size for s in echo.stats.recent] == [1]


def test_partial_batch_waits_for_more_callers():
    """Below max_batch_size and before the timeout, queued callers wait for others."""
    seen = Seen()
    calls = []

    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S, batch_size_fn=seen)
    async def echo(items):
        calls.append(items)
        return items

    async def main():
        first = asyncio.ensure_future(echo("a"))
        await seen.queued(["a"])
        rest = [asyncio.ensure_future(echo(x)) for x in ("b", "c")]
        return await asyncio.gather(first, *rest)

    assert run(main()) == ["a", "b", "c"]
    assert calls == [["a", "b", "c"]]


def test_wrong_result_length_fails_every_caller():
    """A result list of the wrong length fails every caller with a clear UsageError."""

    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S)
    async def short(items):
        return items[:-1]

    async def main():
        return await asyncio.gather(*(short(i) for i in range(3)), return_exceptions=True)

    errors = run(main())
    assert all(isinstance(e, UsageError) for e in errors)
    assert "one element per caller" in str(errors[0]) and "got 2 elements for a batch of 3" in str(errors[0])


def test_non_list_result_fails_every_caller():
    """A result that is not a list (here a dict) fails every caller, naming its type."""

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def bad(items):
        return {i: i for i in items}

    async def main():
        return await asyncio.gather(bad(1), bad(2), return_exceptions=True)

    errors = run(main())
    assert all(isinstance(e, UsageError) and "not dict" in str(e) for e in errors)


def test_exception_reaches_every_caller_of_that_batch_only():
    """An exception raised by the function reaches every caller of its batch; the next batch runs."""

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def check(items):
        if any(i < 0 for i in items):
            raise ValueError(f"negative in {items}")
        return items

    async def main():
        return await asyncio.gather(*(check(i) for i in (-1, 2, 3, 4)), return_exceptions=True)

    first, second, third, fourth = run(main())
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert "negative in [-1, 2]" in str(first)
    assert (third, fourth) == (3, 4)


def test_caller_cancelled_while_queued_is_dropped():
    """A caller cancelled while queued never reaches the function; the others still batch."""
    seen = Seen()
    calls = []

    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S, batch_size_fn=seen)
    async def echo(items):
        calls.append(items)
        return items

    async def main():
        a, b = asyncio.ensure_future(echo("a")), asyncio.ensure_future(echo("b"))
        await seen.queued(["a", "b"])
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        return await asyncio.gather(b, echo("c"), echo("d"))

    assert run(main()) == ["b", "c", "d"]
    assert calls == [["b", "c", "d"]]


def test_batch_size_fn_budget():
    """With batch_size_fn a batch is full at the budget; an item that does not fit waits."""

    @streamwise.batch(max_batch_size=10, batch_wait_timeout_s=HUGE_S, batch_size_fn=sum)
    async def weigh(items):
        return [list(items)] * len(items)

    async def main():
        return await asyncio.gather(*(weigh(w) for w in (4, 4, 4, 6)))

    assert run(main()) == [[4, 4], [4, 4], [4, 6], [4, 6]]


def test_item_over_budget_runs_alone():
    """An item whose own size exceeds the budget still runs, in a batch of its own."""

    @streamwise.batch(max_batch_size=10, batch_wait_timeout_s=0, batch_size_fn=sum)
    async def weigh(items):
        return [len(items)] * len(items)

    async def main():
        return await asyncio.gather(weigh(50), weigh(1))

    assert run(main()) == [1, 1]


def test_max_concurrent_batches():
    """max_concurrent_batches=2 lets two batches run at once; 1 never does."""

    def make(limit: int):
        state = {"running": 0, "peak": 0}
        both = asyncio.Event()

        @streamwise.batch(max_batch_size=1, batch_wait_timeout_s=HUGE_S, max_concurrent_batches=limit)
        async def work(items):
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            if state["running"] == 2:
                both.set()
            if limit == 2:
                await both.wait()  # only returns if the two batches overlap
            else:
                await asyncio.sleep(0)
            state["running"] -= 1
            return items

        return work, state

    async def main(limit: int):
        work, state = make(limit)
        assert await asyncio.gather(*(work(i) for i in range(4))) == [0, 1, 2, 3]
        return state["peak"]

    assert run(main(2)) == 2
    assert run(main(1)) == 1


class Model:
    def __init__(self, name: str) -> None:
        self.name = name

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def tag(self, items):
        return [(self.name, item, len(items)) for item in items]


def test_queues_are_per_instance():
    """Calls on two instances never share a batch: each batch holds one instance's callers."""

    async def main():
        a, b = Model("a"), Model("b")
        return await asyncio.gather(a.tag(1), b.tag(2), a.tag(3), b.tag(4))

    assert run(main()) == [("a", 1, 2), ("b", 2, 2), ("a", 3, 2), ("b", 4, 2)]


def test_method_kinds_are_declared():
    """The replica sees a batched coroutine as 'async' and a batched generator as 'async_gen'."""

    @streamwise.deployment
    class D:
        @streamwise.batch
        async def one(self, items):
            return items

        @streamwise.batch
        async def many(self, items):
            yield items

    assert D.methods == {"one": MethodKind.ASYNC, "many": MethodKind.ASYNC_GEN}
    assert kind_of(Model.tag) is MethodKind.ASYNC


def test_set_max_batch_size_applies_to_a_waiting_batch():
    """Lowering max_batch_size at run time makes a waiting batch that is now full run."""
    seen = Seen()
    calls = []

    @streamwise.batch(max_batch_size=10, batch_wait_timeout_s=HUGE_S, batch_size_fn=seen)
    async def echo(items):
        calls.append(items)
        return items

    async def main():
        waiting = [asyncio.ensure_future(echo(x)) for x in "ab"]
        await seen.queued(["a", "b"])
        echo.set_max_batch_size(2)
        return await asyncio.gather(*waiting)

    assert run(main()) == ["a", "b"]
    assert calls == [["a", "b"]]
    assert echo.get_max_batch_size() == 2


def test_set_batch_wait_timeout_applies_to_a_waiting_batch():
    """Setting batch_wait_timeout_s to 0 at run time runs a waiting partial batch."""
    seen = Seen()

    @streamwise.batch(max_batch_size=10, batch_wait_timeout_s=HUGE_S, batch_size_fn=seen)
    async def echo(items):
        return items

    async def main():
        waiting = asyncio.ensure_future(echo("a"))
        await seen.queued(["a"])
        echo.set_batch_wait_timeout_s(0)
        return await waiting

    assert run(main()) == "a"
    assert echo.get_batch_wait_timeout_s() == 0


def test_setters_validate():
    """Runtime setters reject bad values with a UsageError naming the knob."""

    @streamwise.batch
    async def echo(items):
        return items

    with pytest.raises(UsageError, match="max_batch_size"):
        echo.set_max_batch_size(0)
    with pytest.raises(UsageError, match="batch_wait_timeout_s"):
        echo.set_batch_wait_timeout_s(-1)
    assert (echo.get_max_batch_size(), echo.get_batch_wait_timeout_s()) == (10, 0.01)


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"batch_wait_timeout_s": -0.1}, "batch_wait_timeout_s"),
        ({"batch_wait_timeout_s": float("inf")}, "batch_wait_timeout_s"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
        ({"batch_size_fn": 3}, "batch_size_fn"),
        ({"continuous": "yes"}, "continuous"),
    ],
)
def test_knobs_validated_when_applied(knobs, named):
    """A bad knob fails when the decorator is applied, with a UsageError naming it."""
    with pytest.raises(UsageError, match=named):
        streamwise.batch(**knobs)


def test_misuse_rejected_when_applied():
    """@batch rejects sync functions, wrong signatures and continuous coroutines at once."""
    with pytest.raises(UsageError, match="async def"):

        @streamwise.batch
        def sync(items):
            return items

    with pytest.raises(UsageError, match="one argument"):

        @streamwise.batch
        async def two(a, b, c):
            return a

    with pytest.raises(UsageError, match=r"continuous=True\) needs an async generator"):

        @streamwise.batch(continuous=True)
        async def coro(items):
            return items


def test_stats_record_each_batch():
    """Each batch records its size, wait and the queue length it left; listeners see it."""
    heard = []

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def echo(items):
        return items

    echo.stats.add_listener(heard.append)

    async def main():
        return await asyncio.gather(*(echo(i) for i in range(5)))

    assert run(main()) == [0, 1, 2, 3, 4]
    recent = list(echo.stats.recent)
    assert [s.size for s in recent] == [2, 2, 1]
    assert [s.queue_length for s in recent] == [3, 1, 0]
    assert all(s.wait_s >= 0 and s.duration_s >= 0 and s.steps == 1 for s in recent)
    assert heard == recent
    assert (echo.stats.batches, echo.stats.items) == (3, 5)


def test_listener_failure_does_not_fail_the_batch(caplog):
    """A stats listener that raises is logged; callers still get their results."""

    @streamwise.batch(max_batch_size=1, batch_wait_timeout_s=0)
    async def echo(items):
        return items

    def broken(stats):
        raise RuntimeError("listener broke")

    echo.stats.add_listener(broken)
    assert run(echo(7)) == 7
    assert "listener broke" in caplog.text


def test_no_task_left_once_every_queued_caller_cancelled():
    """When every queued caller is cancelled, the queue's dispatcher ends (no stray task)."""
    seen = Seen()

    @streamwise.batch(max_batch_size=10, batch_wait_timeout_s=HUGE_S, batch_size_fn=seen)
    async def echo(items):
        return items

    async def main():
        waiting = asyncio.ensure_future(echo("a"))
        await seen.queued(["a"])
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        dispatchers = {t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("._dispatch")}
        if dispatchers:  # it may have ended already; if not, it must end on its own
            await asyncio.wait(dispatchers, timeout=10)
        return [t for t in dispatchers if not t.done()]

    assert run(main()) == []
