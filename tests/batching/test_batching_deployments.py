"""@batch inside real deployments, called through handles over gRPC."""

from __future__ import annotations

import asyncio

import streamwise

HUGE_S = 3600.0


class Weighed:
    """batch_size_fn that remembers what it weighed, so a test can wait until callers
    are queued in the replica (event-driven, no sleeps)."""

    def __init__(self) -> None:
        self.seen: list[list] = []
        self.changed = asyncio.Event()

    def __call__(self, items: list) -> int:
        self.seen.append(list(items))
        self.changed.set()
        return len(items)

    async def wait_for(self, items: list) -> None:
        while items not in self.seen:
            self.changed.clear()
            await self.changed.wait()


WEIGHED = Weighed()  # one per replica process (module state on the replica side)


@streamwise.deployment(max_ongoing_requests=16)
class Batched:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list]] = []
        self.cancelled = asyncio.Event()

    @streamwise.batch(max_batch_size=4, batch_wait_timeout_s=HUGE_S)
    async def double(self, items):
        self.batches.append(("", list(items)))
        return [2 * i for i in items]

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S)
    async def by_model(self, items):
        model = streamwise.get_request_context().multiplexed_model_id
        self.batches.append((model, list(items)))
        return [(model, item) for item in items]

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=HUGE_S, batch_size_fn=WEIGHED)
    async def weighed(self, items):
        self.batches.append(("", list(items)))
        return items

    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S)
    async def countdown(self, lengths):
        for step in range(max(lengths)):
            yield [step if step < n else StopIteration() for n in lengths]

    async def submit(self, item):
        """An endpoint that calls a batched helper, noting when its caller cancels."""
        try:
            return await self.weighed(item)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def wait_cancelled(self) -> bool:
        await asyncio.wait_for(self.cancelled.wait(), 10)
        return True

    async def wait_queued(self, items: list) -> bool:
        await asyncio.wait_for(WEIGHED.wait_for(items), 10)
        return True

    async def seen_batches(self) -> list:
        return self.batches

    async def stats(self) -> list[tuple[int, int]]:
        return [(s.size, s.queue_length) for s in self.double.stats.recent]


def test_concurrent_handle_calls_form_one_batch(serve):
    """Four concurrent calls through a handle run as one batch in the replica (size trigger)."""
    handle = serve(Batched.bind())
    responses = [handle.double.remote(i) for i in range(4)]
    assert [r.result(timeout_s=30) for r in responses] == [0, 2, 4, 6]
    assert [(model, sorted(items)) for model, items in handle.seen_batches.remote().result()] == [
        ("", [0, 1, 2, 3])
    ]
    assert handle.stats.remote().result() == [(4, 0)]


def test_batches_never_mix_model_ids(serve):
    """Calls for two multiplexed model ids, interleaved, run in per-model batches."""
    handle = serve(Batched.bind())
    a = handle.options(multiplexed_model_id="a")
    b = handle.options(multiplexed_model_id="b")
    responses = [a.by_model.remote(1), b.by_model.remote(2), a.by_model.remote(3), b.by_model.remote(4)]
    assert [r.result(timeout_s=30) for r in responses] == [("a", 1), ("b", 2), ("a", 3), ("b", 4)]
    seen = sorted((model, sorted(items)) for model, items in handle.seen_batches.remote().result())
    assert seen == [("a", [1, 3]), ("b", [2, 4])]


def test_call_cancelled_while_queued_never_runs(serve):
    """A handle call cancelled while queued in the replica is dropped from its batch."""
    handle = serve(Batched.bind())
    doomed = handle.submit.remote("doomed")
    assert handle.wait_queued.remote(["doomed"]).result(timeout_s=30)
    doomed.cancel()
    assert handle.wait_cancelled.remote().result(timeout_s=30)
    kept = handle.submit.remote("kept")
    assert handle.wait_queued.remote(["kept"]).result(timeout_s=30)  # the doomed caller is gone
    other = handle.submit.remote("other")
    assert [kept.result(timeout_s=30), other.result(timeout_s=30)] == ["kept", "other"]
    assert handle.seen_batches.remote().result() == [("", ["kept", "other"])]


def test_streaming_batch_through_handles(serve):
    """Concurrent streams of one streaming batch each get their own elements and end on time."""
    handle = serve(Batched.bind())
    streams = [handle.countdown.remote(n) for n in (1, 3, 2)]
    assert [list(s) for s in streams] == [[0], [0, 1, 2], [0, 1]]


@streamwise.deployment(max_ongoing_requests=8, user_config={"max_batch_size": 2})
class Tunable:
    @streamwise.batch(max_batch_size=100, batch_wait_timeout_s=HUGE_S)
    async def sizes(self, items):
        return [len(items)] * len(items)

    def reconfigure(self, config: dict) -> None:
        self.sizes.set_max_batch_size(config["max_batch_size"])


def test_reconfigure_sets_batch_knobs(serve):
    """user_config applied in reconfigure() changes max_batch_size in the replica."""
    handle = serve(Tunable.bind())
    responses = [handle.sizes.remote(i) for i in range(2)]
    assert [r.result(timeout_s=30) for r in responses] == [2, 2]


@streamwise.deployment(max_ongoing_requests=8)
class Tokens:
    def __init__(self) -> None:
        self.left: dict[str, bool] = {}
        self.changed = asyncio.Event()
        self.finalized = asyncio.Event()

    @streamwise.batch(max_batch_size=4, batch_wait_timeout_s=0, continuous=True)
    async def generate(self, batch: streamwise.ContinuousBatch):
        try:
            async for step in batch:
                for request in step.left:
                    self.left[request.item] = request.cancelled
                    self.changed.set()
                yield [f"{request.item}{step.index}" for request in step.requests]
                await asyncio.sleep(0.001)  # a model step takes time
        finally:
            self.finalized.set()

    async def wait_left(self, name: str) -> bool:
        while name not in self.left:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)
        return self.left[name]

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True


def test_continuous_batch_sees_a_cancelled_caller_leave(serve):
    """A caller that closes its stream leaves the continuous batch as cancelled; the
    others keep streaming; when the last one goes, the generator's finally runs."""
    handle = serve(Tokens.bind())
    stay = handle.generate.remote("s")
    quit_ = handle.generate.remote("q")
    assert next(stay).startswith("s") and next(quit_).startswith("q")
    quit_.close()
    assert handle.wait_left.remote("q").result(timeout_s=30) is True
    assert next(stay).startswith("s")
    stay.close()
    assert handle.wait_finalized.remote().result(timeout_s=30)

