"""The data path between a caller and a replica: one interface, two transports.

A replica on the caller's machine is called over its same-node Unix socket
(``local_transport``), except for calls with an input stream; any other replica, or
every replica when ``STREAMWISE_LOCAL_TRANSPORT=0``, over gRPC (``grpc_transport``).
Both speak the same protocol and fail the same way (``target``), so routers, handles
and replicas do not know which one carried a call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from streamwise._auth import Credentials
from streamwise.objectstore.calls import CHUNKS_KEY
from streamwise.proto import replica_pb2
from streamwise.routing.grpc_transport import GrpcTransport
from streamwise.routing.local_transport import LocalTransport, Unreachable
from streamwise.routing.target import FrameStream, NotAccepted, ReplicaTarget

__all__ = ["FrameStream", "NotAccepted", "ReplicaTarget", "Transport"]


class Transport:
    """Every connection of one event loop to replicas, on the transport each one allows."""

    def __init__(self, credentials: Credentials, local: bool) -> None:
        self._grpc = GrpcTransport(credentials)
        self._local = LocalTransport(credentials) if local else None

    def _same_node(self, target: ReplicaTarget, request: replica_pb2.CallRequest) -> bool:
        local = self._local
        return (
            local is not None
            and target.local_address != ""
            and local.reachable(target.local_address)
            and CHUNKS_KEY not in request.metadata  # chunked results are read over gRPC only
        )

    async def unary(
        self, target: ReplicaTarget, request: replica_pb2.CallRequest, chunks: list[memoryview] | None = None
    ) -> replica_pb2.CallReply:
        """Run a unary call (``chunks``: its arguments' bytes, for another node's store
        session). Cancelling the awaiting task cancels it in the replica."""
        if self._same_node(target, request):
            try:
                return await self._local.unary(target, request)  # type: ignore[union-attr]
            except Unreachable:
                pass  # not usable from here after all: over gRPC for a while
        return await self._grpc.unary(target, request, chunks)

    async def open_stream(
        self,
        target: ReplicaTarget,
        request: replica_pb2.CallRequest,
        inputs: AsyncIterator[Any] | None = None,
        encode: Callable[[list[Any]], bytes] | None = None,
        chunks: list[memoryview] | None = None,
    ) -> FrameStream:
        """Start a stream and wait until the replica admitted it.

        With ``inputs`` the call is bidirectional: the caller's items are sent (after
        admission, so a rejected call consumed none of them) while frames come back.
        ``chunks``: as for :meth:`unary`. Cancelling the awaiting task cancels the call.
        """
        if inputs is None and self._same_node(target, request):
            try:
                return await self._local.open_stream(target, request)  # type: ignore[union-attr]
            except Unreachable:
                pass  # not usable from here after all: over gRPC for a while
        return await self._grpc.open_stream(target, request, inputs, encode, chunks)

    def forget(self, address: str) -> None:
        """The replica at ``address`` is gone: close its connections once unused."""
        self._grpc.forget(address)
        if self._local is not None:
            self._local.forget(address)

    async def aclose(self) -> None:
        if self._local is not None:
            await self._local.aclose()
        await self._grpc.aclose()
