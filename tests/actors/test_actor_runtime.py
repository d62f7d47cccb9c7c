"""The actor runtime end to end: real replica processes, real gRPC on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import psutil
import pytest

import streamwise
from streamwise.exceptions import DeploymentStartupError, UsageError


@streamwise.deployment(num_replicas=2, max_ongoing_requests=16)
class Tokenizer:
    async def __call__(self, text: str) -> list[str]:
        return text.split()

    async def stream(self, text: str):
        for word in text.split():
            yield word


@streamwise.deployment
class Model:
    def __init__(self, tokenizer: streamwise.DeploymentHandle):
        self.tokenizer = tokenizer

    async def generate(self, prompt: str):
        async for word in self.tokenizer.stream.remote(prompt):
            yield word.upper()

    async def tokens(self, prompt: str) -> list[str]:
        return await self.tokenizer.remote(prompt)

    def count(self, prompt: str) -> int:
        return len(prompt.split())

    def pid(self) -> int:
        return os.getpid()


def test_issue_example_sync(serve):
    """The example from the docs works from sync code: stream, unary and sync method."""
    handle = serve(Model.bind(Tokenizer.bind()))
    assert list(handle.generate.remote("a b c")) == ["A", "B", "C"]
    assert handle.count.remote("a b").result() == 2
    assert handle.tokens.remote("x y").result() == ["x", "y"]


def test_same_handles_from_async_code(serve):
    """The same handles work with await and async for inside the caller's event loop."""
    handle = serve(Model.bind(Tokenizer.bind()))

    async def main():
        words = [w async for w in handle.generate.remote("d e")]
        count = await handle.count.remote("a b c")
        return words, count

    assert asyncio.run(main()) == (["D", "E"], 3)


def test_replicas_are_separate_processes(serve):
    """Every replica is its own OS process, a child of the driver."""
    handle = serve(Model.options(num_replicas=2).bind(Tokenizer.bind()))
    pids = {handle.pid.remote().result() for _ in range(20)}
    children = {p.pid for p in psutil.Process().children()}
    assert os.getpid() not in pids
    assert pids <= children
    assert len(children) == 4  # 2 Model + 2 Tokenizer


@streamwise.deployment
async def shout(text: str) -> str:
    return text.upper() + "!"


def test_function_deployment(serve):
    """@deployment on an async function serves it as the handle's __call__."""
    handle = serve(shout.bind())
    assert handle.remote("hi").result() == "HI!"


@streamwise.deployment(user_config={"greeting": "hello"})
class Greeter:
    def __init__(self):
        self.greeting = None

    def reconfigure(self, config):
        self.greeting = config["greeting"]

    async def greet(self, name: str) -> str:
        return f"{self.greeting} {name}"


def test_user_config_reaches_reconfigure(serve):
    """user_config is delivered to reconfigure() before the replica serves."""
    handle = serve(Greeter.bind())
    assert handle.greet.remote("ada").result() == "hello ada"
    handle = serve(Greeter.options(user_config={"greeting": "hi"}).bind(), name="other")
    assert handle.greet.remote("bob").result() == "hi bob"


@streamwise.deployment(max_constructor_attempts=2)
class Broken:
    def __init__(self):
        raise RuntimeError("weights missing")


def test_constructor_failure_raises_user_error(serve):
    """A constructor that keeps raising makes run() raise with type, message, traceback."""
    with pytest.raises(DeploymentStartupError) as info:
        serve(Broken.bind())
    err = info.value
    assert err.remote_type == "RuntimeError"
    assert "weights missing" in err.remote_message
    assert f'File "{__file__}"' in err.remote_traceback
    assert 'raise RuntimeError("weights missing")' in err.remote_traceback
    assert err.deployment == "Broken"
    assert not psutil.Process().children(), "failed app left replicas running"


@streamwise.deployment(max_constructor_attempts=2)
class Vanishing:
    def __init__(self):
        print("no GPU on this node", file=sys.stderr, flush=True)
        os._exit(3)  # gone without an exception to report: as a failure outside user code


def test_a_replica_that_exits_before_it_is_ready_shows_what_it_printed(serve):
    """A replica process that exits without reporting an error (a failure outside the
    constructor, say binding its port) fails run() with what it last wrote to stderr."""
    with pytest.raises(DeploymentStartupError) as info:
        serve(Vanishing.bind())
    err = info.value
    assert err.remote_type == "ProcessExited" and err.deployment == "Vanishing"
    assert "exited before it was ready (2 attempts)" in err.remote_message
    assert "no GPU on this node" in err.remote_traceback
    assert "no GPU on this node" in str(err)


def test_shutdown_leaves_no_process(serve):
    """shutdown() stops every replica process (the fixture also checks threads)."""
    serve(Model.bind(Tokenizer.bind()))
    children = psutil.Process().children()
    assert len(children) == 3
    streamwise.shutdown()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    streamwise.shutdown()  # idempotent


def test_calls_after_shutdown_fail_clearly(serve):
    """Using a handle after shutdown raises a clear error rather than hanging."""
    handle = serve(shout.bind())
    streamwise.shutdown()
    with pytest.raises(UsageError, match="not running"):
        handle.remote("x")


@pytest.mark.both_transports
def test_killed_replica_is_restarted(serve):
    """A replica killed with SIGKILL is replaced, and calls keep succeeding."""
    handle = serve(Model.bind(Tokenizer.bind()))
    pid = handle.pid.remote().result()
    os.kill(pid, signal.SIGKILL)
    new_pid = handle.pid.remote().result(timeout_s=30)
    assert new_pid != pid
    assert list(handle.generate.remote("still here")) == ["STILL", "HERE"]


@streamwise.deployment(health_check_period_s=0.1, health_check_timeout_s=5)
class Fragile:
    def __init__(self):
        self.sick = False

    async def break_me(self) -> None:
        self.sick = True

    async def check_health(self):
        if self.sick:
            raise RuntimeError("sick")

    async def pid(self) -> int:
        return os.getpid()


def test_failed_health_check_replaces_replica(serve):
    """A replica whose check_health() raises is killed and replaced."""
    handle = serve(Fragile.bind())
    pid = handle.pid.remote().result()
    handle.break_me.remote().result()
    _wait_gone(pid)
    assert handle.pid.remote().result(timeout_s=30) != pid


def _wait_gone(pid: int) -> None:
    """Wait (bounded by the test timeout) until ``pid`` has exited, without reaping it."""
    import time

    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)


@streamwise.deployment(graceful_shutdown_timeout_s=30)
class Slow:
    def __init__(self):
        self.gate = asyncio.Event()

    async def wait_gate(self) -> str:
        await self.gate.wait()
        return "finished"

    async def open_gate(self) -> None:
        self.gate.set()


def test_graceful_shutdown_lets_running_calls_finish(serve):
    """On shutdown a replica refuses new calls but finishes the ones it is running."""
    handle = serve(Slow.options(max_ongoing_requests=4).bind())
    pending = handle.wait_gate.remote()
    ready = handle.open_gate  # bound now; the call happens after shutdown started
    import threading

    results = []
    stopper = threading.Thread(target=lambda: results.append(streamwise.shutdown()))
    # the call is in flight; open the gate, then shut down while it completes
    ready.remote().result()
    stopper.start()
    assert pending.result(timeout_s=30) == "finished"
    stopper.join(30)
    assert not stopper.is_alive()


def _no_children_left() -> None:
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
    assert not alive, f"processes left: {alive}"


def test_open_app_runs_on_the_callers_loop(serve):
    """open_app serves handles on the caller's loop and stops everything on exit."""

    async def main():
        async with streamwise.open_app(Model.bind(Tokenizer.bind())) as handle:
            words = [w async for w in handle.generate.remote("p q")]
            count = await handle.count.remote("a b c")
            # sync callers on other threads still reach it
            threaded = await asyncio.to_thread(lambda: handle.count.remote("x").result())
            assert len(psutil.Process().children()) == 3
        return words, count, threaded

    assert asyncio.run(main()) == (["P", "Q"], 3, 1)
    _no_children_left()


def test_open_app_cleans_up_on_error_and_refuses_run(serve):
    """Leaving open_app by an exception stops its replicas; run() inside it is refused."""

    async def main():
        async with streamwise.open_app(shout.bind()) as handle:
            assert await handle.remote("x") == "X!"
            with pytest.raises(UsageError, match="already runs"):
                streamwise.run(shout.bind(), name="other")
            raise KeyError("user error")

    with pytest.raises(KeyError):
        asyncio.run(main())
    _no_children_left()


def test_run_again_under_the_same_name_replaces_the_app(serve):
    """run() with a name in use replaces that app, and the new handle works."""
    first = serve(shout.bind(), name="same")
    assert first.remote("a").result() == "A!"
    second = serve(shout.bind(), name="same")
    assert second.remote("b").result(timeout_s=30) == "B!"
