"""Continuous batching: callers join and leave a running streaming batch between steps.

With ``@streamwise.batch(..., continuous=True)`` the decorated async generator gets
a :class:`ContinuousBatch` instead of a list. Iterating it gives one
:class:`BatchStep` per step: the requests in the batch now, those that joined since
the last step and those that left. The generator answers each step by yielding one
list, one element per request of that step, in order; ``StopIteration()`` as an
element ends that caller's stream::

    @streamwise.batch(max_batch_size=8, batch_wait_timeout_s=0.005, continuous=True)
    async def generate(self, batch: streamwise.ContinuousBatch):
        state = {}
        async for step in batch:
            for request in step.joined:
                state[request] = start(request.item)
            for request in step.left:
                del state[request]
            yield [advance(state[request]) for request in step.requests]

Between two steps the runner delivers the yielded elements, drops requests that
finished or whose caller went away, and admits queued callers (same multiplexed model
id, up to ``max_batch_size``) without waiting for more. Iteration ends when no
request is left; the next caller then starts a new batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from streamwise.exceptions import UsageError
from streamwise.streaming.context import RequestContext

_ids = itertools.count(1)


class BatchRequest:
    """One caller's request in a continuous batch.

    ``item`` is what the caller passed, ``context`` its request context (request id,
    multiplexed model id, ...). Compared and hashed by identity, so it can key
    per-request state. ``cancelled`` turns True when the caller went away before its
    stream ended (the request then shows up in the next step's ``left``).
    """

    __slots__ = ("item", "context", "id", "_entry")

    def __init__(self, item: Any, context: RequestContext, entry: Any) -> None:
        self.item = item
        self.context = context
        self.id = next(_ids)  # unique in this process, for logs
        self._entry = entry  # the caller's place in the batch machinery

    @property
    def cancelled(self) -> bool:
        return bool(self._entry.cancelled)

    def __repr__(self) -> str:
        return f"BatchRequest(id={self.id}, item={self.item!r})"


@dataclasses.dataclass(frozen=True, slots=True)
class BatchStep:
    """The membership of a continuous batch at one step.

    ``requests`` are in the order the yielded list must follow; ``joined`` are the
    requests new at this step (all of them at step 0), ``left`` those gone since the
    previous step (finished with ``StopIteration()`` or cancelled by their caller).
    """

    index: int
    requests: tuple[BatchRequest, ...]
    joined: tuple[BatchRequest, ...]
    left: tuple[BatchRequest, ...]


class ContinuousBatch:
    """The steps of a continuous batch; ``async for step in batch`` (see module doc).

    Each step must be answered by one ``yield`` before the next is asked for.
    """

    __slots__ = ("_step", "_handed_out")

    def __init__(self, first: BatchStep) -> None:
        self._step = first
        self._handed_out = False

    def __aiter__(self) -> ContinuousBatch:
        return self

    async def __anext__(self) -> BatchStep:
        if self._handed_out:
            raise UsageError(
                f"continuous batch step {self._step.index} was not answered: yield one list "
                "(one element per request of the step) before asking for the next step"
            )
        if not self._step.requests:
            raise StopAsyncIteration
        self._handed_out = True
        return self._step

    @property
    def step(self) -> BatchStep:
        """The current step (what the next yielded list must match)."""
        return self._step

    def _advance(self, step: BatchStep) -> None:
        self._step = step
        self._handed_out = False
