"""How a value travels by reference: an envelope naming where each part of it lives.

Encoding pickles the value with protocol 5. Buffers of at least the threshold (numpy
arrays, ``memoryview``; ``bytes`` and ``bytearray`` from 64 KiB up, see ``_Sink``)
leave the pickle stream: each goes to
a segment of its own, or, when it already lies in a segment this process holds (a
zero-copy view received earlier), it is named where it is, without a copy. The pickle
stream goes inline when smaller than the threshold, to a segment otherwise. The
envelope itself (a fixed header and 44 bytes per part, struct-packed, never pickled)
is what travels in the gRPC message.

Decoding maps each segment read-only and hands pickle views of it, so large arrays and
byte strings arrive as read-only views backed by shared memory: numpy arrays stay
arrays (not writeable); ``bytes``, ``bytearray`` and ``memoryview`` become read-only
``memoryview``s. msgpack and orjson payloads travel the same way as one opaque part
(no out-of-band buffers, no refs inside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any


from streamwise import codec as codecs
from streamwise.exceptions import SerializationError, StreamwiseError
from streamwise.objectstore._store import Held, Store

CODEC_IDS = {"cloudpickle": 1, "pickle": 2, "msgpack": 3, "orjson": 4}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
PICKLE_CODECS = frozenset({"cloudpickle", "pickle"})

_VERSION = 1  # (2 was an envelope with its segments' bytes inside; see _carry for 3 and 4)
_HEAD = struct.Struct("<BBBxIIQ")  # version, codec, main is a part, n buffers, n extra, inline length
_PART = struct.Struct("<16sQQQI")  # segment id, segment size, offset, length, pin (0: none)
_COUNT = struct.Struct("<I")
_SEGMENT = struct.Struct("<16sQQQ")  # segment id, segment size, offset and length of the bytes carried

_NEXT_BUFFER = pickle.NEXT_BUFFER  # protocol 5 opcode: push the next out-of-band buffer

# type -> reducer(obj, refs) for types the object store pickles specially (ObjectRef);
# filled in by the modules that define them, to keep imports one-way.
SPECIAL_REDUCERS: dict[type, Callable[[Any, list[Any]], tuple[Any, ...]]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """``length`` bytes at ``offset`` of segment ``segid`` (a file of ``size`` bytes)."""

    segid: str
    size: int
    offset: int
    length: int


class Payload:
    """An encoded value, holding every segment it lives in until it is dropped."""

    __slots__ = ("store", "codec", "inline", "main", "buffers", "extra", "_holds", "__weakref__")

    def __init__(
        self,
        store: Store,
        codec: str,
        inline: bytes | memoryview,
        main: Part | None,
        buffers: Sequence[Part],
        extra: Sequence[Part],
        holds: list[Held],
    ) -> None:
        self.store = store
        self.codec = codec
        self.inline = inline
        self.main = main
        self.buffers = tuple(buffers)
        self.extra = tuple(extra)  # segments of ObjectRefs inside the value
        self._holds = holds  # one per part, in the order of parts()

    def __del__(self) -> None:
        holds, self._holds = self._holds, []
        for held in holds:
            with contextlib.suppress(OSError):
                self.store.release(held)

    def parts(self) -> list[tuple[Part, Held]]:
        own = ([self.main] if self.main is not None else []) + list(self.buffers) + list(self.extra)
        return list(zip(own, self._holds, strict=True))

    @property
    def nbytes(self) -> int:
        return len(self.inline) + sum(p.length for p in ([self.main] if self.main else []) + list(self.buffers))

    # -- wire form -----------------------------------------------------------------

    def to_wire(self, pins: Sequence[int] = ()) -> bytes:
        """The envelope; ``pins`` gives each part's pin sequence number (results only)."""
        if not self._holds:  # all inline: the common case of small calls
            return _HEAD.pack(_VERSION, CODEC_IDS[self.codec], 0, 0, 0, len(self.inline)) + self.inline
        parts = [p for p, _ in self.parts()]
        pins = list(pins) or [0] * len(parts)
        head = _HEAD.pack(
            _VERSION,
            CODEC_IDS[self.codec],
            self.main is not None,
            len(self.buffers),
            len(self.extra),
            len(self.inline),
        )
        body = b"".join(
            _PART.pack(bytes.fromhex(p.segid), p.size, p.offset, p.length, pin)
            for p, pin in zip(parts, pins, strict=True)
        )
        return head + body + self.inline

    @classmethod
    def from_wire(cls, store: Store, data: bytes | memoryview, call: tuple[int, int] = (0, 0)) -> Payload:
        """Hold every segment the envelope names, then drop the pins that kept them
        alive in transit (``call``: the (anchor, call) being answered)."""
        view = memoryview(data)
        try:
            version, codec_id, has_main, n_buffers, n_extra, inline_len = _HEAD.unpack_from(view, 0)
        except struct.error:
            raise SerializationError("streamwise", "truncated object store envelope") from None
        if version != _VERSION or codec_id not in CODEC_NAMES:
            raise SerializationError("streamwise", f"unknown object store envelope (version {version})")
        offset = _HEAD.size
        if not (has_main or n_buffers or n_extra):
            return cls(store, CODEC_NAMES[codec_id], view[offset : offset + inline_len], None, (), (), [])
        parts: list[tuple[Part, int]] = []
        for _ in range(has_main + n_buffers + n_extra):
            segid, size, start, length, pin = _PART.unpack_from(view, offset)
            offset += _PART.size
            parts.append((Part(segid.hex(), size, start, length), pin))
        inline = view[offset : offset + inline_len]
        holds: list[Held] = []
        try:
            for part, pin in parts:
                holds.append(store.hold(part.segid, part.size))
                if pin:
                    store.session.unpin(call[0], call[1], pin, part.segid, part.size)
        except BaseException:
            for held in holds:
                store.release(held)
            raise
        own = [p for p, _ in parts]
        main = own[0] if has_main else None
        return cls(
            store,
            CODEC_NAMES[codec_id],
            inline,
            main,
            own[has_main : has_main + n_buffers],
            own[has_main + n_buffers :],
            holds,
        )

    # -- decoding ------------------------------------------------------------------

    def _view(self, index: int, part: Part) -> memoryview:
        return self.store.view(self._holds[index])[part.offset : part.offset + part.length]

    def value(self) -> Any:
        """The value, its large buffers as read-only views of the shared segments."""
        first = 0
        if self.main is not None:
            main: bytes | memoryview = self._view(0, self.main)
            first = 1
        else:
            main = self.inline
        if self.codec not in PICKLE_CODECS:
            return codecs.get_codec(self.codec).loads(main)  # type: ignore[arg-type]
        buffers = [self._view(first + i, part) for i, part in enumerate(self.buffers)]
        try:
            return pickle.loads(main, buffers=buffers)
        except StreamwiseError:
            raise
        except Exception as exc:
            raise SerializationError(self.codec, f"{type(exc).__name__}: {exc}") from exc


# -- encoding ------------------------------------------------------------------------


class _Sink:
    """The pickler's output file: keeps the stream in chunks, and takes large ``bytes``
    and ``bytearray`` values out of band.

    The C pickler handles ``bytes`` before consulting ``reducer_override``, so they
    cannot be redirected there; but it writes any payload of 64 KiB or more with a
    ``write`` call of its own, right after the opcode and length. When that header is
    exactly what precedes a large payload here, it is replaced by NEXT_BUFFER and the
    payload becomes an out-of-band buffer; anything else stays in the stream.
    """

    __slots__ = ("chunks", "threshold", "oob")

    def __init__(self, threshold: int, oob: list[memoryview]) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.threshold = threshold
        self.oob = oob

    def write(self, data: Any) -> int:
        kind = type(data)
        if kind is bytes or kind is bytearray:
            size = len(data)
            if size >= self.threshold and self.chunks and self._take_header(kind, size):
                self.chunks.append(_NEXT_BUFFER)
                self.oob.append(memoryview(data))
                return size
            self.chunks.append(data if kind is bytes else bytes(data))
            return size
        # Any other buffer may borrow memory the pickler frees after this call.
        copy = bytes(data)
        self.chunks.append(copy)
        return len(copy)

    def _take_header(self, kind: type, size: int) -> bool:
        if kind is bytes:
            header = b"B" + struct.pack("<I", size) if size <= 0xFFFFFFFF else b"\x8e" + struct.pack("<Q", size)
        else:
            header = b"\x96" + struct.pack("<Q", size)
        last = memoryview(self.chunks[-1])
        if last.nbytes < len(header) or last[-len(header) :] != header:
            return False
        self.chunks[-1] = last[: -len(header)]
        return True


def _out_of_band(threshold: int, oob: list[memoryview], buffer: pickle.PickleBuffer) -> bool:
    raw = buffer.raw()
    if raw.nbytes >= threshold:
        oob.append(raw)
        return False  # out of band
    return True


def _memoryview_from(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer)
    if view.format != fmt or view.shape != shape:
        with contextlib.suppress(TypeError, ValueError):
            view = view.cast("B").cast(fmt, shape)
    return view


def _pickler_class(base: type) -> type:
    parent_override = getattr(base, "reducer_override", None)

    class _Pickler(base):  # type: ignore[misc,valid-type]
        def __init__(self, file: _Sink, threshold: int, oob: list[memoryview], refs: list[Any]) -> None:
            # Not a bound method: pickler -> callback -> pickler would be a reference
            # cycle, keeping every buffer (and the segments they view) until gc runs.
            super().__init__(file, protocol=5, buffer_callback=functools.partial(_out_of_band, threshold, oob))
            self._refs = refs

        def reducer_override(self, obj: Any) -> Any:
            kind = type(obj)
            special = SPECIAL_REDUCERS.get(kind)
            if special is not None:
                return special(obj, self._refs)
            if kind is memoryview:  # plain pickle cannot carry memoryviews at all
                source = pickle.PickleBuffer(obj) if obj.contiguous else obj.tobytes()
                return _memoryview_from, (source, obj.format, obj.shape)
            if parent_override is not None:
                return parent_override(self, obj)
            return NotImplemented

    return _Pickler


_PICKLERS = {"cloudpickle": _pickler_class(codecs.CloudPickler), "pickle": _pickler_class(pickle.Pickler)}


def serialize(value: Any, codec: str, threshold: int) -> tuple[list[Any], list[memoryview], list[Any]]:
    """``value`` as (its stream in chunks, its out-of-band buffers of ``threshold``
    bytes or more, the ObjectRefs inside it)."""
    oob: list[memoryview] = []
    refs: list[Any] = []
    if codec not in PICKLE_CODECS:
        return [codecs.get_codec(codec).dumps(value)], oob, refs
    sink = _Sink(threshold, oob)
    try:
        _PICKLERS[codec](sink, threshold, oob, refs).dump(value)
    except StreamwiseError:
        raise
    except Exception as exc:
        raise SerializationError(codec, f"{type(exc).__name__}: {exc}") from exc
    return sink.chunks, oob, refs


def encode(store: Store, value: Any, codec: str, threshold: int, *, store_main: bool = False) -> Payload:
    """Encode ``value``; parts of ``threshold`` bytes or more go to segments.

    ``store_main`` puts the pickle stream in a segment even when it is small (put()).
    """
    chunks, oob, refs = serialize(value, codec, threshold)
    length = sum(map(len, chunks))  # bytes, or 1-D byte views of them
    if length < threshold and not (store_main or oob or refs):
        return Payload(store, codec, chunks[0] if len(chunks) == 1 else b"".join(chunks), None, (), (), [])
    holds: list[Held] = []
    try:
        main: Part | None = None
        inline: bytes = b""
        if store_main or length >= threshold:
            held = store.create([memoryview(c).cast("B") for c in chunks])
            holds.append(held)
            main = Part(held.segid, held.size, 0, length)
        else:
            inline = b"".join(chunks)
        buffers = []
        for buffer in oob:
            found = store.locate(buffer)  # already in a segment: name it, do not copy
            if found is None:
                held, offset = store.create([buffer.cast("B")]), 0
            else:
                held, offset = found
            holds.append(held)
            buffers.append(Part(held.segid, held.size, offset, buffer.nbytes))
        extra = []
        for ref in refs:
            for part, held in ref._payload.parts():
                store.add_ref(held)
                holds.append(held)
                extra.append(part)
    except BaseException:
        for held in holds:
            store.release(held)
        raise
    return Payload(store, codec, inline, main, buffers, extra, holds)
