"""Framing of the same-node transport: the internal protocol over a Unix socket.

A caller on the same machine as a replica skips gRPC and speaks the same protocol
(the same ``replica_pb2`` messages, the same admission ack) over a Unix stream socket
in the app's run directory. Calls with an input stream
stay on gRPC, for its flow control. A connection carries one call at a time and is
reused for the next call once the previous one ended cleanly; a caller cancels a
call by closing its connection. A connection's first message is AUTH, the app's
secret; the replica reads nothing else before it has checked it. Every message is a
5-byte header (body length, kind) and a body:

    caller -> replica   AUTH (the app secret)  first message of every connection
                        CALL (CallRequest)  unary call
                        STREAM (CallRequest)  server stream
    replica -> caller   ACK  admitted, user code is about to run
                        REPLY (CallReply)  the unary call's result, last message
                        FRAME (Frame)  a stream frame
                        STATUS ("CODE\\ndetails")  the call's end: OK after a stream's
                        last frame, or a gRPC status code name for a failed call
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct

import grpc

HEADER = struct.Struct("!IB")

CALL, STREAM, AUTH = 1, 2, 3
ACK, REPLY, FRAME, STATUS = 10, 11, 12, 13

OK = "OK"


NODE_ID_ENV = "STREAMWISE_NODE_ID"


@functools.cache
def node_id() -> str:
    """This node's identity: callers on other nodes never use the socket, and routers
    prefer replicas of their own node. The cluster engine's node id when a launcher
    set ``STREAMWISE_NODE_ID`` (several nodes may share a machine), else the
    machine's boot id."""
    given = os.environ.get(NODE_ID_ENV, "").strip()
    if given:
        return given
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return os.uname().nodename


def message(kind: int, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind) + body


def status(code: grpc.StatusCode | str, details: str = "") -> bytes:
    name = code if isinstance(code, str) else code.name
    return message(STATUS, f"{name}\n{details}".encode())


def parse_status(body: bytes) -> tuple[str, str]:
    name, _, details = body.decode(errors="replace").partition("\n")
    return name, details


def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data``, or raise ConnectionResetError if the connection is closed already.

    On a closed connection asyncio's own transports drop the write silently and
    uvloop's (the replicas' loop) raise RuntimeError; either way the caller is to
    see the OSError that a lost connection raises everywhere else.
    """
    if writer.transport.is_closing():
        raise ConnectionResetError("the connection is closed")
    writer.write(data)


async def read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next (kind, body); IncompleteReadError when the peer closed the connection."""
    length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
    return kind, (await reader.readexactly(length) if length else b"")
