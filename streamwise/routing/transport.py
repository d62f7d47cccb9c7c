"""The data-path transport between a caller and a replica: gRPC on loopback or network.

This is the one place where gRPC errors become streamwise errors on the calling side.
A call that fails before the replica acknowledged it was never run, and comes back as
:class:`NotAccepted` so the router can retry it elsewhere; a call that fails after the
acknowledgement surfaces as :class:`~streamwise.exceptions.ReplicaDiedError` (or the
matching error), because its outcome is unknown.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from streamwise import exceptions
from streamwise.proto import replica_pb2, replica_pb2_grpc
from streamwise.streaming import _wire


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    deployment: str
    replica_id: str
    address: str


class NotAccepted(Exception):
    """The replica did not run the call: it was full (``full``) or unreachable/draining."""

    def __init__(self, target: ReplicaTarget, full: bool, detail: str) -> None:
        super().__init__(target, full, detail)
        self.target = target
        self.full = full
        self.detail = detail


def _acked(metadata: grpc.aio.Metadata | None) -> bool:
    return metadata is not None and _wire.ACK_KEY in metadata


def _map_error(
    exc: grpc.aio.AioRpcError, acked: bool, target: ReplicaTarget
) -> Exception:
    code = exc.code()
    details = exc.details() or ""
    if not acked:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_wire.REJECT_FULL):
            return NotAccepted(target, True, details)
        if code == grpc.StatusCode.UNAVAILABLE:
            return NotAccepted(target, False, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return exceptions.RequestTimeoutError(f"call to {target.deployment} passed its deadline")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return exceptions.ReplicaDiedError(target.deployment, target.replica_id, f"{code.name}: {details}")
    return exceptions.RemoteError(f"grpc.{code.name}", details, "", target.deployment, "")


class FrameStream:
    """An open server stream of frames from a replica; ``cancel()`` ends the RPC."""

    __slots__ = ("_call", "target")

    def __init__(self, call: grpc.aio.UnaryStreamCall, target: ReplicaTarget) -> None:
        self._call = call
        self.target = target

    async def read(self) -> replica_pb2.Frame | None:
        """The next frame, or None at the end of the stream.

        Cancelling the awaiting task cancels the RPC (and so the remote generator).
        """
        try:
            frame = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc, True, self.target) from exc
        except asyncio.CancelledError:
            self._call.cancel()
            raise
        if frame is grpc.aio.EOF:
            return None
        return frame

    def cancel(self) -> None:
        self._call.cancel()

    def done(self) -> bool:
        return self._call.done()


class GrpcTransport:
    """Channels to replicas, shared by every router on one event loop."""

    def __init__(self) -> None:
        self._stubs: dict[str, replica_pb2_grpc.ReplicaStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> replica_pb2_grpc.ReplicaStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=_wire.GRPC_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = replica_pb2_grpc.ReplicaStub(channel)
        return stub

    async def unary(self, target: ReplicaTarget, request: replica_pb2.CallRequest) -> replica_pb2.CallReply:
        """Run a unary call. Cancelling the awaiting task cancels the RPC."""
        call = self._stub(target.address).Call(request)
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            acked = _acked(await call.initial_metadata())
            raise _map_error(exc, acked, target) from exc
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def open_stream(self, target: ReplicaTarget, request: replica_pb2.CallRequest) -> FrameStream:
        """Start a server stream and wait until the replica admitted it."""
        call = self._stub(target.address).Stream(request)
        try:
            metadata = await call.initial_metadata()
            if not _acked(metadata):
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    raise _map_error(exc, False, target) from exc
                raise NotAccepted(target, False, "stream ended before it was accepted")
        except asyncio.CancelledError:
            call.cancel()
            raise
        return FrameStream(call, target)

    async def forget(self, address: str) -> None:
        """Close the channel to a replica that is gone."""
        self._stubs.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def aclose(self) -> None:
        for address in list(self._channels):
            await self.forget(address)
