"""The replica's same-node endpoint: the internal protocol over a Unix socket.

Serves the same :class:`~streamwise.streaming.servicer.ReplicaServicer` as the
replica's gRPC server, through a stand-in for the gRPC servicer context, so admission,
acks, frames, errors and spans behave identically on both transports (framing in
``_local_wire``). Only processes of the same user may connect (checked with the
peer's credentials): the protocol carries pickled values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
from typing import Any

import grpc

from streamwise.proto import replica_pb2
from streamwise.streaming import _local_wire as lw
from streamwise.streaming.servicer import ReplicaServicer

# Input items of a bidirectional call held before the connection stops being read
# (backpressure on the caller's writer, as gRPC flow control would apply).
MAX_QUEUED_INPUTS = 64

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _Context:
    """What the servicer uses of a grpc.aio ServicerContext, over one connection."""

    __slots__ = ("_writer", "_inputs")

    def __init__(self, writer: asyncio.StreamWriter, inputs: asyncio.Queue[Any] | None) -> None:
        self._writer = writer
        self._inputs = inputs

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._writer.write(lw.message(lw.ACK))

    async def write(self, frame: replica_pb2.Frame) -> None:
        self._writer.write(lw.message(lw.FRAME, frame.SerializeToString()))
        await self._writer.drain()
        # The frame has left; give the producer a turn before the next one, so that
        # the items it makes meanwhile go out together (as while a gRPC write is busy).
        await asyncio.sleep(0)

    async def read(self) -> Any:
        """The caller's next StreamInput, or grpc.aio.EOF after its last."""
        assert self._inputs is not None
        return await self._inputs.get()


class LocalServer:
    """Accepts same-node callers on an abstract Unix socket until ``aclose()``."""

    def __init__(self, servicer: ReplicaServicer) -> None:
        self._servicer = servicer
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self) -> str:
        """Listen; returns the address callers use (``@name`` for the abstract namespace)."""
        name = f"streamwise/{os.getpid()}/{secrets.token_hex(6)}"
        self._server = await asyncio.start_unix_server(self._accept, "\0" + name)
        self.address = lw.ABSTRACT_PREFIX + name
        return self.address

    async def aclose(self) -> None:
        """Stop listening and end every connection (cancelling the calls they carry)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if _same_user(writer):
                await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # the replica is stopping
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the caller's messages; its calls run one at a time as tasks.

        The connection closing (the caller cancelled, or died) cancels the running call.
        """
        loop = asyncio.get_running_loop()
        call: asyncio.Task[None] | None = None
        inputs: asyncio.Queue[Any] | None = None
        try:
            while True:
                try:
                    kind, body = await lw.read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if kind == lw.INPUT and inputs is not None:
                    await inputs.put(replica_pb2.StreamInput.FromString(body))
                elif kind == lw.INPUT_END and inputs is not None:
                    await inputs.put(grpc.aio.EOF)
                elif kind in (lw.CALL, lw.STREAM, lw.CHANNEL):
                    inputs = asyncio.Queue(MAX_QUEUED_INPUTS) if kind == lw.CHANNEL else None
                    call = loop.create_task(self._call(kind, body, _Context(writer, inputs), writer))
                else:
                    return  # not our protocol: drop the connection
        finally:
            if call is not None and not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def _call(self, kind: int, body: bytes, context: _Context, writer: asyncio.StreamWriter) -> None:
        """Run one call; its last message is written once the servicer is done with it."""
        servicer = self._servicer
        try:
            if kind == lw.CALL:
                reply = await servicer.Call(replica_pb2.CallRequest.FromString(body), context)  # type: ignore[arg-type]
                last = lw.message(lw.REPLY, reply.SerializeToString())
            elif kind == lw.STREAM:
                await servicer.Stream(replica_pb2.CallRequest.FromString(body), context)  # type: ignore[arg-type]
                last = lw.status(lw.OK)
            else:
                await servicer.Channel(None, context)  # type: ignore[arg-type]
                last = lw.status(lw.OK)
        except _Aborted as exc:
            last = lw.status(exc.code, exc.details)
        except (ConnectionError, asyncio.CancelledError):
            return  # the caller went away
        except Exception as exc:  # a servicer failure outside user code: the call's outcome is unknown
            last = lw.status(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(ConnectionError):
            writer.write(last)
            await writer.drain()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid == os.getuid()
