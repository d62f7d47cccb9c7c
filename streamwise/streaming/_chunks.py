"""Chunk messages (``CallReply.chunk``, ``Frame.chunk``), written and read by hand.

A chunk carries raw bytes of object store segments to another node (see
``objectstore._carry``). Through protobuf its bytes would be copied into the message,
then into the serialized string, and twice again on the receiving side; here a chunk
is serialized as its field's tag, length and bytes in one join, and parsed into a
memoryview of the received message. Other messages of the same RPCs go through
protobuf as before, and the bytes on the wire are exactly protobuf's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from streamwise.proto import replica_pb2, replica_pb2_grpc
from streamwise.streaming._services import Recorder

SERVICE = "streamwise.v1.Replica"
_REPLY_TAG = 3 << 3 | 2  # CallReply.chunk: field 3, length-delimited
_FRAME_TAG = 4 << 3 | 2  # Frame.chunk: field 4, length-delimited
_INPUT_TAG = 3 << 3 | 2  # StreamInput.chunk: field 3, length-delimited


class Chunk:
    """A message holding only ``chunk``: ``data``, a byte view."""

    __slots__ = ("data",)
    count = 0  # as a frame, it holds no items (for writers that count them)

    def __init__(self, data: memoryview) -> None:
        self.data = data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _serializer(tag: int, serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    head = bytes([tag])

    def dumps(message: Any) -> bytes:
        if type(message) is Chunk:
            data = message.data
            return b"".join((head, _varint(data.nbytes), data))
        return serialize(message)

    return dumps


def _parser(tag: int, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    first = bytes([tag])

    def loads(data: bytes) -> Any:
        if data[:1] == first:
            length = shift = 0
            offset = 1
            while offset < len(data):
                byte = data[offset]
                offset += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            if offset + length == len(data):  # the chunk field alone: a chunk message
                return Chunk(memoryview(data)[offset:])
        return parse(data)

    return loads


reply_bytes = _serializer(_REPLY_TAG, replica_pb2.CallReply.SerializeToString)
reply_from = _parser(_REPLY_TAG, replica_pb2.CallReply.FromString)
frame_bytes = _serializer(_FRAME_TAG, replica_pb2.Frame.SerializeToString)
frame_from = _parser(_FRAME_TAG, replica_pb2.Frame.FromString)
input_bytes = _serializer(_INPUT_TAG, replica_pb2.StreamInput.SerializeToString)
input_from = _parser(_INPUT_TAG, replica_pb2.StreamInput.FromString)


def add_replica_servicer(servicer: replica_pb2_grpc.ReplicaServicer, server: grpc.aio.Server) -> None:
    """``replica_pb2_grpc.add_ReplicaServicer_to_server``, with the RPCs that may send
    chunks serializing them by hand."""
    recorder = Recorder()
    replica_pb2_grpc.add_ReplicaServicer_to_server(servicer, recorder)
    handlers = recorder.services[SERVICE]
    handlers["CallCarried"] = handlers["CallCarried"]._replace(
        request_deserializer=input_from, response_serializer=reply_bytes
    )
    handlers["Fetch"] = handlers["Fetch"]._replace(response_serializer=reply_bytes)
    handlers["Stream"] = handlers["Stream"]._replace(response_serializer=frame_bytes)
    handlers["Channel"] = handlers["Channel"]._replace(request_deserializer=input_from, response_serializer=frame_bytes)
    # One generic handler, no registered method: see ``_services``.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def carried_stubs(channel: grpc.aio.Channel) -> tuple[Any, Any, Any, Any]:
    """(CallCarried, Stream, Channel, Fetch) multicallables on ``channel`` that read
    chunks as :class:`Chunk` (and every other message as protobuf)."""
    request = replica_pb2.CallRequest.SerializeToString
    return (
        channel.stream_stream(f"/{SERVICE}/CallCarried", request_serializer=input_bytes, response_deserializer=reply_from),
        channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=request, response_deserializer=frame_from),
        channel.stream_stream(f"/{SERVICE}/Channel", request_serializer=input_bytes, response_deserializer=frame_from),
        channel.unary_stream(
            f"/{SERVICE}/Fetch",
            request_serializer=replica_pb2.FetchRequest.SerializeToString,
            response_deserializer=reply_from,
        ),
    )
