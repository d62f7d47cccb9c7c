"""The caller's side of the same-node transport (framing in ``streaming._local_wire``).

Calls to a replica on this machine go over a Unix socket instead of gRPC: a small
call costs a fraction of a grpc.aio round trip. Errors map exactly as on gRPC (see
``transport``): a call that ends before the replica's ack was never run
(:class:`NotAccepted`), one that breaks after it is a ``ReplicaDiedError``.
Connections are pooled per replica; a call that ends cleanly returns its connection
to the pool, a cancelled or failed one closes it, which cancels the call in the
replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from streamwise import exceptions
from streamwise.proto import replica_pb2
from streamwise.routing.target import (
    NotAccepted,
    ReplicaTarget,
    cancelled_by_caller,
    map_error,
)
from streamwise.streaming import _local_wire as lw

# Idle connections kept per replica; more concurrent calls open more, closed after use.
MAX_IDLE_PER_REPLICA = 64

# Bytes a connection buffers before the replica's writes wait for the caller.
STREAM_LIMIT = 1 << 16

_BROKEN = (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError)


class Unreachable(Exception):
    """No connection to the replica's socket could be made (e.g. another network
    namespace on the same machine): the caller should use gRPC for it instead."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


def _status_error(body: bytes, acked: bool, target: ReplicaTarget) -> Exception:
    name, details = lw.parse_status(body)
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
    return map_error(code, details, acked, target)


class LocalFrameStream:
    """An open stream of frames over one connection; ``cancel()`` ends the call."""

    __slots__ = ("_conn", "_transport", "_writer", "_input_error", "_cancelled", "_reusable", "target", "died")

    def __init__(self, conn: _Connection, target: ReplicaTarget, transport: LocalTransport, reusable: bool) -> None:
        self._conn: _Connection | None = conn
        self._transport = transport
        self._writer: asyncio.Task[None] | None = None
        self._input_error: BaseException | None = None
        self._cancelled = False
        self._reusable = reusable
        self.target = target
        self.died = False

    def _start_writer(self, inputs: AsyncIterator[Any], encode: Callable[[list[Any]], bytes]) -> None:
        conn = self._conn
        assert conn is not None

        async def write() -> None:
            try:
                async for item in inputs:
                    conn.writer.write(lw.message(lw.INPUT, replica_pb2.StreamInput(items=encode([item])).SerializeToString()))
                    await conn.writer.drain()
                conn.writer.write(lw.message(lw.INPUT_END))
            except asyncio.CancelledError:
                raise
            except _BROKEN:
                pass  # the call ended; read() reports why
            except BaseException as exc:  # the caller's input iterator failed
                self._input_error = exc
                conn.close()

        self._writer = asyncio.get_running_loop().create_task(write())

    async def read(self) -> replica_pb2.Frame | None:
        """The next frame, or None at the end of the stream.

        Cancelling the awaiting task cancels the call (and so the remote generator).
        """
        conn = self._conn
        if conn is None:
            return None
        try:
            kind, body = await lw.read_message(conn.reader)
        except _BROKEN as exc:
            self._end(reuse=False)
            if self._cancelled:
                return None
            if self._input_error is not None:
                raise self._input_error from None
            self.died = True
            raise exceptions.ReplicaDiedError(self.target.deployment, self.target.replica_id, "connection lost") from exc
        except asyncio.CancelledError:
            closed = self._cancelled
            self.cancel()
            if cancelled_by_caller():
                raise
            if closed:
                return None
            self.died = True
            raise exceptions.ReplicaDiedError(self.target.deployment, self.target.replica_id, "call cancelled") from None
        if kind == lw.FRAME:
            return replica_pb2.Frame.FromString(body)
        ok = kind == lw.STATUS and lw.parse_status(body)[0] == lw.OK
        self._end(reuse=ok and self._reusable)
        if ok or self._cancelled:
            return None
        error = _status_error(body, True, self.target)
        self.died = isinstance(error, exceptions.ReplicaDiedError)
        raise error

    def _end(self, reuse: bool) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            if reuse:
                self._transport._put_back(self.target.address, conn)
            else:
                conn.close()

    def cancel(self) -> None:
        if self._conn is not None:
            # A cancelled call's connection is closed (that is how the replica learns of
            # it); open its replacement now, while the caller moves on.
            self._transport._replace(self.target)
        self._cancelled = True
        self._end(reuse=False)


class LocalTransport:
    """Pooled Unix-socket connections to the replicas of this machine."""

    def __init__(self) -> None:
        self._idle: dict[str, list[_Connection]] = {}
        self.unreachable: set[str] = set()  # local addresses that refused a connection
        self._opening: set[asyncio.Task[None]] = set()

    async def _connect(self, target: ReplicaTarget) -> _Connection:
        idle = self._idle.get(target.address)
        if idle:
            return idle.pop()
        try:
            reader, writer = await asyncio.open_unix_connection(lw.socket_path(target.local_address), limit=STREAM_LIMIT)
        except OSError as exc:
            self.unreachable.add(target.local_address)
            raise Unreachable(target.local_address) from exc
        return _Connection(reader, writer)

    def _replace(self, target: ReplicaTarget) -> None:
        """Open one connection to ``target`` for the pool, unless it has one idle."""
        if self._idle.get(target.address):
            return

        async def open_one() -> None:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_unix_connection(
                    lw.socket_path(target.local_address), limit=STREAM_LIMIT
                )
                self._put_back(target.address, _Connection(reader, writer))

        task = asyncio.get_running_loop().create_task(open_one())
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    def _put_back(self, address: str, conn: _Connection) -> None:
        idle = self._idle.get(address)
        if idle is None or len(idle) >= MAX_IDLE_PER_REPLICA or conn.writer.is_closing():
            conn.close()  # no pool: the replica was forgotten meanwhile
        else:
            idle.append(conn)

    async def _begin(self, target: ReplicaTarget, first: bytes) -> _Connection:
        """Send a call's first message and wait for the replica's ack."""
        conn = await self._connect(target)
        self._idle.setdefault(target.address, [])
        try:
            conn.writer.write(first)
            kind, body = await lw.read_message(conn.reader)
        except _BROKEN as exc:
            conn.close()
            raise NotAccepted(target, False, f"connection to {target.replica_id} lost") from exc
        except asyncio.CancelledError:
            conn.close()
            if cancelled_by_caller():
                raise
            raise NotAccepted(target, False, "call cancelled before it was accepted") from None
        if kind != lw.ACK:
            conn.close()
            raise _status_error(body, False, target)
        return conn

    async def unary(self, target: ReplicaTarget, request: replica_pb2.CallRequest) -> replica_pb2.CallReply:
        """Run a unary call. Cancelling the awaiting task cancels it in the replica."""
        conn = await self._begin(target, lw.message(lw.CALL, request.SerializeToString()))
        try:
            kind, body = await lw.read_message(conn.reader)
        except _BROKEN as exc:
            conn.close()
            raise exceptions.ReplicaDiedError(target.deployment, target.replica_id, "connection lost") from exc
        except asyncio.CancelledError:
            conn.close()
            if cancelled_by_caller():
                raise
            raise exceptions.ReplicaDiedError(target.deployment, target.replica_id, "call cancelled") from None
        if kind == lw.REPLY:
            self._put_back(target.address, conn)
            return replica_pb2.CallReply.FromString(body)
        conn.close()
        raise _status_error(body, True, target)

    async def open_stream(
        self,
        target: ReplicaTarget,
        request: replica_pb2.CallRequest,
        inputs: AsyncIterator[Any] | None = None,
        encode: Callable[[list[Any]], bytes] | None = None,
    ) -> LocalFrameStream:
        """Start a stream once the replica admitted it (see GrpcTransport.open_stream)."""
        if inputs is None:
            conn = await self._begin(target, lw.message(lw.STREAM, request.SerializeToString()))
            return LocalFrameStream(conn, target, self, reusable=True)
        first = lw.message(lw.CHANNEL) + lw.message(lw.INPUT, replica_pb2.StreamInput(call=request).SerializeToString())
        conn = await self._begin(target, first)
        # The input writer may still be sending when the replica ends the call, so a
        # bidirectional call's connection is never reused.
        stream = LocalFrameStream(conn, target, self, reusable=False)
        assert encode is not None
        stream._start_writer(inputs, encode)
        return stream

    def forget(self, address: str) -> None:
        """The replica at ``address`` is gone: close its idle connections."""
        for conn in self._idle.pop(address, ()):
            conn.close()

    async def aclose(self) -> None:
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        conns = [conn for idle in self._idle.values() for conn in idle]
        self._idle.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()
