"""Sending one stream's yielded items as frames.

A producer task runs the user's generator and appends items to a bounded buffer; the
sender takes *everything* buffered each time the transport is free and writes it as
one frame. An idle stream therefore adds no delay (the first item leaves at once),
while a fast producer is never held to one gRPC message per item.

A :class:`~streamwise.config.CoalesceConfig` other than the default shapes frames:
``max_items`` and ``max_bytes`` cap a frame (the rest waits for the next one), and
``max_delay_s`` lets the sender hold the oldest buffered item up to that long while
the frame fills, never longer.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from streamwise._event_loop import DUE_WITHIN_S
from streamwise.config import DEFAULT_COALESCE, CoalesceConfig
from streamwise.proto import replica_pb2

# Items buffered before the producer waits for the sender (backpressure).
MAX_PENDING_ITEMS = 4096

# A producer whose generator never awaits lets the loop run (a cancellation, other
# calls, the sender) once it has run this long without a pause; the clock is read
# every PRODUCER_CHECK_ITEMS items (a power of two): a few percent of a fast stream.
PRODUCER_TURN_S = 0.0001
PRODUCER_CHECK_ITEMS = 4

# On asyncio's own loop timers fire up to about a millisecond late (epoll waits in
# whole milliseconds, rounded up), so a hold ends this much early: a frame never
# waits past max_delay_s because of the timer. On uvloop (the replicas' loop) timers
# may fire early instead; the hold then waits again for what is left, unless that is
# below DUE_WITHIN_S. So a max_delay_s below TIMER_SLACK_S + DUE_WITHIN_S holds nothing.
TIMER_SLACK_S = 0.001


async def send_frames(
    items: AsyncIterator[Any],
    write: Callable[[replica_pb2.Frame], Awaitable[None]],
    encode: Callable[[list[Any]], bytes],
    policy: CoalesceConfig = DEFAULT_COALESCE,
) -> Exception | None:
    """Drive ``items`` to the end and ``write`` them as frames shaped by ``policy``.

    An exception from ``items`` is returned after every item before it was written;
    the caller sends it (as a final error frame, once its span of the request has
    ended). Cancellation (the
    caller went away) cancels the producer and closes ``items``, so the user
    generator's ``finally`` runs before this returns.
    """
    buffer: deque[Any] = deque()
    wake = asyncio.Event()
    room = asyncio.Event()
    outcome: list[Exception | None] = []
    # Only a policy that holds items needs their arrival times.
    delay = policy.max_delay_s
    arrivals: deque[float] | None = deque() if delay > 0 else None
    # With a hold, the producer wakes the sender early once a capped frame is full.
    full_at = policy.max_items or MAX_PENDING_ITEMS
    # While a frame is being written, new items wait for the next frame anyway: the
    # producer keeps going instead of handing over each one (which would make frames
    # of one item whenever writes are quick, as on the same-node transport).
    sending = False

    async def produce() -> None:
        turn_ends = time.monotonic() + PRODUCER_TURN_S
        try:
            async for item in items:
                buffer.append(item)
                if arrivals is not None:
                    arrivals.append(time.monotonic())
                pending = len(buffer)
                if pending == 1:
                    wake.set()
                    if not sending:
                        await asyncio.sleep(0)  # let the sender take it right away
                        turn_ends = time.monotonic() + PRODUCER_TURN_S
                elif pending >= MAX_PENDING_ITEMS:
                    wake.set()
                    room.clear()
                    await room.wait()
                    turn_ends = time.monotonic() + PRODUCER_TURN_S
                elif pending == full_at and arrivals is not None:
                    wake.set()
                elif not pending & (PRODUCER_CHECK_ITEMS - 1) and time.monotonic() >= turn_ends:
                    await asyncio.sleep(0)  # a generator that never awaits must not hold the loop
                    turn_ends = time.monotonic() + PRODUCER_TURN_S
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)
        except asyncio.CancelledError as exc:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the stream itself is being cancelled
            outcome.append(exc)  # user code raised CancelledError: an error like any other
        finally:
            if not outcome:
                outcome.append(None)  # never leave the sender waiting
            wake.set()
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    producer = asyncio.get_running_loop().create_task(produce())
    take = _take_all if policy.eager else _FrameCutter(policy, encode)
    try:
        while True:
            if not buffer and not outcome:
                await wake.wait()
                wake.clear()
            if buffer:
                if arrivals is not None and not outcome and len(buffer) < full_at:
                    left = arrivals[0] + delay - TIMER_SLACK_S - time.monotonic()
                    if left > DUE_WITHIN_S:
                        await _wait_at_most(wake, left)
                        continue  # the frame filled, the stream ended, or the hold is over
                frame = take(buffer, encode)
                if arrivals is not None:
                    for _ in range(frame.count):
                        arrivals.popleft()
                room.set()
                sending = True
                try:
                    await write(frame)
                finally:
                    sending = False
            elif outcome:
                break
        return outcome[0]
    finally:
        if not producer.done():
            producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)


def _take_all(buffer: deque[Any], encode: Callable[[list[Any]], bytes]) -> replica_pb2.Frame:
    batch = list(buffer)
    buffer.clear()
    return replica_pb2.Frame(items=encode(batch), count=len(batch))


class _FrameCutter:
    """Takes at most ``max_items`` items and ``max_bytes`` encoded bytes per frame.

    The byte cap is met by encoding: a frame too large is cut to the share of items
    that fits, using the bytes per item just measured, until it fits or holds one item.
    The last frame's bytes per item seeds the next guess, so a steady stream is
    usually encoded once per frame.
    """

    __slots__ = ("_max_items", "_max_bytes", "_per_item")

    def __init__(self, policy: CoalesceConfig, encode: Callable[[list[Any]], bytes]) -> None:
        self._max_items = policy.max_items or MAX_PENDING_ITEMS
        self._max_bytes = policy.max_bytes
        self._per_item = 0.0

    def __call__(self, buffer: deque[Any], encode: Callable[[list[Any]], bytes]) -> replica_pb2.Frame:
        count = min(len(buffer), self._max_items)
        limit = self._max_bytes
        if limit is not None and self._per_item > 0:
            count = max(1, min(count, int(limit / self._per_item)))
        while True:
            batch = list(itertools.islice(buffer, count))
            payload = encode(batch)
            if limit is None or len(payload) <= limit or count == 1:
                break
            count = max(1, min(count - 1, count * limit // len(payload)))
        if limit is not None:
            self._per_item = len(payload) / count
        for _ in range(count):
            buffer.popleft()
        return replica_pb2.Frame(items=payload, count=count)


async def _wait_at_most(event: asyncio.Event, seconds: float) -> None:
    event.clear()
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
