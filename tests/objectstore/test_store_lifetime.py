"""Lifetime of stored values: freed once unused, reclaimed after crashes, never leaked."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import streamwise

MB = 1_000_000  # above the default by-reference threshold (100 KiB)


def session_files(sessions: str, kind: str = "") -> list[str]:
    """Files of the store sessions matching ``sessions`` (of one kind: "o" segments, "n" pins);
    without a kind, their directories too."""
    if kind:
        return sorted(glob.glob(f"/dev/shm/{sessions}/{kind}-*"))
    return sorted(glob.glob(f"/dev/shm/{sessions}") + glob.glob(f"/dev/shm/{sessions}/*"))


def segments() -> list[str]:
    return session_files(f"streamwise-{os.getpid()}-*", "o")


def pins() -> list[str]:
    return session_files(f"streamwise-{os.getpid()}-*", "n")


@streamwise.deployment(max_ongoing_requests=8)
class Producer:
    def __init__(self):
        self.gate = asyncio.Event()
        self.finalized = asyncio.Event()
        self.kept = None

    async def gated(self, n: int):
        """One large item, then another once open_gate() is called."""
        try:
            yield b"1" * n
            await self.gate.wait()
            yield b"2" * n
        finally:
            self.finalized.set()

    async def open_gate(self) -> None:
        self.gate.set()

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True

    async def keep(self, n: int) -> int:
        """Store a value only this replica holds; return the pid."""
        self.kept = streamwise.put(b"k" * n)
        return os.getpid()

    async def make(self, n: int) -> bytes:
        return b"m" * n

    async def pid(self) -> int:
        return os.getpid()


def test_stream_items_freed_once_consumed(serve):
    """Each large stream item occupies shared memory only until the consumer drops it."""
    handle = serve(Producer.bind())
    stream = handle.gated.remote(MB)
    first = next(stream)
    assert bytes(first[:1]) == b"1" and len(segments()) == 1 and pins() == []
    del first
    assert segments() == []
    handle.open_gate.remote().result()
    second = next(stream)
    assert bytes(second[:1]) == b"2" and len(segments()) == 1
    del second
    assert list(stream) == [] and segments() == []


def test_cancelled_stream_leaves_nothing(serve):
    """Closing a stream early leaves no segment or pin once its items are dropped."""
    handle = serve(Producer.bind())
    stream = handle.gated.remote(MB)
    first = next(stream)
    stream.close()
    assert handle.wait_finalized.remote().result()
    del first
    assert segments() == [] and pins() == []


def test_killed_replica_memory_is_reclaimed(serve):
    """What only a SIGKILLed replica held is freed before its replacement serves."""
    handle = serve(Producer.bind())
    pid = handle.keep.remote(MB).result()
    assert segments()
    os.kill(pid, signal.SIGKILL)
    assert handle.pid.remote().result() != pid  # served by the replacement
    assert segments() == []


def test_result_outlives_the_replica_that_made_it(serve):
    """A result stays readable after its producer dies, and is freed when dropped."""
    handle = serve(Producer.bind())
    value = handle.make.remote(MB).result()
    os.kill(handle.pid.remote().result(), signal.SIGKILL)
    assert handle.pid.remote().result()  # the replacement is up: reclaim has run
    assert isinstance(value, memoryview) and value == b"m" * MB and segments()
    del value
    assert segments() == []


DRIVER = textwrap.dedent(
    """
    import os, sys
    import streamwise
    from streamwise.objectstore import session_name

    @streamwise.deployment
    class Holder:
        def __init__(self):
            self.kept = streamwise.put(b"h" * 1_000_000)

        def pid(self):
            return os.getpid()

    handle = streamwise.run(Holder.bind())
    kept = streamwise.put(b"d" * 1_000_000)
    print(session_name(), handle.pid.remote().result(), flush=True)
    sys.stdin.read()  # until killed
    """
)


def _wait_gone(pid: int) -> None:
    try:
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass  # already gone


@pytest.fixture
def start_driver():
    """Start driver processes (one replica each, each holding a stored value); yields a
    function returning (driver, session name, replica pid). Kills whatever is left."""
    started: list[tuple[subprocess.Popen, int]] = []

    def start() -> tuple[subprocess.Popen, str, int]:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        started.append((proc, 0))
        name, replica = proc.stdout.readline().split()
        started[-1] = (proc, int(replica))
        assert session_files(name, "o")
        return proc, name, int(replica)

    yield start
    for proc, replica in started:
        if replica:
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica, signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_killed_driver_leaves_nothing(start_driver):
    """After SIGKILL of the driver, its last replica to exit deletes the session's memory."""
    proc, name, replica = start_driver()
    proc.kill()
    proc.wait()
    _wait_gone(replica)  # signalled by the kernel when its parent died
    assert session_files(name) == []


def _stale_session(start_driver) -> str:
    """A session whose driver and replica were both SIGKILLed: nobody left to clean."""
    proc, name, replica = start_driver()
    # Stopped, the replica can neither clean up when its driver dies nor be seen dead
    # (and restarted) by its controller; the driver goes first, then the replica.
    os.kill(replica, signal.SIGSTOP)
    proc.kill()
    proc.wait()
    os.kill(replica, signal.SIGKILL)
    _wait_gone(replica)
    assert session_files(name, "o")
    return name


def test_cleanup_command_removes_stale_sessions(start_driver):
    """`streamwise cleanup` deletes the memory of sessions whose processes are all dead."""
    name = _stale_session(start_driver)
    out = subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "cleanup"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and name in out.stdout
    assert session_files(name) == []


def test_next_start_removes_stale_sessions(start_driver, serve):
    """Starting a store session deletes stale ones left by killed drivers."""
    name = _stale_session(start_driver)
    streamwise.put(1)
    assert session_files(name) == []
