"""What each batch looked like: size, wait, queue length, duration (for metrics and tracing)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable

DEFAULT_RECENT_BATCHES = 1024

_log = logging.getLogger("streamwise.batching")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BatchStats:
    """One finished batch of a ``@batch`` function.

    Times come from ``time.monotonic()``. For a streaming batch ``duration_s`` runs to
    the end of the stream and ``steps`` counts the lists the generator yielded; a
    continuous batch also counts the callers that ``joined`` after it started and the
    largest membership it reached (``peak_size``).
    """

    size: int  # callers in the batch when it started
    wait_s: float  # how long its first (oldest) caller had been queued when it started
    queue_length: int  # callers still queued, for any model id, right after it was taken
    multiplexed_model_id: str
    started_at: float
    duration_s: float
    steps: int = 0
    joined: int = 0
    peak_size: int = 0


class BatchStatsLog:
    """The last ``maxlen`` batches of one ``@batch`` function, plus running totals.

    Read ``recent`` (oldest first) or ``snapshot()``; ``add_listener(fn)`` calls
    ``fn(stats)`` as each batch finishes, on the loop that ran it (a listener that
    raises is logged and otherwise ignored: observability never fails a batch).
    """

    def __init__(self, maxlen: int = DEFAULT_RECENT_BATCHES) -> None:
        self.recent: deque[BatchStats] = deque(maxlen=maxlen)
        self.batches = 0
        self.items = 0
        self._listeners: list[Callable[[BatchStats], None]] = []
        self._lock = threading.Lock()

    def __reduce__(self):
        # Pickled with its function (a class sent to a replica by value): start empty.
        return (BatchStatsLog, (self.recent.maxlen,))

    def record(self, stats: BatchStats) -> None:
        with self._lock:
            self.recent.append(stats)
            self.batches += 1
            self.items += stats.size + stats.joined
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(stats)
            except Exception:
                _log.exception("batch stats listener %r failed", listener)

    def snapshot(self) -> list[BatchStats]:
        with self._lock:
            return list(self.recent)

    def clear(self) -> None:
        with self._lock:
            self.recent.clear()
            self.batches = 0
            self.items = 0

    def add_listener(self, listener: Callable[[BatchStats], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[BatchStats], None]) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def __repr__(self) -> str:
        return f"BatchStatsLog(batches={self.batches}, items={self.items}, recent={len(self.recent)})"
