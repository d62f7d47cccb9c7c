"""``@batch``: concurrent calls of one function become one call on a list.

Works on async methods of deployments and on plain async functions and methods
anywhere. Each caller passes one item; the function gets the list of the batch's
items. Three forms, chosen by the function:

- ``async def f(self, items) -> list``: each caller gets its element of the result.
- ``async def f(self, items): yield [...]``: a streaming batch; each step yields one
  list, one element per caller, and each caller's stream gets its own element;
  ``StopIteration()`` as an element ends that caller's stream.
- ``continuous=True`` on a generator: it gets a :class:`ContinuousBatch` and callers
  join and leave between steps (see :mod:`streamwise.batching.continuous`).

Batch queues are per instance (per ``self``) and per event loop, created on first
use. Knobs are checked when the decorator is applied; ``set_max_batch_size()`` and
``set_batch_wait_timeout_s()`` on the decorated function change them at run time
(for every instance), and ``.stats`` keeps a record of each batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from streamwise.batching import _runners
from streamwise.batching._queue import END, BatchQueue, CallEntry, StreamEntry, Taken
from streamwise.batching.stats import BatchStatsLog
from streamwise.config import (
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_BATCHES,
    BatchConfig,
)
from streamwise.exceptions import UsageError

__all__ = ["batch"]


def batch(
    _fn: Callable[..., Any] | None = None,
    /,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
    max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
    continuous: bool = False,
) -> Any:
    """Batch concurrent calls of an async function or method; see the module docstring.

    A batch runs when it holds ``max_batch_size`` callers (or, with
    ``batch_size_fn``, when ``batch_size_fn(items)`` reaches ``max_batch_size``; an
    item that does not fit waits for the next batch) or ``batch_wait_timeout_s``
    after its first caller was queued, whichever comes first. At most
    ``max_concurrent_batches`` batches run at once per instance. A batch never mixes
    callers of different multiplexed model ids. The batch runs in its first caller's
    context (``get_request_context()`` there is that caller's; the model id is shared).

    Cancellation: a caller cancelled while queued is dropped before its batch runs;
    one cancelled while its batch runs just gets nothing (the batch goes on for the
    others). A streaming caller that stops consuming leaves the batch at the next
    step; when every caller has left, the generator is closed (its ``finally`` runs).
    """
    try:
        config = BatchConfig(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            max_concurrent_batches=max_concurrent_batches,
            batch_size_fn=batch_size_fn,
            continuous=continuous,
        )
    except UsageError as exc:
        raise UsageError(f"@batch: {exc}") from None

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        return _Batcher(fn, config).wrapper

    if _fn is not None:
        return wrap(_fn)
    return wrap


def _takes_self(fn: Callable[..., Any]) -> bool:
    """True for ``f(self, items)``, False for ``f(items)``; anything else is misuse."""
    positional = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) not in (1, 2):
        raise UsageError(
            f"@batch function {fn.__qualname__} must take the batch as its one argument "
            f"(after self), e.g. `async def {fn.__name__}(self, items)`"
        )
    return len(positional) == 2


class _Batcher:
    """The state behind one decorated function: knobs, queues, stats, the wrapper."""

    def __init__(self, fn: Callable[..., Any], config: BatchConfig, stats: BatchStatsLog | None = None) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        if inspect.isasyncgenfunction(fn):
            kind = "async_gen"
        elif inspect.iscoroutinefunction(fn):
            kind = "async"
            if config.continuous:
                raise UsageError(f"@batch(continuous=True) needs an async generator; {name} is a coroutine")
        else:
            raise UsageError(f"@batch needs an `async def` function or async generator; {name} is neither")
        takes_self = _takes_self(fn)
        self.fn = fn
        self.config = config
        self.name = name
        self.stats = stats if stats is not None else BatchStatsLog()
        self._queues = _Queues()
        self._kind = kind
        if takes_self:
            self._call: _runners.UserCall = fn
        else:
            self._call = lambda _owner, arg: fn(arg)
        self.wrapper = self._make_wrapper(kind, takes_self)

    def __reduce__(self):
        # A class sent to a replica by value carries its batched methods: start afresh
        # there, keeping the stats log shared with the wrapper's ``stats`` attribute.
        return (_Batcher, (self.fn, self.config, self.stats))

    def _run(self, queue: BatchQueue, taken: Taken) -> Coroutine[Any, Any, None]:
        """The runner of one formed batch (see :mod:`streamwise.batching._runners`)."""
        if self._kind == "async":
            return _runners.run_calls(self._call, self.name, self.stats, taken)
        if self.config.continuous:
            return _runners.run_continuous(queue, self._call, self.name, self.stats, taken)
        return _runners.run_stream(self._call, self.name, self.stats, taken)

    def _queue(self, owner: Any) -> BatchQueue:
        return self._queues.get(
            owner, lambda: BatchQueue(lambda: self.config, self._run, self.config.max_concurrent_batches)
        )

    # -- callers ---------------------------------------------------------------------

    async def call(self, owner: Any, item: Any) -> Any:
        queue = self._queue(owner)
        entry = CallEntry(item, owner)
        queue.put(entry)
        try:
            return await entry.future
        except asyncio.CancelledError:
            queue.left()
            raise

    async def stream(self, owner: Any, item: Any) -> Any:
        queue = self._queue(owner)
        entry = StreamEntry(item, owner)
        queue.put(entry)
        try:
            while (value := await entry.get()) is not END:
                yield value
        finally:
            entry.leave()
            queue.left()

    def _make_wrapper(self, kind: str, takes_self: bool) -> Callable[..., Any]:
        fn = self.fn
        if kind == "async":
            if takes_self:

                async def wrapper(self_: Any, item: Any) -> Any:
                    return await batcher.call(self_, item)

            else:

                async def wrapper(item: Any) -> Any:  # type: ignore[misc]
                    return await batcher.call(None, item)

        elif takes_self:

            def wrapper(self_: Any, item: Any) -> Any:  # type: ignore[misc]
                return batcher.stream(self_, item)

        else:

            def wrapper(item: Any) -> Any:  # type: ignore[misc]
                return batcher.stream(None, item)

        batcher = self
        functools.update_wrapper(wrapper, fn)
        wrapper.__streamwise_kind__ = kind  # type: ignore[attr-defined]
        wrapper.set_max_batch_size = self.set_max_batch_size  # type: ignore[attr-defined]
        wrapper.set_batch_wait_timeout_s = self.set_batch_wait_timeout_s  # type: ignore[attr-defined]
        wrapper.get_max_batch_size = self.get_max_batch_size  # type: ignore[attr-defined]
        wrapper.get_batch_wait_timeout_s = self.get_batch_wait_timeout_s  # type: ignore[attr-defined]
        wrapper.stats = self.stats  # type: ignore[attr-defined]
        return wrapper

    # -- runtime knobs ---------------------------------------------------------------

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Change ``max_batch_size`` for every instance; waiting batches re-check at once."""
        self._replace(max_batch_size=max_batch_size)

    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None:
        """Change ``batch_wait_timeout_s`` for every instance; waiting batches re-check at once."""
        self._replace(batch_wait_timeout_s=batch_wait_timeout_s)

    def get_max_batch_size(self) -> int:
        return self.config.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.config.batch_wait_timeout_s

    def _replace(self, **changes: Any) -> None:
        try:
            self.config = dataclasses.replace(self.config, **changes)
        except UsageError as exc:
            raise UsageError(f"@batch {self.name}: {exc}") from None
        for queue in self._queues.all():
            queue.poke()


class _Queues:
    """The queue of each (owner, event loop), made on first use, dropped with its owner.

    Owners are told apart by identity (a user class may define ``__eq__``); an owner
    that cannot be weakly referenced keeps its queues for the life of the process.
    """

    def __init__(self) -> None:
        self._by_owner: dict[int, tuple[Callable[[], Any], dict[asyncio.AbstractEventLoop, BatchQueue]]] = {}
        self._lock = threading.Lock()

    def get(self, owner: Any, make: Callable[[], BatchQueue]) -> BatchQueue:
        loop = asyncio.get_running_loop()
        found = self._by_owner.get(id(owner))
        if found is not None and found[0]() is owner:
            queue = found[1].get(loop)
            if queue is not None:
                return queue
        with self._lock:
            found = self._by_owner.get(id(owner))
            if found is None or found[0]() is not owner:
                found = (self._ref(owner), {})
                self._by_owner[id(owner)] = found
            per_loop = found[1]
            for old in [old for old in per_loop if old.is_closed()]:
                del per_loop[old]
            queue = per_loop[loop] = make()
            return queue

    def _ref(self, owner: Any) -> Callable[[], Any]:
        key = id(owner)

        def forget(ref: weakref.ref[Any]) -> None:
            with self._lock:
                found = self._by_owner.get(key)
                if found is not None and found[0] is ref:
                    del self._by_owner[key]

        try:
            return weakref.ref(owner, forget)
        except TypeError:  # None (plain functions), or a class with __slots__
            return lambda: owner

    def all(self) -> list[BatchQueue]:
        with self._lock:
            return [queue for _, per_loop in self._by_owner.values() for queue in per_loop.values()]
