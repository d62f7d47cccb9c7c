"""One call to one replica: whom it goes to, and what its failures mean.

This is the one place where transport errors become streamwise errors on the calling
side, for every transport. A call that fails before the replica acknowledged it was
never run, and comes back as :class:`NotAccepted` so the router can retry it
elsewhere; a call that fails after the acknowledgement surfaces as
:class:`~streamwise.exceptions.ReplicaDiedError` (or the matching error), because its
outcome is unknown.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import grpc

from streamwise import exceptions
from streamwise.proto import replica_pb2
from streamwise.streaming import _wire


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    deployment: str
    replica_id: str
    address: str  # gRPC target of the replica (unix:PATH on this machine)
    local_address: str = ""  # its same-node socket, when the caller is on its machine
    store_session: str = ""  # its object store session ("": the caller's)


class FrameStream(Protocol):
    """An open stream of frames from a replica, on any transport."""

    target: ReplicaTarget
    died: bool  # the replica went away mid-stream

    async def read(self) -> replica_pb2.Frame | None:
        """The next frame, or None at the end; cancelling the awaiting task cancels the call."""

    def cancel(self) -> None:
        """End the call (the remote generator is cancelled); later reads return None."""


class NotAccepted(Exception):
    """The replica did not run the call: it was full (``full``) or unreachable/draining."""

    def __init__(self, target: ReplicaTarget, full: bool, detail: str) -> None:
        super().__init__(target, full, detail)
        self.target = target
        self.full = full
        self.detail = detail


def map_error(code: grpc.StatusCode, details: str | None, acked: bool, target: ReplicaTarget) -> Exception:
    """The streamwise error for a call that ended with gRPC status ``code``."""
    details = details or ""
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


def cancelled_by_caller() -> bool:
    """True when the running task itself is being cancelled (not just the call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
