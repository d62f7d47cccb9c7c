"""The waiting room of one ``@batch`` function, for one owner on one event loop.

Callers enqueue entries; a dispatcher task forms batches from them and starts a
runner task per batch, at most ``max_concurrent_batches`` at a time. A batch takes
the oldest waiting entry and the entries queued after it with the same multiplexed
model id, and starts when it is full (``max_batch_size`` entries, or the
``batch_size_fn`` budget) or when ``batch_wait_timeout_s`` has passed since that
oldest entry was queued. Entries whose caller went away are skipped, never run.
The dispatcher exists only while entries wait or batches run.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from streamwise._event_loop import DUE_WITHIN_S
from streamwise.streaming.context import RequestContext, get_request_context

if TYPE_CHECKING:
    from streamwise.config import BatchConfig

# What a streaming caller's entry returns from get() once its stream is over.
END = object()

# Elements buffered for *every* caller of a streaming batch before it waits for one of
# them to read: nobody is keeping up, so stepping further only fills memory.
MAX_BACKLOG = 32


class Entry:
    """One caller waiting for (or taking part in) a batch."""

    __slots__ = ("item", "owner", "request", "context", "enqueued_at")

    def __init__(self, item: Any, owner: Any) -> None:
        self.item = item
        self.owner = owner
        self.request: RequestContext = get_request_context()
        # The batch runs in a copy of its first caller's context (request context,
        # trace context, ...); later callers' contexts stay available here.
        self.context = contextvars.copy_context()
        self.enqueued_at = time.monotonic()

    @property
    def model_id(self) -> str:
        return self.request.multiplexed_model_id

    @property
    def gone(self) -> bool:
        """The caller no longer wants anything from the batch."""
        raise NotImplementedError


class CallEntry(Entry):
    """A caller of a coroutine batch function: one result through a future."""

    __slots__ = ("future",)

    def __init__(self, item: Any, owner: Any) -> None:
        super().__init__(item, owner)
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @property
    def gone(self) -> bool:
        return self.future.done()


class StreamEntry(Entry):
    """A caller of a streaming batch: gets its element of every step until its end.

    A slow consumer never holds the batch back while another caller keeps reading:
    its elements are buffered (one per step). ``read`` is set by the runner and is
    told whenever this caller reads below ``MAX_BACKLOG`` or leaves.
    """

    __slots__ = ("_items", "_waiter", "_ended", "_error", "_left", "cancelled", "read")

    def __init__(self, item: Any, owner: Any) -> None:
        super().__init__(item, owner)
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._left = False
        self.cancelled = False  # the caller left before its stream ended
        self.read: asyncio.Event | None = None

    @property
    def backlog(self) -> int:
        return len(self._items)

    @property
    def gone(self) -> bool:
        return self._ended or self._left

    def put(self, value: Any) -> None:
        self._items.append(value)
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            self._wake()

    def leave(self) -> None:
        """The caller stopped consuming (closed, cancelled, or done)."""
        if not self._ended:
            self.cancelled = True
        self._left = True
        self._items.clear()
        if self.read is not None:
            self.read.set()

    async def get(self) -> Any:
        """The next element, or ``END``; raises the batch's error after the elements."""
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return END
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if self.read is not None and len(self._items) < MAX_BACKLOG:
            self.read.set()
        return item

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Taken:
    """A batch just formed: its entries and what the stats record about its start."""

    __slots__ = ("entries", "model_id", "started_at", "wait_s", "queue_length")

    def __init__(self, entries: list[Entry], model_id: str, queue_length: int) -> None:
        self.entries = entries
        self.model_id = model_id
        self.started_at = time.monotonic()
        self.wait_s = self.started_at - entries[0].enqueued_at
        self.queue_length = queue_length


Runner = Callable[["BatchQueue", Taken], Coroutine[Any, Any, None]]


class BatchQueue:
    """Entries waiting for a batch, per multiplexed model id, oldest first."""

    def __init__(self, config: Callable[[], BatchConfig], runner: Runner, max_concurrent: int) -> None:
        self._config = config  # read at every decision, so runtime setters apply at once
        self._runner = runner
        self.loop = asyncio.get_running_loop()
        self._waiting: dict[str, deque[Entry]] = {}
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> BatchConfig:
        return self._config()

    def put(self, entry: Entry) -> None:
        """Queue ``entry``; must be called on this queue's loop."""
        self._waiting.setdefault(entry.model_id, deque()).append(entry)
        self._changed.set()
        if self._dispatcher is None:
            # An empty context: the dispatcher outlives the caller that started it.
            self._dispatcher = self.loop.create_task(self._dispatch(), context=contextvars.Context())

    def left(self) -> None:
        """A caller went away: a waiting batch may be empty now (the dispatcher then ends)."""
        self._changed.set()

    def poke(self) -> None:
        """Re-evaluate the waiting batch now (a knob changed); any thread."""
        if self.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._changed.set()
        else:
            self.loop.call_soon_threadsafe(self._changed.set)

    def waiting(self) -> int:
        """How many callers wait, for any model id."""
        return sum(1 for entries in self._waiting.values() for entry in entries if not entry.gone)

    # -- forming batches -------------------------------------------------------------

    async def _dispatch(self) -> None:
        try:
            while True:
                await self._slots.acquire()
                try:
                    taken = await self._next_batch()
                except BaseException:
                    self._slots.release()
                    raise
                if taken is None:  # nobody waits: stop until the next put()
                    self._slots.release()
                    return
                self._launch(taken)
        finally:
            self._dispatcher = None

    async def _next_batch(self) -> Taken | None:
        while True:
            first = self._oldest()
            if first is None:
                return None
            config = self.config
            try:
                chosen, full = self._plan(first.model_id, [])
            except Exception as exc:  # batch_size_fn raised
                self._fail(first.model_id, exc)
                continue
            left_s = first.enqueued_at + config.batch_wait_timeout_s - time.monotonic()
            if full or left_s <= DUE_WITHIN_S:  # see _event_loop: uvloop's timers may fire early
                self._remove(first.model_id, chosen)
                return Taken(chosen, first.model_id, self.waiting())
            self._changed.clear()
            try:
                async with asyncio.timeout(left_s):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def take_joiners(self, model_id: str, member_items: list[Any]) -> list[Entry]:
        """Entries that can join a running batch now (continuous batching).

        None while a caller of another model id is overdue, so that a busy model
        cannot starve another: the running batch then drains and ends.
        """
        now = time.monotonic()
        timeout = self.config.batch_wait_timeout_s
        for other, entries in self._waiting.items():
            if other != model_id and any(not e.gone and e.enqueued_at + timeout <= now for e in entries):
                return []
        try:
            chosen, _ = self._plan(model_id, member_items)
        except Exception as exc:
            self._fail(model_id, exc)
            return []
        self._remove(model_id, chosen)
        return chosen

    def _oldest(self) -> Entry | None:
        oldest = None
        for model_id in list(self._waiting):
            entries = self._waiting[model_id]
            while entries and entries[0].gone:
                entries.popleft()
            if not entries:
                del self._waiting[model_id]
            elif oldest is None or entries[0].enqueued_at < oldest.enqueued_at:
                oldest = entries[0]
        return oldest

    def _plan(self, model_id: str, member_items: list[Any]) -> tuple[list[Entry], bool]:
        """The live entries of ``model_id`` that fit beside ``member_items``, and
        whether that makes the batch full. Entries are taken in order, none skipped."""
        config = self.config
        limit = config.max_batch_size
        size_of = config.batch_size_fn
        items = list(member_items)
        chosen: list[Entry] = []
        for entry in self._waiting.get(model_id, ()):
            if entry.gone:
                continue
            if size_of is None:
                if len(items) >= limit:
                    return chosen, True
            elif items and size_of([*items, entry.item]) > limit:
                return chosen, True  # the next one does not fit (one alone always does)
            chosen.append(entry)
            items.append(entry.item)
        if size_of is None:
            return chosen, len(items) >= limit
        return chosen, bool(items) and size_of(items) >= limit

    def _remove(self, model_id: str, chosen: list[Entry]) -> None:
        entries = self._waiting.get(model_id)
        if entries is None:
            return
        # ``chosen`` are the first live entries in order: pop up to the last of them.
        remaining = len(chosen)
        while remaining and entries:
            if not entries.popleft().gone:
                remaining -= 1
        if not entries:
            del self._waiting[model_id]

    def _fail(self, model_id: str, exc: Exception) -> None:
        """``batch_size_fn`` raised: every caller waiting for this model id gets it."""
        for entry in self._waiting.pop(model_id, ()):
            if isinstance(entry, CallEntry):
                if not entry.future.done():
                    entry.future.set_exception(exc)
            elif isinstance(entry, StreamEntry):
                entry.end(exc)

    # -- running batches -------------------------------------------------------------

    def _launch(self, taken: Taken) -> None:
        context = taken.entries[0].context.copy()
        task = self.loop.create_task(self._runner(self, taken), context=context)
        self._running.add(task)
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()
