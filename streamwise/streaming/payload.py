"""How the bytes of one call become Python values in a replica, and results bytes again.

Calls between streamwise processes carry codec-encoded values, by reference or by
value (``streamwise.objectstore.calls.ServerWire``). Calls forwarded by the ingress
carry the external client's protobuf bytes untouched (``RpcPayload``): they are
decoded with the user's generated message classes, never unpickled, and the lists
that group them into frames are msgpack.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgpack

from streamwise.exceptions import UsageError
from streamwise.streaming.schema import RpcMethod


class InvalidRequestError(UsageError):
    """An external request could not be decoded with its RPC's message type."""

    grpc_status = "INVALID_ARGUMENT"


class Payload(Protocol):
    chunked: bool  # results may carry chunks (see take_carried)

    def args(self, raw: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]: ...

    def inputs(self, raw: bytes) -> list[Any]: ...

    def value(self, result: Any) -> bytes: ...

    def items(self, batch: list[Any]) -> bytes: ...

    def take_carried(self) -> list[memoryview]: ...

    def close(self) -> None: ...


class RpcPayload:
    __slots__ = ("_rpc",)
    chunked = False

    def __init__(self, rpc: RpcMethod) -> None:
        self._rpc = rpc

    @property
    def target(self) -> str:
        """The deployment method that serves this RPC."""
        return self._rpc.target

    def message(self, raw: bytes) -> Any:
        """One request message, decoded (InvalidRequestError if it cannot be)."""
        return self._decode(raw)

    def message_bytes(self, result: Any) -> bytes:
        """One response message, encoded."""
        return self._rpc.encode(result)

    def _decode(self, raw: bytes) -> Any:
        try:
            return self._rpc.decode(raw)
        except Exception as exc:
            raise InvalidRequestError(f"cannot decode the request of {self._rpc.path}: {exc}") from exc

    def args(self, raw: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._rpc.client_streaming:
            return (), {}
        return (self._decode(raw),), {}

    def inputs(self, raw: bytes) -> list[Any]:
        return [self._decode(item) for item in unpack_messages(raw)]

    def value(self, result: Any) -> bytes:
        return self._rpc.encode(result)

    def items(self, batch: list[Any]) -> bytes:
        return pack_messages([self._rpc.encode(item) for item in batch])

    def take_carried(self) -> list[memoryview]:
        return []

    def close(self) -> None:
        pass


def pack_messages(messages: list[bytes]) -> bytes:
    """Group serialized messages into one frame body (msgpack: no code runs on load)."""
    return msgpack.packb(messages, use_bin_type=True)


def unpack_messages(raw: bytes) -> list[bytes]:
    return msgpack.unpackb(raw, raw=False)
