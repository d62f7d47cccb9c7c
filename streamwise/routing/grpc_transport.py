"""Calls to a replica over gRPC: on loopback, or across machines.

The errors of a call map to streamwise errors as ``target`` describes.

A by-reference call to another node's object store session (its request carries
``CHUNKS_KEY``) reads replies whose envelopes are followed by the bytes of the
segments they carry, in chunk messages: unary calls go over ``CallCarried`` instead
of ``Call``. Those bytes are written into this node's store as they arrive
(``objectstore.calls.ChunkReceiver``); the reply or frame handed on holds an ordinary
envelope naming them. A call cancelled or broken mid-transfer leaves none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from streamwise import exceptions
from streamwise._auth import Credentials, channel as auth_channel
from streamwise.objectstore._carry import FETCH
from streamwise.objectstore.calls import CHUNKS_KEY, REF_KEY, ChunkReceiver
from streamwise.proto import replica_pb2, replica_pb2_grpc
from streamwise.routing.target import NotAccepted, ReplicaTarget, cancelled_by_caller, map_error
from streamwise.streaming import _chunks, _wire


_FETCH = bytes([FETCH])


def _acked(metadata: grpc.aio.Metadata | None) -> bool:
    return metadata is not None and _wire.ACK_KEY in metadata


async def _call_error(exc: BaseException, call: Any, target: ReplicaTarget) -> BaseException:
    """What a unary call's failure is to its caller: the streamwise error of the RPC's
    status, or, when the awaiting task was cancelled, that cancellation (the caller's
    own) or ReplicaDiedError (anyone else's: the call was cut off). The RPC is
    cancelled either way."""
    if isinstance(exc, grpc.aio.AioRpcError):
        error = map_error(exc.code(), exc.details(), _acked(await call.initial_metadata()), target)
        error.__cause__ = exc
        return error
    call.cancel()
    if cancelled_by_caller():
        return exc
    died = exceptions.ReplicaDiedError(target.deployment, target.replica_id, "call cancelled")
    died.__suppress_context__ = True
    return died


class _Connection:
    """One channel to one replica address, closed once retired and idle."""

    __slots__ = ("channel", "stub", "carried", "active", "retired")

    def __init__(self, address: str) -> None:
        self.channel = auth_channel(address, _wire.GRPC_OPTIONS)
        self.stub = replica_pb2_grpc.ReplicaStub(self.channel)
        self.carried = _chunks.carried_stubs(self.channel)  # CallCarried, Stream, Channel
        self.active = 0
        self.retired = False


class GrpcFrameStream:
    """An open stream of frames from a replica; ``cancel()`` ends the RPC.

    For a call with an input stream, a writer task sends the caller's items to the
    replica while frames are read; it ends with the call.
    """

    __slots__ = (
        "_call", "_transport", "_conn", "_writer", "_input_error", "_cancelled", "_receiver", "target", "died"
    )

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall,
        target: ReplicaTarget,
        transport: GrpcTransport,
        conn: _Connection,
        receiver: ChunkReceiver | None = None,
    ) -> None:
        self._call = call
        self._receiver = receiver
        self.target = target
        self._transport = transport
        self._conn: _Connection | None = conn
        self._writer: asyncio.Task[None] | None = None
        self._input_error: BaseException | None = None
        self.died = False  # the replica went away mid-stream
        self._cancelled = False  # cancel() was called (from any reader)

    def _start_writer(self, inputs: AsyncIterator[Any], encode: Callable[[list[Any]], bytes]) -> None:
        call = self._call

        async def write() -> None:
            try:
                async for item in inputs:
                    await call.write(replica_pb2.StreamInput(items=encode([item])))
                await call.done_writing()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError:
                pass  # the call ended; read() reports why
            except BaseException as exc:  # the caller's input iterator failed
                self._input_error = exc
                call.cancel()

        self._writer = asyncio.get_running_loop().create_task(write())

    async def read(self) -> replica_pb2.Frame | None:
        """The next frame, or None at the end of the stream.

        Cancelling the awaiting task cancels the RPC (and so the remote generator).
        """
        frame = await self._read()
        if frame is None or self._receiver is None:
            return frame
        if type(frame) is _chunks.Chunk:
            self.cancel()
            raise exceptions.SerializationError("streamwise", "a chunk without its envelope")
        if not frame.count:
            return frame
        incoming = self._receiver.begin(frame.items)
        if incoming is None:
            return frame
        try:
            while incoming.needed:
                chunk = await self._read()
                if type(chunk) is not _chunks.Chunk:
                    if chunk is None and self._cancelled:
                        return None
                    self.cancel()
                    raise exceptions.SerializationError("streamwise", "a stream frame's chunks are missing")
                incoming.feed(chunk.data)
            frame.items = self._receiver.finish(incoming)
            return frame
        finally:
            incoming.abort()

    async def _read(self) -> Any:
        try:
            frame = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._end()
            if self._cancelled:
                return None  # closed by its consumer: the stream simply ends
            error = map_error(exc.code(), exc.details(), True, self.target)
            self.died = isinstance(error, exceptions.ReplicaDiedError)
            raise error from exc
        except asyncio.CancelledError:
            closed = self._cancelled
            self.cancel()
            if cancelled_by_caller():
                raise
            if closed:
                return None  # closed by its consumer (e.g. from another thread): the stream ends
            if self._input_error is not None:
                raise self._input_error from None
            self.died = True
            raise exceptions.ReplicaDiedError(self.target.deployment, self.target.replica_id, "call cancelled") from None
        if frame is grpc.aio.EOF:
            self._end()
            return None
        return frame

    def _end(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._release(self.target.address, conn)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
        self._end()


async def _send_chunks(call: Any, target: ReplicaTarget, chunks: list[memoryview]) -> None:
    """Send a call's argument chunks, once the replica admitted the call (a rejected
    call sends none of them)."""
    if not _acked(await call.initial_metadata()):
        raise map_error(await call.code(), await call.details(), False, target)
    for chunk in chunks:
        await call.write(_chunks.Chunk(chunk))


class GrpcTransport:
    """Channels to replicas, shared by every router on one event loop."""

    def __init__(self, credentials: Credentials) -> None:
        self._metadata = credentials.metadata
        self._conns: dict[str, _Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _acquire(self, address: str) -> _Connection:
        conn = self._conns.get(address)
        if conn is None or conn.retired:
            conn = self._conns[address] = _Connection(address)
        conn.active += 1
        return conn

    def _release(self, address: str, conn: _Connection) -> None:
        conn.active -= 1
        if conn.retired and conn.active == 0:
            self._close_later(conn)

    def _close_later(self, conn: _Connection) -> None:
        task = asyncio.get_running_loop().create_task(conn.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def unary(
        self, target: ReplicaTarget, request: replica_pb2.CallRequest, chunks: list[memoryview] | None = None
    ) -> replica_pb2.CallReply:
        """Run a unary call (``chunks``: its arguments' bytes, sent once the replica
        admitted it). Cancelling the awaiting task cancels the RPC."""
        conn = self._acquire(target.address)
        if chunks:
            return await self._unary_carried(conn, target, request, chunks)
        call = conn.stub.Call(request, metadata=self._metadata)
        try:
            reply = await call
            value = reply.value
            if value[:1] == _FETCH and REF_KEY in request.metadata and not reply.HasField("error"):
                return await self._fetch(conn, target, request, value)
            return reply
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            raise await _call_error(exc, call, target)  # noqa: B904 (the cause is set there)
        finally:
            self._release(target.address, conn)

    async def _fetch(
        self, conn: _Connection, target: ReplicaTarget, request: replica_pb2.CallRequest, envelope: bytes
    ) -> replica_pb2.CallReply:
        """Fetch the bytes a Call's reply carries (see ``objectstore._carry``); the
        reply with the envelope naming them, in this node's store. Cancelling ends
        the fetch and removes what had arrived."""
        found = ChunkReceiver.fetch(envelope)
        if found is None:
            raise exceptions.SerializationError("streamwise", "a bad fetch envelope")
        ticket, incoming = found
        call = conn.carried[3](replica_pb2.FetchRequest(ticket=ticket), metadata=self._metadata)
        try:
            while incoming.needed:
                chunk = await call.read()
                if type(chunk) is not _chunks.Chunk:
                    if chunk is grpc.aio.EOF:
                        raise exceptions.SerializationError("streamwise", "a fetched result's chunks are missing")
                    raise exceptions.SerializationError("streamwise", "not a chunk")
                incoming.feed(chunk.data)
            return replica_pb2.CallReply(value=ChunkReceiver(request).finish(incoming))
        except BaseException:
            call.cancel()
            raise
        finally:
            incoming.abort()  # no-op once finished: then the call's pins hold the segments

    async def _unary_carried(
        self, conn: _Connection, target: ReplicaTarget, request: replica_pb2.CallRequest, chunks: list[memoryview]
    ) -> replica_pb2.CallReply:
        """A unary call over CallCarried: the call and its arguments' chunks go out,
        the reply and the chunks its value carries come back."""
        call = conn.carried[0](metadata=self._metadata)
        receiver = ChunkReceiver(request)
        incoming = None
        done = False
        try:
            await call.write(replica_pb2.StreamInput(call=request))
            if chunks:
                await _send_chunks(call, target, chunks)
            await call.done_writing()
            reply = await call.read()
            if reply is grpc.aio.EOF or type(reply) is _chunks.Chunk:
                raise map_error(await call.code(), await call.details(), _acked(await call.initial_metadata()), target)
            if not reply.HasField("error"):
                incoming = receiver.begin(reply.value)
            if incoming is not None:
                while incoming.needed:
                    chunk = await call.read()
                    if type(chunk) is not _chunks.Chunk:
                        raise exceptions.SerializationError("streamwise", "a reply's chunks are missing")
                    incoming.feed(chunk.data)
                reply = replica_pb2.CallReply(value=receiver.finish(incoming))
            done = True
            return reply
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            raise await _call_error(exc, call, target)  # noqa: B904 (the cause is set there)
        finally:
            if incoming is not None:
                incoming.abort()  # no-op once finished: then the call's pins hold the segments
            if not done:
                call.cancel()
            self._release(target.address, conn)

    async def open_stream(
        self,
        target: ReplicaTarget,
        request: replica_pb2.CallRequest,
        inputs: AsyncIterator[Any] | None = None,
        encode: Callable[[list[Any]], bytes] | None = None,
        chunks: list[memoryview] | None = None,
    ) -> GrpcFrameStream:
        """Start a stream and wait until the replica admitted it.

        With ``inputs`` the call is bidirectional: the caller's items are sent (after
        admission, so a rejected call consumed none of them) while frames come back.
        ``chunks`` (its arguments' bytes, for another node's store session) are sent
        once it is admitted, over a bidirectional call too. Cancelling the awaiting
        task cancels the RPC.
        """
        conn = self._acquire(target.address)
        receiver = ChunkReceiver(request) if CHUNKS_KEY in request.metadata else None
        bidi = inputs is not None or bool(chunks)
        if not bidi:
            call = (conn.stub.Stream if receiver is None else conn.carried[1])(request, metadata=self._metadata)
        else:
            if inputs is None:
                request.metadata[_wire.NO_INPUTS] = "1"  # a copy made for this replica (carried_request)
            call = (conn.stub.Channel if receiver is None else conn.carried[2])(metadata=self._metadata)
        try:
            if bidi:
                await call.write(replica_pb2.StreamInput(call=request))
            metadata = await call.initial_metadata()
            if not _acked(metadata):
                raise map_error(await call.code(), await call.details(), False, target)
            if chunks:
                await _send_chunks(call, target, chunks)
                if inputs is None:
                    await call.done_writing()
        except BaseException as exc:
            call.cancel()
            self._release(target.address, conn)
            if isinstance(exc, grpc.aio.AioRpcError):
                raise map_error(exc.code(), exc.details(), False, target) from exc
            if isinstance(exc, asyncio.CancelledError) and not cancelled_by_caller():
                raise NotAccepted(target, False, "call cancelled before it was accepted") from None
            raise
        stream = GrpcFrameStream(call, target, self, conn, receiver)
        if inputs is not None:
            assert encode is not None
            stream._start_writer(inputs, encode)
        return stream

    def forget(self, address: str) -> None:
        """The replica at ``address`` is gone: close its channel once no call uses it."""
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn.retired = True
            if conn.active == 0:
                self._close_later(conn)

    async def aclose(self) -> None:
        for address in list(self._conns):
            self.forget(address)
        await asyncio.gather(*self._closing, return_exceptions=True)
