"""The event loop replicas run on: uvloop by default, asyncio's own when asked."""

from __future__ import annotations

import asyncio

import pytest

import streamwise
from streamwise.exceptions import UsageError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@streamwise.deployment
class Counter:
    def __init__(self) -> None:
        self.closed = 0
        self.changed = asyncio.Event()

    async def count(self, n: int):
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0)
        finally:
            self.closed += 1
            self.changed.set()

    async def closed_streams(self, at_least: int) -> int:
        """How many streams have ended, once at least ``at_least`` have."""
        while self.closed < at_least:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)
        return self.closed


@streamwise.deployment
class Loops:
    async def replica_loop(self) -> str:
        """The loop the replica serves its calls on."""
        return await _loop_module()

    def own_loop(self) -> str:
        """The loop user code gets from its own asyncio.run (in a worker thread)."""
        return asyncio.run(_loop_module())


def test_replicas_run_on_uvloop_by_default(serve, monkeypatch):
    monkeypatch.delenv("STREAMWISE_EVENT_LOOP", raising=False)
    handle = serve(Loops.bind())
    assert handle.replica_loop.remote().result().startswith("uvloop")
    # The process-wide policy is untouched: user code's own loops are asyncio's.
    assert handle.own_loop.remote().result().startswith("asyncio")


@pytest.mark.both_transports
def test_asyncio_loop_when_asked(serve, monkeypatch, transport):
    """On asyncio's loop replicas serve as on uvloop: calls, streams, and streams the
    caller leaves early (their generator's finally runs)."""
    monkeypatch.setenv("STREAMWISE_EVENT_LOOP", "asyncio")
    handle = serve(Loops.bind())
    assert handle.replica_loop.remote().result().startswith("asyncio")
    counter = serve(Counter.bind(), name="counter")
    assert list(counter.count.remote(100)) == list(range(100))
    for _ in range(5):
        for _item in counter.count.remote(1_000_000):
            break
    assert counter.closed_streams.remote(6).result() == 6  # each generator's finally ran


def test_open_app_refuses_an_unknown_event_loop_and_can_run_after(monkeypatch):
    monkeypatch.setenv("STREAMWISE_EVENT_LOOP", "trio")

    async def main() -> str:
        with pytest.raises(UsageError, match="STREAMWISE_EVENT_LOOP"):
            async with streamwise.open_app(Loops.bind()):
                pass
        monkeypatch.setenv("STREAMWISE_EVENT_LOOP", "asyncio")
        async with streamwise.open_app(Loops.bind()) as handle:
            return await handle.replica_loop.remote()

    assert asyncio.run(main()).startswith("asyncio")


def test_unknown_event_loop_is_refused_naming_the_variable(serve, monkeypatch):
    monkeypatch.setenv("STREAMWISE_EVENT_LOOP", "trio")
    with pytest.raises(UsageError, match="STREAMWISE_EVENT_LOOP must be one of uvloop, asyncio, got 'trio'"):
        serve(Loops.bind())
    # Nothing was started: the next run, with the variable fixed, serves.
    monkeypatch.setenv("STREAMWISE_EVENT_LOOP", "uvloop")
    assert serve(Loops.bind()).replica_loop.remote().result().startswith("uvloop")
