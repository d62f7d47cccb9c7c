"""The exceptions streamwise raises.

Every exception derives from one root, split by who must act::

    StreamwiseError
    ├── UsageError                  the caller misused the API (fix the calling code)
    │   ├── UnknownMethodError      the deployment has no such method
    │   └── SerializationError      a value the chosen codec cannot encode or decode
    ├── RemoteError                 user code raised in a replica (type, message, traceback)
    │   └── DeploymentStartupError  a replica's constructor kept failing; run() gives up
    ├── UnavailableError            no replica could take the call
    │   ├── ReplicaDiedError        the replica serving the call went away mid-call
    │   └── DeploymentNotFoundError the deployment does not exist (or was shut down)
    ├── BackPressureError           every replica stayed full for longer than allowed
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
    """A deployment's replicas failed to start (their constructor raised) too often."""

    def __str__(self) -> str:
        text = (
            f"deployment {self.deployment!r} failed to start: "
            f"{self.remote_type}: {self.remote_message}"
        )
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
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
    """Every replica of a deployment stayed at max_ongoing_requests too long."""


class RequestTimeoutError(StreamwiseError, TimeoutError):
    """A call did not finish before its deadline."""
