"""The same-node transport: replicas on this machine are called over a Unix socket."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import psutil
import pytest

import streamwise
from streamwise.actors._runtime import RUNTIME
from streamwise.routing import local_transport
from streamwise.streaming import _local_wire as lw

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peer credentials are Linux-only")


@streamwise.deployment
class Echo:
    async def __call__(self, value):
        return value

    async def count(self, n):
        for i in range(n):
            yield i

    async def pid(self) -> int:
        return os.getpid()

    async def fails_after(self, n):
        for i in range(n):
            yield i
        raise ValueError(f"broke after {n}")


def _named_sockets(pid: int) -> list[str]:
    return [c.laddr for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr.endswith(f"/{pid}.local")]


def _socket_address(pid: int) -> tuple[str, int]:
    """The replica's listening socket name and how many callers are connected to it."""
    named = _named_sockets(pid)
    assert named, f"replica {pid} has no same-node socket"
    return named[0], len(named) - 1  # the listener, then one entry per accepted connection


@pytest.mark.both_transports
def test_calls_use_the_socket_and_reuse_one_connection(serve, transport):
    handle = serve(Echo.bind())
    pid = handle.pid.remote().result()
    for i in range(50):
        assert handle.remote(i).result() == i
        assert list(handle.count.remote(3)) == [0, 1, 2]
    if transport == "local":
        # Sequential calls from one caller share one pooled connection.
        assert _socket_address(pid)[1] == 1
    else:  # STREAMWISE_LOCAL_TRANSPORT=0 holds for the replicas too: no socket at all
        assert _named_sockets(pid) == []


def _connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _hello() -> bytes:
    assert RUNTIME.credentials is not None
    return lw.message(lw.AUTH, RUNTIME.credentials.secret.encode())


def test_garbage_is_dropped_and_the_replica_keeps_serving(serve):
    handle = serve(Echo.bind())
    address, _ = _socket_address(handle.pid.remote().result())
    with _connect(address) as sock:  # an unknown message kind: the connection is dropped
        sock.sendall(_hello() + lw.message(99, b"hello"))
        assert _read_all(sock) == b""
    with _connect(address) as sock:  # a call whose request does not decode: an error status
        sock.sendall(_hello() + lw.message(lw.CALL, b"\xff\xff\xff"))
        sock.shutdown(socket.SHUT_WR)
        reply = _read_all(sock)
    length, kind = lw.HEADER.unpack(reply[: lw.HEADER.size])
    assert kind == lw.STATUS
    name, details = lw.parse_status(reply[lw.HEADER.size : lw.HEADER.size + length])
    assert name == "UNKNOWN" and "DecodeError" in details
    assert handle.remote("still serving").result() == "still serving"


@pytest.mark.parametrize(
    "first",
    [lw.message(lw.STREAM, b""), lw.message(lw.AUTH, b"0" * 64), lw.message(lw.AUTH, b"x" * 100_000)],
    ids=["no-secret", "wrong-secret", "oversized"],
)
def test_callers_without_the_secret_are_dropped_unanswered(serve, first):
    """A connection whose first message is not the app secret gets no byte back; nothing runs."""
    handle = serve(Echo.bind())
    address, _ = _socket_address(handle.pid.remote().result())
    with _connect(address) as sock:
        try:
            sock.sendall(first + lw.message(lw.CALL, b""))
            answer = _read_all(sock)
        except (BrokenPipeError, ConnectionResetError):  # closed before or after the request
            answer = b""
    assert answer == b""
    assert handle.remote(1).result() == 1


async def _concurrent(handle: streamwise.DeploymentHandle, n: int) -> list[int]:
    return list(await asyncio.gather(*(handle.remote(i) for i in range(n))))


def test_a_burst_of_concurrent_calls_each_get_a_connection(serve):
    handle = serve(Echo.options(max_ongoing_requests=256).bind())
    pid = handle.pid.remote().result()
    assert asyncio.run(_concurrent(handle, 200)) == list(range(200))
    _, connections = _socket_address(pid)
    assert 1 <= connections <= 200


def test_streams_that_fail_or_are_cancelled_keep_the_pool_small(serve):
    handle = serve(Echo.bind())
    pid = handle.pid.remote().result()
    for _ in range(10):
        with pytest.raises(streamwise.exceptions.RemoteError, match="broke after 2"):
            list(handle.fails_after.remote(2))
        assert handle.remote(1).result() == 1
    # An error frame ends the call cleanly: its connection is reused.
    assert _socket_address(pid)[1] == 1
    for _ in range(10):
        for item in handle.count.remote(1_000_000):
            break  # cancels the call: its connection is closed, a replacement opened
        assert handle.remote(2).result() == 2
    assert _socket_address(pid)[1] <= 3  # not one per cancelled call


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_write_to_a_closed_connection_is_a_lost_connection(loop_name, monkeypatch):
    """Whichever loop runs the socket, writing to a connection already closed raises
    ConnectionResetError, as a lost connection does anywhere else on this path
    (uvloop's transports would raise RuntimeError, asyncio's would drop the write)."""
    from streamwise import _event_loop

    monkeypatch.setenv("STREAMWISE_EVENT_LOOP", loop_name)

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            lw.send(writer, lw.message(lw.ACK))
            await writer.drain()
            assert theirs.recv(64) == lw.message(lw.ACK)
            writer.transport.abort()
            await asyncio.sleep(0)  # the transport closes on the loop's next turn
            with pytest.raises(ConnectionResetError):
                lw.send(writer, lw.message(lw.ACK))
        finally:
            writer.close()
            theirs.close()

    _event_loop.run(main())


def test_a_socket_found_unusable_is_tried_again_later(serve, monkeypatch):
    """While a replica's socket cannot be reached, calls go over gRPC; once it can
    again, calls use it again (a full accept queue or a lack of descriptors passes).
    The retry period is zero here: each call past the first failure tries again."""
    monkeypatch.setattr(local_transport, "RETRY_UNREACHABLE_S", 0.0)
    handle = serve(Echo.bind())
    pid = handle.pid.remote().result()
    address, _ = _socket_address(pid)
    os.rename(address, address + ".away")  # the listener stays open; new callers find no file
    try:
        # Every pooled connection is still open: the pool's next call takes one. Cancel
        # enough streams that the pool must open new connections, which then fail.
        for _ in range(3):
            for _item in handle.count.remote(1_000_000):
                break
        assert [handle.remote(i).result() for i in range(5)] == list(range(5))
        assert _socket_address(pid)[1] == 0  # those went over gRPC
    finally:
        os.rename(address + ".away", address)
    for i in range(5):
        assert handle.remote(i).result() == i
    assert _socket_address(pid)[1] >= 1  # back on the socket
