"""Riding out a lost controller: a replica on another node goes on while its driver is out of reach.

On a cluster a replica reaches its driver (the controller, the app table of the
public port) over the network, which can fail for a while with both ends alive;
or the driver dies, and the replica's Ray actor, detached, lives on
(``_ray_host``). Such a replica keeps serving meanwhile, with what it last knew
(its routers keep their replica sets, its listener its apps), and reopens each
stream from the
driver with a backoff: the control stream (``Attach``), every router's
``WatchReplicas``, the app table and the load reports. The control stream alone
decides the replica's life: once the controller ends it, refuses the replica (it
was replaced meanwhile), or stays out of reach for ``RayCluster.controller_grace_s``,
the replica drains and exits (the last of a dead driver's store session frees it),
as it does at once on one machine, where the controller is gone only when the
driver is (the replica's parent-death signal).

While the driver is out of reach nothing is supervised: a replica that dies is not
replaced, and scaling waits. What the driver changed meanwhile (replica sets, a
new ``user_config``) arrives once the streams are back.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from streamwise.actors._runtime import RUNTIME
from streamwise.config import COME_BACK_BACKOFF_S

log = logging.getLogger("streamwise.replica")

# Answers that are the controller's word, not an outage: nothing to wait out.
_FINAL = frozenset({
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
})
_BACKOFF_S = COME_BACK_BACKOFF_S


def rides_out(exc: grpc.aio.AioRpcError) -> bool:
    """Whether this process reopens a stream from its driver that ``exc`` ended
    (a replica on another node, and no final answer), instead of giving it up."""
    return RUNTIME.controller_grace_s > 0 and exc.code() not in _FINAL


class Reconnect:
    """The backoff between attempts to reopen one stream from the driver."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._tries = 0

    async def wait(self, exc: grpc.aio.AioRpcError) -> None:
        """Sleep before the next attempt (0.1 s, growing to 2 s); cancellable."""
        if self._tries == 0:
            log.warning("lost %s (%s); reconnecting while serving", self._what, exc.code().name)
        delay = _BACKOFF_S[min(self._tries, len(_BACKOFF_S) - 1)]
        self._tries += 1
        await asyncio.sleep(delay)

    def connected(self) -> None:
        """The stream is open again: the next loss starts from the shortest wait."""
        if self._tries:
            log.warning("reconnected %s after %d attempts", self._what, self._tries)
            self._tries = 0
