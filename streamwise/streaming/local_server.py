"""The replica's same-node endpoint: the internal protocol over a Unix socket.

Serves the same :class:`~streamwise.streaming.servicer.ReplicaServicer` as the
replica's gRPC server, through a stand-in for the gRPC servicer context, so admission,
acks, frames, errors and spans behave identically on both transports (framing in
``_local_wire``). The protocol carries pickled values, so a connection is served
only once it proved to be part of the app: its peer runs as this user (checked with
the peer's credentials; the socket lives in the app's private run directory anyway)
and its first message is the app secret. Nothing else it sent is read before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Any

import grpc

from streamwise._auth import Credentials
from streamwise.proto import replica_pb2
from streamwise.streaming import _local_wire as lw
from streamwise.streaming.servicer import ReplicaServicer

# Connections waiting to be accepted: a burst of concurrent callers each opens one.
BACKLOG = 1024

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_MAX_SECRET = 256  # an AUTH body longer than any secret is not read
_AUTH_TIMEOUT_S = 10.0  # a connection that does not say who it is by then is closed


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _Context:
    """What the servicer uses of a grpc.aio ServicerContext, over one connection."""

    __slots__ = ("_writer",)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    async def send_initial_metadata(self, metadata: Any) -> None:
        lw.send(self._writer, lw.message(lw.ACK))

    async def write(self, frame: replica_pb2.Frame) -> None:
        lw.send(self._writer, lw.message(lw.FRAME, frame.SerializeToString()))
        await self._writer.drain()
        # The frame has left; give the producer a turn before the next one, so that
        # the items it makes meanwhile go out together (as while a gRPC write is busy).
        await asyncio.sleep(0)


class LocalServer:
    """Accepts same-node callers on a Unix socket in the run directory until ``aclose()``."""

    def __init__(self, servicer: ReplicaServicer, credentials: Credentials) -> None:
        self._servicer = servicer
        self._credentials = credentials
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self, path: str) -> str:
        """Listen on the Unix socket ``path``; returns the address callers use."""
        self._server = await asyncio.start_unix_server(self._accept, path, backlog=BACKLOG)
        self.address = path
        return self.address

    async def aclose(self) -> None:
        """Stop listening and end every connection (cancelling the calls they carry)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Connections first: from Python 3.12.1, wait_closed() waits for all of them.
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if _same_user(writer) and (not self._credentials.required or await self._authenticated(reader)):
                await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # the replica is stopping
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _authenticated(self, reader: asyncio.StreamReader) -> bool:
        """Whether the connection's first message is AUTH with the app secret."""
        try:
            async with asyncio.timeout(_AUTH_TIMEOUT_S):
                length, kind = lw.HEADER.unpack(await reader.readexactly(lw.HEADER.size))
                if kind != lw.AUTH or length > _MAX_SECRET:
                    return False
                return self._credentials.accepts(await reader.readexactly(length))
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the caller's messages; its calls run one at a time as tasks.

        The connection closing (the caller cancelled, or died) cancels the running call.
        """
        loop = asyncio.get_running_loop()
        call: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    kind, body = await lw.read_message(reader)
                except (asyncio.IncompleteReadError, OSError):
                    return
                if kind not in (lw.CALL, lw.STREAM) or (call is not None and not call.done()):
                    return  # not our protocol (one call at a time): drop the connection
                call = loop.create_task(self._call(kind, body, _Context(writer), writer))
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
            else:
                await servicer.Stream(replica_pb2.CallRequest.FromString(body), context)  # type: ignore[arg-type]
                last = lw.status(lw.OK)
        except _Aborted as exc:
            last = lw.status(exc.code, exc.details)
        except (OSError, asyncio.CancelledError):
            return  # the caller went away
        except Exception as exc:  # a servicer failure outside user code: the call's outcome is unknown
            last = lw.status(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):  # the caller went away meanwhile
            lw.send(writer, last)
            await writer.drain()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid == os.getuid()
