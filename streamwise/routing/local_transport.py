"""The caller's side of the same-node transport (framing in ``streaming._local_wire``).

Unary and server-streaming calls to a replica on this machine go over a Unix socket
instead of gRPC: a small call costs a fraction of a grpc.aio round trip. Calls with
an input stream stay on gRPC, whose flow control lets a replica stop reading inputs
without losing sight of a caller that goes away. Errors map exactly as on gRPC (see
``target``): a call that ends before the replica's ack was never run
(:class:`NotAccepted`), one that breaks after it is a ``ReplicaDiedError``.

Connections are pooled per replica. A call that ends cleanly returns its connection
to the pool; a cancelled or failed one aborts it, which cancels the call in the
replica. A pooled connection found broken is replaced by a fresh one; a fresh one
that fails before the ack makes the call go over gRPC (:class:`Unreachable`), which
tells a dead replica from a socket this process cannot use; the socket is tried
again after RETRY_UNREACHABLE_S.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from streamwise import exceptions
from streamwise._auth import Credentials
from streamwise.proto import replica_pb2
from streamwise.routing.target import NotAccepted, ReplicaTarget, cancelled_by_caller, map_error
from streamwise.streaming import _local_wire as lw

# Idle connections kept per replica; more concurrent calls open more, closed after use.
MAX_IDLE_PER_REPLICA = 64

# Bytes a connection buffers before the replica's writes wait for the caller.
STREAM_LIMIT = 1 << 16

# A replica's socket found unusable goes over gRPC for this long, then is tried again:
# a full accept queue (a burst of new connections) or a lack of descriptors passes;
# a socket of another network namespace or user costs one failed connection a period.
RETRY_UNREACHABLE_S = 10.0

_BROKEN = (asyncio.IncompleteReadError, OSError)


class Unreachable(Exception):
    """The replica's socket cannot be used from here (another network namespace or
    user, no descriptors left, its accept queue full): the caller should use gRPC for
    it instead, for RETRY_UNREACHABLE_S."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        # abort(), not close(): nothing still buffered may keep the socket open.
        self.writer.transport.abort()


def _status_error(body: bytes, acked: bool, target: ReplicaTarget) -> Exception:
    name, details = lw.parse_status(body)
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
    return map_error(code, details, acked, target)


class LocalFrameStream:
    """An open stream of frames over one connection; ``cancel()`` ends the call."""

    __slots__ = ("_cancelled", "_conn", "_transport", "died", "target")

    def __init__(self, conn: _Connection, target: ReplicaTarget, transport: LocalTransport) -> None:
        self._conn: _Connection | None = conn
        self._transport = transport
        self._cancelled = False
        self.target = target
        self.died = False

    async def read(self) -> replica_pb2.Frame | None:
        """The next frame, or None at the end of the stream.

        Cancelling the awaiting task cancels the call (and so the remote generator).
        """
        conn = self._conn
        if conn is None:
            return None
        try:
            kind, body = await lw.read_message(conn.reader)
            if kind == lw.FRAME:
                frame = replica_pb2.Frame.FromString(body)
                if not frame.HasField("error"):
                    return frame
                # An error frame is the stream's last: take the end of the call too,
                # so the connection can serve the next one.
                kind, body = await lw.read_message(conn.reader)
                self._end(reuse=kind == lw.STATUS and lw.parse_status(body)[0] == lw.OK)
                return frame
        except _BROKEN as exc:
            self._end(reuse=False)
            if self._cancelled:
                return None
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
        ok = kind == lw.STATUS and lw.parse_status(body)[0] == lw.OK
        self._end(reuse=ok)
        if ok or self._cancelled:
            return None
        error = _status_error(body, True, self.target)
        self.died = isinstance(error, exceptions.ReplicaDiedError)
        raise error

    def _end(self, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if reuse:
                self._transport._put_back(self.target.address, conn)
            else:
                self._transport._discard(conn)

    def cancel(self) -> None:
        if self._conn is not None:
            # A cancelled call's connection is aborted (that is how the replica learns
            # of it); open its replacement now, while the caller moves on.
            self._transport._replace(self.target)
        self._cancelled = True
        self._end(reuse=False)


class LocalTransport:
    """Pooled Unix-socket connections to the replicas of this machine."""

    def __init__(self, credentials: Credentials) -> None:
        self._hello = lw.message(lw.AUTH, credentials.secret.encode()) if credentials.required else b""
        self._idle: dict[str, list[_Connection]] = {}
        self._live: set[_Connection] = set()  # every open connection, idle or in a call
        self._opening: set[asyncio.Task[None]] = set()
        self._closed = False
        self._unreachable: dict[str, float] = {}  # local address -> when to try it again

    def reachable(self, local_address: str) -> bool:
        """Whether to call the replica at ``local_address`` over its socket: not while
        it was found unusable in the last RETRY_UNREACHABLE_S. Then one call tries it;
        the others keep to gRPC until that one is acknowledged over the socket."""
        retry_at = self._unreachable.get(local_address)
        if retry_at is None:
            return True
        now = time.monotonic()
        if now < retry_at:
            return False
        self._unreachable[local_address] = now + RETRY_UNREACHABLE_S  # this call is the one
        return True

    def _unusable(self, local_address: str) -> Unreachable:
        self._unreachable[local_address] = time.monotonic() + RETRY_UNREACHABLE_S
        return Unreachable(local_address)

    async def _open(self, target: ReplicaTarget) -> _Connection:
        """A fresh connection; Unreachable (and gRPC for RETRY_UNREACHABLE_S) if none can be made."""
        try:
            reader, writer = await asyncio.open_unix_connection(target.local_address, limit=STREAM_LIMIT)
        except OSError as exc:
            raise self._unusable(target.local_address) from exc
        if self._hello:
            lw.send(writer, self._hello)  # goes out with the connection's first call
        conn = _Connection(reader, writer)
        self._live.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        self._live.discard(conn)
        conn.close()

    def _replace(self, target: ReplicaTarget) -> None:
        """Open one connection to ``target`` for the pool, unless it has one idle."""
        if self._closed or self._idle.get(target.address):
            return

        async def open_one() -> None:
            try:
                conn = await self._open(target)
            except Unreachable:
                return  # the next call finds out too, and goes over gRPC
            self._put_back(target.address, conn)

        task = asyncio.get_running_loop().create_task(open_one())
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    def _put_back(self, address: str, conn: _Connection) -> None:
        idle = self._idle.get(address)
        if idle is None or len(idle) >= MAX_IDLE_PER_REPLICA or conn.writer.is_closing():
            self._discard(conn)  # no pool: the replica was forgotten meanwhile
        else:
            idle.append(conn)

    async def _begin(self, target: ReplicaTarget, first: bytes) -> _Connection:
        """Send a call's first message and wait for the replica's ack.

        A pooled connection may have broken while idle: the call is then tried once on
        a fresh connection. A fresh connection that breaks before the ack raises
        Unreachable, so the call goes over gRPC, which reports a dead replica as such.
        """
        idle = self._idle.setdefault(target.address, [])
        while idle:
            conn = idle.pop()
            acked = await self._send_first(conn, target, first)
            if acked is not None:
                return acked
        conn = await self._open(target)
        acked = await self._send_first(conn, target, first)
        if acked is None:
            raise self._unusable(target.local_address)
        if self._unreachable:
            self._unreachable.pop(target.local_address, None)  # usable again
        return acked

    async def _send_first(self, conn: _Connection, target: ReplicaTarget, first: bytes) -> _Connection | None:
        """``conn`` once the replica acknowledged the call; None if it broke first."""
        try:
            lw.send(conn.writer, first)
            kind, body = await lw.read_message(conn.reader)
        except _BROKEN:
            self._discard(conn)
            return None
        except asyncio.CancelledError:
            self._discard(conn)
            if cancelled_by_caller():
                raise
            raise NotAccepted(target, False, "call cancelled before it was accepted") from None
        if kind != lw.ACK:
            self._discard(conn)
            raise _status_error(body, False, target)
        return conn

    async def unary(self, target: ReplicaTarget, request: replica_pb2.CallRequest) -> replica_pb2.CallReply:
        """Run a unary call. Cancelling the awaiting task cancels it in the replica."""
        conn = await self._begin(target, lw.message(lw.CALL, request.SerializeToString()))
        try:
            kind, body = await lw.read_message(conn.reader)
        except _BROKEN as exc:
            self._discard(conn)
            raise exceptions.ReplicaDiedError(target.deployment, target.replica_id, "connection lost") from exc
        except asyncio.CancelledError:
            self._discard(conn)
            self._replace(target)
            if cancelled_by_caller():
                raise
            raise exceptions.ReplicaDiedError(target.deployment, target.replica_id, "call cancelled") from None
        if kind == lw.REPLY:
            self._put_back(target.address, conn)
            return replica_pb2.CallReply.FromString(body)
        self._discard(conn)
        raise _status_error(body, True, target)

    async def open_stream(self, target: ReplicaTarget, request: replica_pb2.CallRequest) -> LocalFrameStream:
        """Start a server stream once the replica admitted it."""
        conn = await self._begin(target, lw.message(lw.STREAM, request.SerializeToString()))
        return LocalFrameStream(conn, target, self)

    def forget(self, address: str) -> None:
        """The replica at ``address`` is gone: close its idle connections."""
        for conn in self._idle.pop(address, ()):
            self._discard(conn)

    async def aclose(self) -> None:
        """Abort every connection (calls still running on them end as cancelled)."""
        self._closed = True
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        self._idle.clear()
        conns, self._live = list(self._live), set()
        for conn in conns:
            conn.close()
        await asyncio.sleep(0)  # let the aborted transports finish closing
