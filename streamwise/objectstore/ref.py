"""``ObjectRef``, ``put`` and ``get``: values in node-local shared memory, by name.

``ref = streamwise.put(value)`` stores a value once; the ref is small, and passing it
to a by-reference handle call (the default) sends only its name: any process of the
same driver on this machine reads the value from the same memory. ``get(ref)`` (or
``await ref``) decodes it; buffers of at least the by-reference threshold (100 KiB by
default) come back as read-only views of the shared memory, without a copy.

A value lives while any process holds a ref to it, a view of it, or a call in flight
carries it; then its memory is freed (or reused for the next value).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from streamwise.config import env_transport_config
from streamwise.exceptions import UsageError
from streamwise.objectstore._payload import SPECIAL_REDUCERS, Payload, encode
from streamwise.objectstore._process import current_store

_ID_BYTES = 16


class ObjectRef:
    """The name of a value in the object store; see :func:`put`.

    ``await ref`` or :func:`get` returns the value. The value stays stored while this
    ref (or a copy of it in any process, or a view of its buffers) exists.
    """

    __slots__ = ("_id", "_payload", "__weakref__")

    def __init__(self, object_id: bytes, payload: Payload) -> None:
        self._id = object_id
        self._payload = payload

    @property
    def object_id(self) -> str:
        """The ref's identity, as hex."""
        return self._id.hex()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored value (its pickle stream and out-of-band buffers)."""
        return self._payload.nbytes

    def __repr__(self) -> str:
        return f"ObjectRef({self.object_id}, {self.nbytes} bytes)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __await__(self) -> Generator[Any, None, Any]:
        """The value. Nothing remote is awaited (the value is already stored), so
        cancellation only takes effect before the value is decoded."""
        return _value_of(self).__await__()

    def __reduce__(self) -> Any:
        raise UsageError(
            "an ObjectRef travels only as an argument or result of a by-reference handle "
            "call (by_reference=True, the default) or inside a value given to put(); "
            "it cannot be pickled any other way (for example through a by_reference=False handle)"
        )

    def _wire(self) -> bytes:
        return self._id + self._payload.to_wire()


def _rebuild(wire: bytes) -> ObjectRef:
    """Unpickling a ref (in whichever process reads it) takes this process's holds."""
    payload = Payload.from_wire(current_store(), memoryview(wire)[_ID_BYTES:])
    return ObjectRef(bytes(wire[:_ID_BYTES]), payload)


def _reduce_ref(ref: ObjectRef, refs: list[Any]) -> tuple[Any, ...]:
    refs.append(ref)  # the enclosing payload holds (or pins) the ref's segments too
    return _rebuild, (ref._wire(),)


SPECIAL_REDUCERS[ObjectRef] = _reduce_ref


def ref_of(payload: Payload) -> ObjectRef:
    """A new ref to an already-held payload (a by-reference call's result)."""
    return ObjectRef(os.urandom(_ID_BYTES), payload)


async def _value_of(ref: ObjectRef) -> Any:
    return ref._payload.value()


def put(value: Any) -> ObjectRef:
    """Store ``value`` in this machine's shared memory and return its ref.

    The value is pickled (cloudpickle) once; numpy arrays and byte strings of at
    least the by-reference threshold are copied into shared memory as they are, and
    read back without a copy. Raises ObjectStoreFullError when the value does not fit
    in ``object_store_memory``.
    """
    threshold = env_transport_config().by_reference_threshold_bytes
    return ref_of(encode(current_store(), value, "cloudpickle", threshold, store_main=True))


def get(refs: ObjectRef | list[ObjectRef] | tuple[ObjectRef, ...]) -> Any:
    """The value of a ref, or a list of the values of a list of refs.

    Large buffers come back as read-only views of shared memory (numpy arrays stay
    arrays; ``bytes``, ``bytearray`` and ``memoryview`` become read-only memoryviews);
    ``bytes(view)`` or ``array.copy()`` makes a private, writable copy.
    """
    if isinstance(refs, ObjectRef):
        return refs._payload.value()
    if isinstance(refs, (list, tuple)) and all(isinstance(r, ObjectRef) for r in refs):
        return [r._payload.value() for r in refs]
    raise UsageError(f"get() takes an ObjectRef or a list of them, not {type(refs).__name__}")
