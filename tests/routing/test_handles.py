"""Handles, responses and the router against real replicas."""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest

import streamwise
from streamwise.exceptions import (
    RemoteError,
    RequestTimeoutError,
    SerializationError,
    UnknownMethodError,
    UsageError,
)

pytestmark = pytest.mark.both_transports


@streamwise.deployment(num_replicas=2, max_ongoing_requests=2)
class Echo:
    def __init__(self):
        self.running = 0
        self.peak = 0
        self.gate = asyncio.Event()

    async def __call__(self, value):
        return value

    async def held(self, value):
        """Count concurrent calls; hold each until the replica has been full once."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running >= 2:
            self.gate.set()
        try:
            await self.gate.wait()
            return value
        finally:
            self.running -= 1

    async def peak_concurrency(self) -> int:
        return self.peak

    async def pid(self) -> int:
        return os.getpid()

    async def fail(self):
        raise KeyError("missing thing")

    async def context(self) -> dict:
        ctx = streamwise.get_request_context()
        return {
            "request_id": ctx.request_id,
            "deployment": ctx.deployment,
            "replica_id": ctx.replica_id,
            "model": ctx.multiplexed_model_id,
            "session": ctx.session_id,
        }

    async def count_up(self, n):
        for i in range(n):
            yield i

    async def add(self, a, b):
        return a + b


@streamwise.deployment
class Doubler:
    async def __call__(self, x: int) -> int:
        return 2 * x


def test_unknown_method_raises_at_once(serve):
    """Asking for a method the deployment lacks fails at the call site, with both names."""
    handle = serve(Echo.bind())
    with pytest.raises(UnknownMethodError) as info:
        handle.nope.remote()
    assert "Echo" in str(info.value) and "nope" in str(info.value)
    assert "held" in str(info.value)  # the available methods are listed


def test_codec_error_at_call_site(serve):
    """A value the chosen codec cannot encode raises where remote() is called."""
    handle = serve(Echo.bind())
    with pytest.raises(SerializationError, match="msgpack"):
        handle.options(request_serialization="msgpack").remote(object())
    assert handle.remote(1).result() == 1  # and the handle still works


@pytest.mark.parametrize("codec", ["cloudpickle", "pickle", "msgpack", "orjson"])
def test_codecs_per_handle(serve, codec):
    """Every codec carries requests and responses when chosen on the handle."""
    handle = serve(Echo.bind()).options(request_serialization=codec, response_serialization=codec)
    assert handle.remote({"a": [1, 2, "x"]}).result() == {"a": [1, 2, "x"]}


def test_user_exception_carries_type_message_traceback(serve):
    """An exception in user code reaches the caller as RemoteError with its details."""
    handle = serve(Echo.bind())
    with pytest.raises(RemoteError) as info:
        handle.fail.remote().result()
    assert info.value.remote_type == "KeyError"
    assert "missing thing" in info.value.remote_message
    assert "in fail" in info.value.remote_traceback
    assert handle.remote("ok").result() == "ok"


def test_router_holds_calls_beyond_max_ongoing(serve):
    """One caller never sends a replica more than max_ongoing_requests calls at once.

    ``held`` calls wait until the replica is full (two running); the other four wait in
    the router until a slot frees, and all six complete.
    """
    handle = serve(Echo.options(num_replicas=1, max_ongoing_requests=2).bind())
    pending = [handle.held.remote(i) for i in range(6)]
    assert [p.result(timeout_s=60) for p in pending] == list(range(6))
    assert handle.peak_concurrency.remote().result() == 2


@streamwise.deployment(num_replicas=2, max_ongoing_requests=16)
class Fan:
    def __init__(self, echo: streamwise.DeploymentHandle):
        self.echo = echo

    async def __call__(self, i: int):
        return await self.echo.held.remote(i)

    async def peak(self) -> int:
        return await self.echo.peak_concurrency.remote()


def test_full_replica_rejects_and_router_retries(serve):
    """A replica rejects calls beyond max_ongoing_requests; other routers retry them.

    Two Fan replicas (two routers) each send up to two calls to one Echo replica that
    admits two at a time, so some calls are rejected and must be retried to finish.
    """
    handle = serve(Fan.bind(Echo.options(num_replicas=1, max_ongoing_requests=2).bind()))
    pending = [handle.remote(i) for i in range(6)]
    assert [p.result(timeout_s=60) for p in pending] == list(range(6))
    assert handle.peak.remote().result() == 2


def test_response_as_argument_is_resolved(serve):
    """A DeploymentResponse passed to another call arrives as its value."""
    echo = serve(Echo.bind())
    double = streamwise.run(Doubler.bind(), name="doubler")
    first = double.remote(5)
    assert echo.add.remote(first, 1).result() == 11


def test_request_context_visible_in_replica(serve):
    """User code reads the request id, deployment and replica id of the call it serves."""
    handle = serve(Echo.bind())
    ctx = handle.context.remote().result()
    assert ctx["deployment"] == "Echo"
    assert ctx["replica_id"].startswith("Echo#")
    assert len(ctx["request_id"]) == 16
    tagged = handle.options(multiplexed_model_id="m-7", session_id="s-1")
    ctx = tagged.context.remote().result()
    assert (ctx["model"], ctx["session"]) == ("m-7", "s-1")


def test_stream_option_overrides_method_kind(serve):
    """stream=False collects a generator method into one list result."""
    handle = serve(Echo.bind())
    assert list(handle.count_up.remote(3)) == [0, 1, 2]
    assert handle.options(method_name="count_up", stream=False).remote(3).result() == [0, 1, 2]


def test_power_of_two_choices_uses_every_replica(serve):
    """Concurrent calls spread over both replicas."""
    handle = serve(Echo.bind())

    async def main():
        return await asyncio.gather(*(handle.pid.remote() for _ in range(40)))

    assert len(set(asyncio.run(main()))) == 2


def test_result_inside_event_loop_is_refused(serve):
    """Calling .result() on the loop that runs the call raises instead of deadlocking."""
    handle = serve(Echo.bind())

    async def main():
        response = handle.remote(1)
        with pytest.raises(UsageError, match="await"):
            response.result()
        return await response

    assert asyncio.run(main()) == 1


def test_result_timeout(serve):
    """result(timeout_s) raises RequestTimeoutError when the call is not done in time."""
    handle = serve(Echo.bind())
    pending = handle.held.remote("x")
    with pytest.raises(RequestTimeoutError):
        pending.result(timeout_s=0)
    pending.cancel()


def test_handles_pickle(serve):
    """A handle survives pickling (it is how handles reach other deployments)."""
    handle = serve(Echo.bind())
    copy = pickle.loads(pickle.dumps(handle.options(method_name="add")))
    assert copy.remote(2, 3).result() == 5
