"""Values for another node's store session: their segments' bytes follow in chunks.

A process of another node cannot map this node's segments. A by-reference call whose
caller and callee live in different store sessions therefore sends a *chunked
envelope* (version 3): the usual parts and inline stream, then a table of the
segments it carries (id, size, and the range of bytes used in each). The bytes of
those ranges follow on the same RPC, in table order, as raw messages of at most
``CHUNK_BYTES`` each (``CallReply.chunk``, ``Frame.chunk``, ``StreamInput.chunk``),
so no message ever holds a large value whole, and neither side joins or
re-serializes it.

Sending (:func:`encode_for_node`): parts that already live in a segment (refs inside
the value, views received earlier) are read from their shared mapping; everything
else (a result pickled for a caller on another node) never goes to shared memory on
this node at all: its chunks are cut from the pickler's buffers, e.g. a numpy
array's own memory.

A unary ``Call`` answers with one message, so a result it returns to another node
is *fetched*: the reply holds a fetch envelope (the chunked one and a ticket), and
the caller at once asks the callee for its bytes (``Fetch``, on the same
authenticated channel), which stream back as chunks. Until then the callee keeps
them in memory (:data:`EXPORTS`), at most EXPORT_TTL_S if the caller never asks.
Small calls thus stay plain unary RPCs; only a large result costs a round trip
more. Arguments travel the other way as chunks after the call (``CallCarried``,
or ``Channel`` for streams), read by the replica once it admitted the call.

Receiving (:class:`Incoming`): each chunk is written straight into the segment it
belongs to, at its offset, in a file of this node's session under a temporary name
(see ``Store.begin_adopt``), under the *same* segment id, so refs nested in the value
keep naming it. Once every byte is in, :meth:`Incoming.finish` publishes the
segments and pins each part under the receiving call (as a callee on the same node
pins its results, see ``calls``): the envelope it returns is an ordinary version-1
one, decoded the usual way, and a call that ends before decoding it clears the pins.
:meth:`Incoming.abort` (a cancelled call, a dead peer) removes the partly written
files: nothing is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
from collections.abc import Iterator
from typing import Any

from streamwise.exceptions import SerializationError
from streamwise.objectstore._payload import (
    _COUNT,
    _HEAD,
    _PART,
    _SEGMENT,
    _VERSION,
    CODEC_IDS,
    serialize,
)
from streamwise.objectstore._session import PAGE
from streamwise.objectstore._store import Adoption, Held, Store

CHUNKED = 3  # envelope version: the carried segments' bytes follow in chunks
FETCH = 4  # a chunked envelope and a ticket: its bytes are fetched (Fetch RPC)
_TICKET = 16
_MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python's mmap module before 3.13
# How long a replica keeps a unary result's bytes for a caller on another node
# that has not fetched them (it fetches at once unless it died or gave up).
EXPORT_TTL_S = 60.0
# Bytes per chunk message: large enough that per-message costs vanish, small enough
# that the sender's and receiver's copies of one chunk stay in cache-friendly,
# reused allocations (see benchmarks/carry_bench.py).
CHUNK_BYTES = 512 << 10


def is_chunked(data: bytes | memoryview) -> bool:
    """Whether ``data`` is a chunked envelope (its segments' bytes follow it)."""
    return len(data) > 0 and data[0] == CHUNKED


def ticket_of(data: bytes | memoryview) -> bytes | None:
    """The ticket of a fetch envelope, None for any other."""
    return bytes(data[-_TICKET:]) if len(data) > _HEAD.size + _TICKET and data[0] == FETCH else None


class _Exports:
    """This process's results waiting to be fetched by callers on other nodes, each
    under an unguessable ticket: taken by the fetch, or dropped after EXPORT_TTL_S.
    They live in this process's memory (or map segments it holds), never in new
    files: a caller that never fetches leaves nothing in /dev/shm once they expire."""

    def __init__(self) -> None:
        self._pieces: dict[bytes, list[memoryview]] = {}

    def add(self, outgoing: Outgoing) -> bytes:
        """The fetch envelope of ``outgoing`` (call on an event loop)."""
        ticket = secrets.token_bytes(_TICKET)
        self._pieces[ticket] = outgoing.pieces
        asyncio.get_running_loop().call_later(EXPORT_TTL_S, self._pieces.pop, ticket, None)
        return bytes([FETCH]) + outgoing.envelope[1:] + ticket

    def take(self, ticket: bytes) -> Outgoing | None:
        pieces = self._pieces.pop(ticket, None)
        return None if pieces is None else Outgoing(b"", pieces)


EXPORTS = _Exports()


class Outgoing:
    """A chunked envelope and the bytes it carries (views: nothing is copied here)."""

    __slots__ = ("envelope", "pieces")

    def __init__(self, envelope: bytes, pieces: list[memoryview]) -> None:
        self.envelope = envelope
        self.pieces = pieces  # the carried ranges, in table order

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def chunks(self) -> Iterator[memoryview]:
        """The carried bytes in messages of at most CHUNK_BYTES (one piece may span several)."""
        for piece in self.pieces:
            for start in range(0, piece.nbytes, CHUNK_BYTES):
                yield piece[start : start + CHUNK_BYTES]


class _Segments:
    """The table of a chunked envelope being built: (segment, size) -> range and bytes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.new: dict[tuple[str, int], list[memoryview]] = {}  # segments made for this value
        self.shared: dict[tuple[str, int], tuple[int, int, memoryview]] = {}  # low, high, mapping

    def make(self, sources: list[memoryview]) -> tuple[str, int]:
        length = sum(s.nbytes for s in sources)
        key = (secrets.token_hex(16), max(PAGE, -(-length // PAGE) * PAGE))
        self.new[key] = sources
        return key

    def share(self, held: Held, offset: int, length: int) -> None:
        key = (held.segid, held.size)
        found = self.shared.get(key)
        if found is None:
            mapping = self.store.view(held)
            _populate(mapping)
            self.shared[key] = (offset, offset + length, mapping)
        else:
            self.shared[key] = (min(found[0], offset), max(found[1], offset + length), found[2])

    def table(self) -> tuple[list[bytes], list[memoryview]]:
        rows, pieces = [], []
        for (segid, size), sources in self.new.items():
            rows.append(_SEGMENT.pack(bytes.fromhex(segid), size, 0, sum(s.nbytes for s in sources)))
            pieces += [s for s in sources if s.nbytes]
        for (segid, size), (low, high, mapping) in self.shared.items():
            rows.append(_SEGMENT.pack(bytes.fromhex(segid), size, low, high - low))
            pieces.append(mapping[low:high])
        return rows, pieces


def _populate(mapping: memoryview) -> None:
    """Fill in the page tables of a mapping about to be read whole: one system call
    instead of a page fault every 4 KiB in the middle of the transfer."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # kernels before 5.14
        mapping.obj.madvise(_MADV_POPULATE_READ)  # type: ignore[union-attr]


def encode_for_node(store: Store, value: Any, codec: str, threshold: int) -> Outgoing:
    """Encode ``value`` for a process of another node's session: an ordinary inline
    envelope when it is small, a chunked one otherwise (see the module docstring)."""
    chunks, oob, refs = serialize(value, codec, threshold)
    stream = [memoryview(c).cast("B") for c in chunks]
    length = sum(c.nbytes for c in stream)
    codec_id = CODEC_IDS[codec]
    if length < threshold and not (oob or refs):
        inline = b"".join(stream)
        return Outgoing(_HEAD.pack(_VERSION, codec_id, 0, 0, 0, len(inline)) + inline, [])
    segments = _Segments(store)
    parts: list[bytes] = []
    inline = b""
    if length >= threshold:
        segid, size = segments.make(stream)
        parts.append(_PART.pack(bytes.fromhex(segid), size, 0, length, 0))
    else:
        inline = b"".join(stream)
    for buffer in oob:
        found = store.locate(buffer)  # a view of a segment held here: carry that segment
        if found is None:
            segid, size = segments.make([buffer.cast("B")])
            parts.append(_PART.pack(bytes.fromhex(segid), size, 0, buffer.nbytes, 0))
            continue
        held, offset = found
        try:
            segments.share(held, offset, buffer.nbytes)
            parts.append(_PART.pack(bytes.fromhex(held.segid), held.size, offset, buffer.nbytes, 0))
        finally:
            store.release(held)  # the mapping taken by share() keeps it while we send
    n_extra = 0
    for ref in refs:
        for part, held in ref._payload.parts():
            segments.share(held, part.offset, part.length)
            parts.append(_PART.pack(bytes.fromhex(part.segid), part.size, part.offset, part.length, 0))
            n_extra += 1
    has_main = length >= threshold
    rows, pieces = segments.table()
    head = _HEAD.pack(CHUNKED, codec_id, has_main, len(oob), n_extra, len(inline))
    return Outgoing(b"".join([head, *parts, inline, _COUNT.pack(len(rows)), *rows]), pieces)


def chunk_envelope(store: Store, data: bytes) -> Outgoing:
    """The version-1 envelope ``data`` (whose parts this process holds until the
    chunks are sent) as a chunked one, carrying the segments it names."""
    view = memoryview(data)
    version, codec_id, has_main, n_buffers, n_extra, inline_len = _HEAD.unpack_from(view, 0)
    count = has_main + n_buffers + n_extra
    if version != _VERSION or not count:
        return Outgoing(data, [])
    segments = _Segments(store)
    parts = []
    offset = _HEAD.size
    holds = []
    try:
        for _ in range(count):
            segid, size, start, length, _pin = _PART.unpack_from(view, offset)
            offset += _PART.size
            parts.append(_PART.pack(segid, size, start, length, 0))
            holds.append(held := store.hold(segid.hex(), size))
            segments.share(held, start, length)
    finally:
        for held in holds:  # the mappings share() took keep them while we send
            store.release(held)
    rows, pieces = segments.table()
    head = _HEAD.pack(CHUNKED, codec_id, has_main, n_buffers, n_extra, inline_len)
    inline = view[offset : offset + inline_len]
    return Outgoing(b"".join([head, *parts, inline, _COUNT.pack(len(rows)), *rows]), pieces)


class Incoming:
    """The segments a chunked envelope carries, written into this node's session as
    their chunks arrive. End with :meth:`finish` or :meth:`abort` (idempotent)."""

    def __init__(self, store: Store, envelope: bytes | memoryview) -> None:
        view = memoryview(envelope)
        try:
            version, _, has_main, n_buffers, n_extra, inline_len = _HEAD.unpack_from(view, 0)
            body = _HEAD.size + (has_main + n_buffers + n_extra) * _PART.size + inline_len
            (count,) = _COUNT.unpack_from(view, body)
            rows = [_SEGMENT.unpack_from(view, body + _COUNT.size + i * _SEGMENT.size) for i in range(count)]
        except struct.error:
            raise SerializationError("streamwise", "truncated chunked envelope") from None
        if version not in (CHUNKED, FETCH):
            raise SerializationError("streamwise", f"not a chunked envelope (version {version})")
        self.store = store
        self._view = view
        self._counts = (has_main, n_buffers, n_extra, inline_len)
        self._rows = [(segid.hex(), size, low, length) for segid, size, low, length in rows]
        for segid, size, low, length in self._rows:
            if low + length > size:
                raise SerializationError("streamwise", "chunked envelope: a range past its segment")
        self.needed = sum(row[3] for row in self._rows)  # bytes still to come
        self._adoptions: list[Adoption] = []
        self._index = 0  # the row being written
        self._written = 0  # bytes of it written
        try:
            for segid, size, _, _ in self._rows:
                self._adoptions.append(store.begin_adopt(segid, size))
        except BaseException:
            self.abort()
            raise

    def feed(self, chunk: bytes | memoryview) -> None:
        """Write the next chunk's bytes where they belong."""
        data = memoryview(chunk).cast("B")
        if data.nbytes > self.needed:
            raise SerializationError("streamwise", "more chunk bytes than the envelope carries")
        self.needed -= data.nbytes
        while data.nbytes:
            _, _, low, length = self._rows[self._index]
            take = min(length - self._written, data.nbytes)
            self._adoptions[self._index].write(low + self._written, data[:take])
            data = data[take:]
            self._written += take
            if self._written == length:
                self._index += 1
                self._written = 0

    def finish(self, anchor: int, call: int, seqs: Iterator[int]) -> bytes:
        """Publish the segments and pin each part under call (``anchor``, ``call``)
        with pin numbers from ``seqs``: the version-1 envelope to decode."""
        store = self.store
        held = self._publish()
        pinned: list[tuple[int, str, int]] = []

        def pin(part_held: Held) -> int:
            seq = next(seqs)
            store.pin(part_held, anchor, call, seq)
            pinned.append((seq, part_held.segid, part_held.size))
            return seq

        try:
            return self._envelope(held, pin)
        except BaseException:
            for seq, segid, size in pinned:
                store.session.unpin(anchor, call, seq, segid, size)
            raise
        finally:
            for h in held.values():  # the pins keep them now
                store.release(h)

    def finish_held(self) -> tuple[bytes, list[Held]]:
        """Publish the segments: the version-1 envelope to decode, and this process's
        holds on them, to release once it is decoded."""
        held = self._publish()
        try:
            return self._envelope(held, lambda _: 0), list(held.values())
        except BaseException:
            for h in held.values():
                self.store.release(h)
            raise

    def _publish(self) -> dict[str, Held]:
        if self.needed:
            raise SerializationError("streamwise", f"chunked envelope: {self.needed} bytes missing")
        held: dict[str, Held] = {}
        try:
            while self._adoptions:
                adoption = self._adoptions.pop()
                held[adoption.segid] = self.store.end_adopt(adoption)
        except BaseException:
            for h in held.values():
                self.store.release(h)
            raise
        return held

    def _envelope(self, held: dict[str, Held], pin: Any) -> bytes:
        """The version-1 envelope naming the published segments; ``pin(held)`` gives
        each part's pin number."""
        has_main, n_buffers, n_extra, inline_len = self._counts
        view = self._view
        out: list[bytes | memoryview] = [_HEAD.pack(_VERSION, view[1], has_main, n_buffers, n_extra, inline_len)]
        offset = _HEAD.size
        for _ in range(has_main + n_buffers + n_extra):
            segid, size, start, length, _pin = _PART.unpack_from(view, offset)
            offset += _PART.size
            part_held = held.get(segid.hex())
            if part_held is None or part_held.size != size:
                raise SerializationError("streamwise", "chunked envelope: a part's segment is not carried")
            out.append(_PART.pack(segid, size, start, length, pin(part_held)))
        out.append(view[offset : offset + inline_len])
        return b"".join(out)

    def abort(self) -> None:
        """Give up: partly written segments are removed."""
        while self._adoptions:
            self.store.cancel_adopt(self._adoptions.pop())
