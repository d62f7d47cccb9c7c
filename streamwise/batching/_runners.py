"""Running one formed batch: a coroutine, a streaming generator, or a continuous one.

Each runner calls the user's function once with the batch, hands every caller its
own element, records a :class:`BatchStats`, and never leaves a caller waiting: when
the function raises, every caller of the batch gets the exception; when the runner
itself is cancelled (its loop is shutting down), every caller is cancelled too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from streamwise.batching import _trace
from streamwise.batching._queue import MAX_BACKLOG, BatchQueue, CallEntry, StreamEntry, Taken
from streamwise.batching.continuous import BatchRequest, BatchStep, ContinuousBatch
from streamwise.batching.stats import BatchStats, BatchStatsLog
from streamwise.exceptions import UsageError

UserCall = Callable[[Any, Any], Any]  # (owner, batch argument) -> coroutine or async generator


def _results(out: Any, expected: int, name: str, what: str) -> list[Any]:
    """``out`` as a list of ``expected`` elements, else a UsageError for every caller."""
    if isinstance(out, (str, bytes, bytearray, Mapping)) or not hasattr(out, "__len__"):
        raise UsageError(
            f"@batch function {name} must {what} a list with one element per caller "
            f"({expected} here), not {type(out).__name__}"
        )
    results = list(out)
    if len(results) != expected:
        raise UsageError(
            f"@batch function {name} must {what} a list with one element per caller, in order: "
            f"got {len(results)} elements for a batch of {expected}"
        )
    return results


def _is_stop(value: Any) -> bool:
    """``StopIteration()`` (or the class, or StopAsyncIteration) ends a caller's stream."""
    return (
        isinstance(value, (StopIteration, StopAsyncIteration))
        or value is StopIteration
        or value is StopAsyncIteration
    )


def _still_there(taken: Taken) -> bool:
    """Drop callers that went away since the batch was formed; False if none is left."""
    taken.entries = [entry for entry in taken.entries if not entry.gone]
    return bool(taken.entries)


def _record(
    stats: BatchStatsLog,
    taken: Taken,
    span: Any,
    error: BaseException | None,
    steps: int = 0,
    joined: int = 0,
    peak: int = 0,
) -> None:
    record = BatchStats(
        size=len(taken.entries),
        wait_s=taken.wait_s,
        queue_length=taken.queue_length,
        multiplexed_model_id=taken.model_id,
        started_at=taken.started_at,
        duration_s=time.monotonic() - taken.started_at,
        steps=steps,
        joined=joined,
        peak_size=max(peak, len(taken.entries)),
    )
    _trace.close_span(span, record, error)
    stats.record(record)


async def run_calls(call: UserCall, name: str, stats: BatchStatsLog, taken: Taken) -> None:
    """A coroutine batch: one list in, one list of results out."""
    if not _still_there(taken):
        return
    entries: list[CallEntry] = taken.entries  # type: ignore[assignment]
    span = _trace.open_span(name, taken)
    error: BaseException | None = None
    try:
        try:
            out = await call(entries[0].owner, [entry.item for entry in entries])
            results = _results(out, len(entries), name, "return")
        except Exception as exc:
            error = exc
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            for entry, result in zip(entries, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
    finally:
        for entry in entries:
            entry.future.cancel()  # only if still pending: the runner was cancelled
        _record(stats, taken, span, error, steps=1)


async def _pace(entries: list[StreamEntry], read: asyncio.Event) -> None:
    """Between steps: let consumers run; wait while every live caller is backed up."""
    live = [entry for entry in entries if not entry.gone]
    if live and all(entry.backlog >= MAX_BACKLOG for entry in live):
        read.clear()
        await read.wait()
    else:
        await asyncio.sleep(0)  # a generator that never awaits must not starve its callers


async def _close(agen: Any) -> BaseException | None:
    """Close the user's generator (its ``finally`` runs); what it raised, if anything."""
    try:
        await agen.aclose()
    except Exception as exc:
        return exc
    return None


def _deliver(entries: list[StreamEntry], values: list[Any]) -> None:
    """Hand each caller still there its element of one step."""
    for entry, value in zip(entries, values, strict=True):
        if entry.gone:
            continue
        if _is_stop(value):
            entry.end()
        else:
            entry.put(value)


async def run_stream(call: UserCall, name: str, stats: BatchStatsLog, taken: Taken) -> None:
    """A streaming batch: each step yields one list, one element per caller.

    The generator is closed as soon as no caller is left (all finished or gone).
    """
    if not _still_there(taken):
        return
    entries: list[StreamEntry] = taken.entries  # type: ignore[assignment]
    read = asyncio.Event()
    for entry in entries:
        entry.read = read
    span = _trace.open_span(name, taken)
    agen = call(entries[0].owner, [entry.item for entry in entries])
    steps = 0
    error: BaseException | None = None
    try:
        while not all(entry.gone for entry in entries):
            try:
                out = await agen.__anext__()
            except StopAsyncIteration:
                break
            steps += 1
            _deliver(entries, _results(out, len(entries), name, "yield"))
            await _pace(entries, read)
    except Exception as exc:
        error = exc
    except BaseException as exc:  # cancelled: so are the callers
        error = exc
        raise
    finally:
        closing_error = await _close(agen)
        error = error or closing_error
        for entry in entries:
            entry.end(error)
        _record(stats, taken, span, error, steps=steps)


async def run_continuous(
    queue: BatchQueue, call: UserCall, name: str, stats: BatchStatsLog, taken: Taken
) -> None:
    """A continuous batch: between steps, finished callers leave and queued ones join."""
    if not _still_there(taken):
        return
    read = asyncio.Event()

    def admit(entries: list[Any]) -> list[tuple[BatchRequest, StreamEntry]]:
        for entry in entries:
            entry.read = read
        return [(BatchRequest(entry.item, entry.request, entry), entry) for entry in entries]

    members = admit(taken.entries)
    span = _trace.open_span(name, taken)
    requests = tuple(request for request, _ in members)
    batch = ContinuousBatch(BatchStep(0, requests, requests, ()))
    agen = call(taken.entries[0].owner, batch)
    steps = joined = 0
    peak = len(members)
    error: BaseException | None = None
    try:
        while True:
            try:
                out = await agen.__anext__()
            except StopAsyncIteration:
                break
            step = batch.step
            if not step.requests:
                break  # the generator yielded again after its last request left
            steps += 1
            entries = [entry for _, entry in members]
            _deliver(entries, _results(out, len(step.requests), name, "yield"))
            await _pace(entries, read)
            # The step boundary: leave, then join (same model id, up to the budget).
            stayed = [(request, entry) for request, entry in members if not entry.gone]
            left = tuple(request for request, entry in members if entry.gone)
            new = admit(queue.take_joiners(taken.model_id, [entry.item for _, entry in stayed]))
            _trace.joined(span, [entry for _, entry in new])
            members = stayed + new
            joined += len(new)
            peak = max(peak, len(members))
            batch._advance(
                BatchStep(
                    steps,
                    tuple(request for request, _ in members),
                    tuple(request for request, _ in new),
                    left,
                )
            )
    except Exception as exc:
        error = exc
    except BaseException as exc:
        error = exc
        raise
    finally:
        closing_error = await _close(agen)
        error = error or closing_error
        for _, entry in members:  # those that left before are over already
            entry.end(error)
        _record(stats, taken, span, error, steps=steps, joined=joined, peak=peak)
