"""request_timeout_s on handles, and deadlines inherited by the calls made while serving."""

from __future__ import annotations

import asyncio

import pytest

import streamwise
from streamwise.exceptions import RequestTimeoutError


@streamwise.deployment(max_ongoing_requests=8)
class Back:
    def __init__(self):
        self.finalized = asyncio.Event()

    async def slow(self) -> str:
        try:
            await asyncio.sleep(3600)
            return "late"
        finally:
            self.finalized.set()

    async def trickle(self):
        try:
            for i in range(1_000_000):
                yield i
                await asyncio.sleep(0.01)
        finally:
            self.finalized.set()

    async def quick(self) -> str:
        return "quick"

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True


@streamwise.deployment
class Front:
    def __init__(self, back):
        self.back = back
        self.outcome: asyncio.Future[str] | None = None

    async def start(self) -> str:
        """Call Back in a task that outlives this call (it inherits this call's deadline)."""

        async def downstream() -> str:
            try:
                return await self.back.options(request_timeout_s=3600).slow.remote()
            except RequestTimeoutError as exc:
                return f"timed out: {exc}"

        self.outcome = asyncio.ensure_future(downstream())
        return "started"

    async def result(self) -> str:
        assert self.outcome is not None
        return await asyncio.wait_for(self.outcome, 30)


def test_a_unary_call_past_its_timeout_raises_and_is_cancelled(serve):
    """A call past request_timeout_s raises RequestTimeoutError naming it, and the
    replica's method is cancelled (its finally runs); the handle keeps working."""
    handle = serve(Back.bind())
    with pytest.raises(RequestTimeoutError, match=r"Back\.slow"):
        handle.options(request_timeout_s=0.2).slow.remote().result()
    assert handle.wait_finalized.remote().result()
    assert handle.options(request_timeout_s=10).quick.remote().result() == "quick"


def test_a_stream_past_its_timeout_raises_after_its_items(serve):
    """A stream gets its items until the deadline, then RequestTimeoutError; the
    remote generator's finally runs."""
    handle = serve(Back.bind())
    seen = []
    with pytest.raises(RequestTimeoutError):
        for item in handle.options(request_timeout_s=0.3).trickle.remote():
            seen.append(item)
    assert seen and seen == list(range(len(seen)))
    assert handle.wait_finalized.remote().result()


def test_calls_made_while_serving_inherit_the_deadline(serve):
    """A downstream call with a long timeout of its own still ends at its caller's
    deadline: the caller's 0.3 s, not its own hour."""
    handle = serve(Front.bind(Back.bind()))
    assert handle.options(request_timeout_s=0.3).start.remote().result() == "started"
    outcome = handle.result.remote().result()
    assert outcome.startswith("timed out") and "Back.slow" in outcome


def test_request_timeout_is_validated():
    """A timeout that is not a positive number is refused when the handle is made."""
    with pytest.raises(streamwise.exceptions.UsageError, match="request_timeout_s"):
        streamwise.HandleOptions(request_timeout_s=0)
