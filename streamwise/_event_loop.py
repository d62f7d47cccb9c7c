"""The event loop a replica runs on: uvloop where it is installed.

A replica's loop carries every call the replica serves, and most of a small call's
cost is the loop's and gRPC's, not the user's: on uvloop (libuv; a dependency
everywhere but Windows) a replica serves an external unary call with markedly less
CPU than on asyncio's own loop (``benchmarks/ingress_bench.py`` says which loop its
replicas ran). Ray installs uvloop in its workers for the same reason.

``STREAMWISE_EVENT_LOOP`` picks it (``config.env_event_loop``): ``uvloop``, the
default when it can be imported, or ``asyncio`` for the standard library's loop, say
for user code that needs something uvloop lacks. Replicas take it from the driver
(on a Ray cluster too: ``ray_launcher``); the driver checks it when it starts.
The replica's loop is made by a factory, not by setting the process-wide policy: a
user's own ``asyncio.run`` in a replica gets what it always got. The driver's core
loop stays on asyncio's loop: it shares the user's process and starts the replica
processes, where uvloop's own process spawning would stand in for Python's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from streamwise.config import env_event_loop

T = TypeVar("T")

# A wait that has less than this left is due. uvloop keeps time in whole
# milliseconds: it runs a shorter wait on the loop's next turn, and a timer may fire
# more than a millisecond early by time.monotonic(). A loop that waits again for what
# is left would spin through a few turns; asyncio's own loop fires late instead.
DUE_WITHIN_S = 0.0005


def chosen() -> str:
    """The implementation the environment asks for: ``uvloop`` or ``asyncio``
    (UsageError for anything else, see ``config.env_event_loop``)."""
    return env_event_loop()


def factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes a loop of the chosen implementation; None: asyncio's default, made
    and set as the thread's current loop exactly as ``asyncio.run`` does."""
    if chosen() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop of the chosen implementation.

    As with ``asyncio.run``: the loop is closed on return, after the tasks still
    pending are cancelled and async generators finalized.
    """
    with asyncio.Runner(loop_factory=factory()) as runner:
        return runner.run(main)
