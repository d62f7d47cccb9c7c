"""Constants and conversions shared by both ends of the internal protocol.

Exceptions from user code become ``RemoteError`` messages here (replica side) and
come back as :class:`streamwise.exceptions.RemoteError` (caller side).
"""

from __future__ import annotations

import itertools
import os
import traceback
from typing import Any

import grpc

from streamwise import _auth, exceptions
from streamwise.proto import replica_pb2, replica_pb2_grpc

# Initial metadata a replica sends once it has admitted a call, before user code runs.
# A call that fails without it was never executed, so the router may retry it.
ACK_KEY = "sw-accepted"
ACK_METADATA = ((ACK_KEY, "1"),)
# Status details prefix of a rejection because the replica is full (RESOURCE_EXHAUSTED)
# or draining (UNAVAILABLE); both come without the ack.
REJECT_FULL = "streamwise: replica full"
REJECT_DRAINING = "streamwise: replica draining"

# CallRequest.codec of calls forwarded by the ingress: protobuf bytes of the RPC named
# in CallRequest.method, decoded by the replica with the user's message classes.
RPC_CODEC = "grpc"

REQUEST_ID = "request_id"


class _RequestIds:
    """Request ids: a random prefix per process, then a count (16 hex digits, more
    past 2**32 requests; no system call per request, as ``os.urandom`` would be).
    Ids name requests in logs and traces; nothing relies on them being unguessable."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):08x}"


new_request_id = _RequestIds()
# The call's deadline, as seconds since the epoch: calls made while serving it inherit it.
DEADLINE = "sw-deadline"
MODEL_ID = "multiplexed_model_id"
# A call over Channel only so that its arguments' chunks can follow it: no input stream.
NO_INPUTS = "sw-no-inputs"
SESSION_ID = "session_id"

GRPC_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.so_reuseport", 0),
    # A channel whose peer went away (a driver restarting, a network outage) tries
    # again every 2 s at most, not up to gRPC's default 120 s: a replica riding out a
    # lost driver is back within seconds of it (``_outage``).
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
# Metadata of a root replica's app-table stream when it reopens it (it serves by a
# table already): a driver that took the replica back holds it until it has apps.
TABLE_KNOWN_KEY = "sw-table-known"
# The control stream of a replica on a cluster: pings find a driver gone silent (its
# machine off, its packets dropped) within about 20 s, where no read would ever end.
CONTROL_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
# What the controller's server then allows (by default it sends away a client that
# pings more often than every 5 minutes while no data flows).
CONTROL_PINGS_ALLOWED = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


async def ask_replica(address: str, metadata: Any, rpc: str, request: Any, timeout_s: float) -> Any:
    """One control call (``rpc``, a Replica RPC's name) to the replica at ``address``,
    on a channel of its own; None if it does not answer within ``timeout_s``."""
    async with _auth.channel(address, GRPC_OPTIONS) as channel:
        try:
            return await getattr(replica_pb2_grpc.ReplicaStub(channel), rpc)(
                request, metadata=metadata, timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return None


def method_label(method: str) -> str:
    """A call's method for span names: the method name, or an RPC path's last part."""
    return method.rsplit("/", 1)[-1]


def _grpc_status(exc: BaseException) -> str:
    if isinstance(exc, exceptions.UnknownMethodError):
        return "NOT_FOUND"
    return getattr(exc, "grpc_status", "")


def error_to_proto(exc: BaseException) -> replica_pb2.RemoteError:
    """Describe a user exception for the caller: qualified type name, message, traceback."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, exceptions.RemoteError):
        # Re-raised downstream error: keep the original type name and text.
        return replica_pb2.RemoteError(
            type_name=exc.remote_type,
            message=exc.remote_message,
            traceback="".join(traceback.format_exception(exc)),
        )
    return replica_pb2.RemoteError(
        type_name=name,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        status=_grpc_status(exc),
    )


def error_from_proto(
    err: replica_pb2.RemoteError, deployment: str, method: str
) -> exceptions.RemoteError:
    return exceptions.RemoteError(err.type_name, err.message, err.traceback, deployment, method)
