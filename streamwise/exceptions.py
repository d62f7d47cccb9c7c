"""The exceptions streamwise raises.

Every exception derives from one root, split by who must act::

    StreamwiseError
    ├── UsageError                  the caller misused the API (fix the calling code)
    │   ├── UnknownMethodError      the deployment has no such method
    │   ├── SerializationError      a value the chosen codec cannot encode or decode
    │   ├── MessageTooLargeError    an inline (by value) payload exceeds the gRPC message limit
    │   └── ObjectLostError         an ObjectRef whose value no longer exists (its session ended)
    ├── RemoteError                 user code raised in a replica (type, message, traceback)
    │   └── DeploymentStartupError  a replica's constructor kept failing; run() gives up
    ├── UnavailableError            no replica could take the call
    │   ├── ReplicaDiedError        the replica serving the call went away mid-call
    │   └── DeploymentNotFoundError the deployment does not exist (or was shut down)
    ├── BackPressureError           too many calls already wait for the deployment (max_queued_requests)
    ├── ObjectStoreFullError        the object store has no room for a value (object_store_memory)
    └── RequestTimeoutError         the call passed its deadline

Cancellation is never reported as one of these: a cancelled call raises
``asyncio.CancelledError`` in the awaiting task, as any cancelled await does.

Every exception survives a pickle round trip (all constructor arguments are forwarded
to ``BaseException.__init__``), so errors can cross process boundaries unchanged.
"""

from __future__ import annotations

__all__ = [
    "BackPressureError",
    "DeploymentNotFoundError",
    "DeploymentStartupError",
    "MessageTooLargeError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "RemoteError",
    "ReplicaDiedError",
    "RequestTimeoutError",
    "SerializationError",
    "StreamwiseError",
    "UnavailableError",
    "UnknownMethodError",
    "UsageError",
]


class StreamwiseError(Exception):
    """Root of every exception raised by streamwise."""


class UsageError(StreamwiseError):
    """The API was called in a way that cannot work; the calling code must change."""


class UnknownMethodError(UsageError, AttributeError):
    """A handle was asked for a method its deployment does not define."""

    def __init__(self, deployment: str, method: str, available: tuple[str, ...] = ()) -> None:
        super().__init__(deployment, method, available)
        self.deployment = deployment
        self.method = method
        self.available = tuple(available)

    def __str__(self) -> str:
        listed = ", ".join(self.available) or "none"
        return (
            f"deployment {self.deployment!r} has no method {self.method!r} "
            f"(methods: {listed})"
        )


class SerializationError(UsageError):
    """A value could not be encoded or decoded by the named codec."""

    def __init__(self, codec: str, detail: str) -> None:
        super().__init__(codec, detail)
        self.codec = codec
        self.detail = detail

    def __str__(self) -> str:
        return f"codec {self.codec!r} cannot handle this value: {self.detail}"


class MessageTooLargeError(UsageError):
    """A payload sent inline over gRPC is larger than the configured message limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(what, size, limit)
        self.what = what
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"{self.what} of {self.size} bytes exceed the inline gRPC message limit of "
            f"{self.limit} bytes (STREAMWISE_GRPC_MAX_MESSAGE_LENGTH); send large values by "
            "reference (handle.options(by_reference=True), the default) or raise the limit"
        )


class ObjectLostError(UsageError):
    """An ObjectRef names a value that no longer exists: its store session ended
    (shutdown, or the driver died) or the ref was revived from stale bytes."""

    def __init__(self, object_id: str, detail: str = "") -> None:
        super().__init__(object_id, detail)
        self.object_id = object_id
        self.detail = detail

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"object {self.object_id} no longer exists{extra}"


class RemoteError(StreamwiseError):
    """User code raised an exception inside a replica.

    ``remote_type`` is the qualified name of the original exception type,
    ``remote_message`` its message and ``remote_traceback`` the formatted traceback
    from the replica process.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        deployment: str = "",
        method: str = "",
    ) -> None:
        super().__init__(remote_type, remote_message, remote_traceback, deployment, method)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.deployment = deployment
        self.method = method

    def __str__(self) -> str:
        where = f" in {self.deployment}.{self.method}" if self.deployment else ""
        text = f"{self.remote_type}: {self.remote_message} (raised{where})"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class DeploymentStartupError(RemoteError):
    """A deployment's replicas failed to start (their constructor raised) too often.

    A replica process that exited before it could report an error has remote_type
    ``ProcessExited`` and, in place of a traceback, what it last wrote to stderr.
    """

    def __str__(self) -> str:
        text = (
            f"deployment {self.deployment!r} failed to start: "
            f"{self.remote_type}: {self.remote_message}"
        )
        if self.remote_traceback:
            heading = "Its last output" if self.remote_type == "ProcessExited" else "Remote traceback"
            text += f"\n\n{heading}:\n" + self.remote_traceback.rstrip()
        return text


class UnavailableError(StreamwiseError):
    """No replica could serve the call."""


class ReplicaDiedError(UnavailableError):
    """The replica serving an in-flight call died; the call's outcome is unknown."""

    def __init__(self, deployment: str, replica_id: str, detail: str = "") -> None:
        super().__init__(deployment, replica_id, detail)
        self.deployment = deployment
        self.replica_id = replica_id
        self.detail = detail

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"replica {self.replica_id} of deployment {self.deployment!r} died mid-call{extra}"


class DeploymentNotFoundError(UnavailableError):
    """The named deployment is not running (never deployed, or shut down)."""

    def __init__(self, deployment: str, detail: str = "") -> None:
        super().__init__(deployment, detail)
        self.deployment = deployment
        self.detail = detail

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"deployment {self.deployment!r} is not running{extra}"


class BackPressureError(StreamwiseError):
    """A call was refused at once: ``max_queued_requests`` calls of this caller already
    wait for a replica of the deployment with room. Shed load or retry later."""

    grpc_status = "RESOURCE_EXHAUSTED"

    def __init__(self, deployment: str, queued: int = 0, limit: int = 0) -> None:
        super().__init__(deployment, queued, limit)
        self.deployment = deployment
        self.queued = queued
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"deployment {self.deployment!r} is overloaded: {self.queued} calls already wait for a replica "
            f"(max_queued_requests={self.limit})"
        )


class ObjectStoreFullError(StreamwiseError):
    """A value does not fit in the object store's capacity (``object_store_memory``).

    Free memory by dropping ObjectRefs (and views of stored values), or raise
    ``STREAMWISE_OBJECT_STORE_MEMORY``.
    """

    def __init__(self, requested: int, used: int, capacity: int, detail: str = "") -> None:
        super().__init__(requested, used, capacity, detail)
        self.requested = requested
        self.used = used
        self.capacity = capacity
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"object store full: {self.requested} bytes do not fit, {self.used} of "
            f"{self.capacity} bytes in use{extra}; drop ObjectRefs or raise "
            "STREAMWISE_OBJECT_STORE_MEMORY"
        )


class RequestTimeoutError(StreamwiseError, TimeoutError):
    """A call did not finish before its deadline."""
