"""Sending one stream's yielded items as frames.

A producer task runs the user's generator and appends items to a bounded buffer; the
sender takes *everything* buffered each time the transport is free and writes it as
one frame. An idle stream therefore adds no delay (the first item leaves at once),
while a fast producer is never held to one gRPC message per item.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from streamwise.proto import replica_pb2
from streamwise.streaming import _wire

# Items buffered before the producer waits for the sender (backpressure).
MAX_PENDING_ITEMS = 4096


async def send_frames(
    items: AsyncIterator[Any],
    write: Callable[[replica_pb2.Frame], Awaitable[None]],
    encode: Callable[[list[Any]], bytes],
) -> Exception | None:
    """Drive ``items`` to the end and ``write`` them as frames.

    An exception from ``items`` is sent as a final error frame and returned. Cancellation (the
    caller went away) cancels the producer and closes ``items``, so the user
    generator's ``finally`` runs before this returns.
    """
    buffer: deque[Any] = deque()
    wake = asyncio.Event()
    room = asyncio.Event()
    outcome: list[Exception | None] = []

    async def produce() -> None:
        try:
            async for item in items:
                buffer.append(item)
                if len(buffer) == 1:
                    wake.set()
                    await asyncio.sleep(0)  # let the sender take it right away
                elif len(buffer) >= MAX_PENDING_ITEMS:
                    wake.set()
                    room.clear()
                    await room.wait()
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)
        finally:
            wake.set()
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    producer = asyncio.get_running_loop().create_task(produce())
    try:
        while True:
            if not buffer and not outcome:
                await wake.wait()
                wake.clear()
            if buffer:
                batch = list(buffer)
                buffer.clear()
                room.set()
                await write(replica_pb2.Frame(items=encode(batch), count=len(batch)))
            elif outcome:
                break
        error = outcome[0]
        if error is not None:
            await write(replica_pb2.Frame(error=_wire.error_to_proto(error)))
        return error
    finally:
        if not producer.done():
            producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
