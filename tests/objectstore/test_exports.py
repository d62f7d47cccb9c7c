"""Unary results waiting for a caller on another node to fetch them (``objectstore._carry``)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np

from streamwise.objectstore import _carry


def _exported(value: np.ndarray) -> bytes:
    """The fetch envelope of a chunked result carrying ``value``'s bytes."""
    envelope = bytes([_carry.CHUNKED]) + bytes(_carry._HEAD.size + 8)
    return _carry.EXPORTS.add(_carry.Outgoing(envelope, [memoryview(value)]))


def test_a_result_is_fetched_once_and_one_never_fetched_is_dropped_after_its_ttl(monkeypatch):
    """A caller that died between the reply and its fetch does not leave the result
    in the replica's memory: it is dropped EXPORT_TTL_S later. One fetched is gone
    at once: a second fetch of its ticket finds nothing."""
    monkeypatch.setattr(_carry, "EXPORT_TTL_S", 0.2)

    async def scenario() -> None:
        fetched = np.arange(3 * _carry.CHUNK_BYTES // 2, dtype=np.uint8)
        ticket = _carry.ticket_of(_exported(fetched))
        assert ticket is not None
        outgoing = _carry.EXPORTS.take(ticket)
        assert outgoing is not None and b"".join(outgoing.chunks()) == fetched.tobytes()
        assert _carry.EXPORTS.take(ticket) is None

        forgotten = np.ones(1_000_000, dtype=np.uint8)
        alive = weakref.ref(forgotten)
        ticket = _carry.ticket_of(_exported(forgotten))
        del forgotten
        gc.collect()
        assert alive() is not None  # kept for its caller
        await asyncio.sleep(0.5)
        gc.collect()
        assert alive() is None  # dropped: nothing of it is left in this process
        assert _carry.EXPORTS.take(ticket) is None

    asyncio.run(scenario())
