"""Picks a replica for each call and retries calls that a replica did not take.

One router exists per (deployment, event loop). It learns the replica set from the
controller's watch stream (pushed on every change, never polled on the request path)
and chooses by *power of two choices*: sample two live replicas, send to the one with
fewer calls in flight from this router. A replica that is full rejects before running
anything; the router then retries with exponential backoff. A replica that cannot be
reached is dropped locally at once, before the controller reports it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeAlias

import grpc
from opentelemetry import context as otel_context

from streamwise import objectstore
from streamwise._auth import Credentials, channel as auth_channel
from streamwise.actors import _outage
from streamwise.objectstore.calls import REF_KEY, carried_request
from streamwise.autoscaling.load import LoadReporter
from streamwise.config import RouterConfig
from streamwise.exceptions import BackPressureError, DeploymentNotFoundError, ReplicaDiedError, UnavailableError
from streamwise.metrics.recorders import RouterRecorder, router_recorder
from streamwise.proto import controller_pb2, controller_pb2_grpc, replica_pb2
from streamwise.routing.transport import FrameStream, NotAccepted, ReplicaTarget, Transport
from streamwise.streaming import _local_wire, _wire
from streamwise.tracing import spans

RouterKey: TypeAlias = tuple[str, str]  # (application, deployment)
_MAX_HOMES = 4096  # models whose last replica a router remembers
_MODEL_ID = _wire.MODEL_ID


class Router:
    """Routes calls of one deployment from one event loop."""

    def __init__(
        self,
        key: RouterKey,
        controller_address: str,
        credentials: Credentials,
        transport: Transport,
        config: RouterConfig,
        recorder: RouterRecorder | None = None,
    ) -> None:
        self.key = key
        self._name = key[1]
        self._controller_address = controller_address
        self._credentials = credentials
        self._transport = transport
        self._config = config
        self._replicas: list[ReplicaTarget] = []
        self._inflight: dict[str, int] = {}
        self._dead: set[str] = set()
        self._max_ongoing = 1 << 30
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._deleted: str | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._waiting = 0  # callers waiting for a replica with room
        # Multiplexed models: what each replica holds (and its slots), as it reported,
        # and where this router last sent each model (before the replica can report it).
        self._models: dict[str, tuple[frozenset[str], int]] = {}
        self._homes: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._unreported: dict[str, set[str]] = {}  # models sent to a replica since its last report
        self._elsewhere = False  # some replicas run on other nodes
        self._session: str | None = None  # this process's object store session, once needed
        self._here: set[str] = set()  # ids of the replicas on this router's node
        self._max_queued = -1
        # Autoscaled deployments learn how many calls wait here (replicas report the rest).
        self._reporter = LoadReporter(key, controller_address, credentials, lambda: 0, lambda: self._waiting)
        self._recorder = recorder
        if recorder is not None:
            recorder.watch(key[0], key[1], lambda: self._waiting, lambda: sum(self._inflight.values()))

    # -- replica set ---------------------------------------------------------------

    async def _watch(self) -> None:
        """Follow the deployment's replica set until the controller ends it. In a
        replica riding out a lost controller (``_outage``), the last set stays in
        use while the stream is reopened."""
        channel = auth_channel(self._controller_address, _wire.GRPC_OPTIONS)
        reconnect = _outage.Reconnect(f"the replica set of {self.key[0]}/{self.key[1]}")
        try:
            stub = controller_pb2_grpc.ControllerStub(channel)
            request = controller_pb2.WatchRequest(app=self.key[0], deployment=self.key[1])
            while True:
                try:
                    async for snapshot in stub.WatchReplicas(request, metadata=self._credentials.metadata):
                        reconnect.connected()
                        self._apply(snapshot)
                    self._set_deleted("the controller closed its replica-set stream")
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        self._set_deleted(exc.details() or "unknown deployment")
                        return
                    if not _outage.rides_out(exc):
                        self._set_deleted(f"lost the controller ({exc.code().name})")
                        return
                    await reconnect.wait(exc)
        finally:
            await channel.close()

    def _set_deleted(self, why: str) -> None:
        self._deleted = why
        self._reporter.start(0)
        self._replicas = []
        self._ready.set()
        self._notify()

    @property
    def deleted(self) -> bool:
        return self._deleted is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _apply(self, snapshot: controller_pb2.ReplicaSet) -> None:
        if snapshot.deleted:
            self._set_deleted("it was shut down")
            return
        if snapshot.max_ongoing_requests:
            self._max_ongoing = snapshot.max_ongoing_requests
            self._max_queued = snapshot.max_queued_requests
        self._reporter.start(snapshot.load_report_interval_s)
        old = {r.address for r in self._replicas}
        here = _local_wire.node_id()
        self._replicas = [
            ReplicaTarget(
                self._name, r.replica_id, r.address, r.local_address if r.node == here else "", r.store_session
            )
            for r in snapshot.replicas
            if r.replica_id not in self._dead
        ]
        self._here = {r.replica_id for r in snapshot.replicas if r.node == here}
        self._elsewhere = len(self._here) < len(snapshot.replicas)
        models = {
            r.replica_id: (frozenset(r.model_ids), r.model_capacity)
            for r in snapshot.replicas
            if r.model_ids or r.model_capacity
        }
        present = {r.replica_id for r in snapshot.replicas}
        for replica_id in [k for k in self._unreported if k not in present or models.get(k) != self._models.get(k)]:
            del self._unreported[replica_id]  # it reported again: its report says all
        self._models = models
        live = {r.address for r in self._replicas}
        for address in old - live:
            self._transport.forget(address)
        self._ready.set()
        self._notify()

    async def live_replicas(self) -> int:
        """How many replicas the deployment has now (once the controller has said)."""
        await self._started()
        return len(self._replicas)

    async def wait_changed(self) -> None:
        """Return at the next change of the replica set (or once the deployment is gone)."""
        if self._deleted is None:
            await self._changed.wait()

    def mark_dead(self, target: ReplicaTarget) -> None:
        """Stop routing to ``target`` now, before the controller reports it gone."""
        self._dead.add(target.replica_id)
        self._replicas = [r for r in self._replicas if r.replica_id != target.replica_id]

    async def _started(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        if not self._ready.is_set():
            await self._ready.wait()

    async def _choose(
        self, wait_s: float | None = None, model_id: str = "", prefer_local: bool = True, avoid: str = ""
    ) -> ReplicaTarget:
        """A replica with room for one more call; waits while there is none.

        ``avoid`` (a replica id) is chosen only when no other replica has room.

        While every replica is running max_ongoing_requests of this router's calls, wait
        for one of them to finish (or for the replica set to change) instead of sending
        a call that would be rejected.
        """
        await self._started()
        target = self._pick(model_id, prefer_local, avoid) if self._replicas else None
        if target is not None:
            return target
        # Shed only while replicas exist but are full: with none (yet, or any more) the
        # call waits for one, or learns the deployment is gone.
        if self._replicas and 0 <= self._max_queued <= self._waiting:
            if self._recorder is not None:
                self._recorder.shed(self.key[0], self.key[1])
            raise BackPressureError(self._name, self._waiting, self._max_queued)
        self._waiting += 1
        if not self._replicas:
            self._reporter.urgent()  # none runs (scaled to zero): one is started at once
        try:
            while True:
                await self._wait_for_replicas(wait_s or self._config.no_replica_timeout_s)
                target = self._pick(model_id, prefer_local, avoid)
                if target is not None:
                    return target
                await self._changed.wait()
        finally:
            self._waiting -= 1

    async def _wait_for_replicas(self, wait_s: float) -> None:
        deadline: float | None = None
        while not self._replicas:
            if self._deleted is not None:
                raise DeploymentNotFoundError(self._name, self._deleted)
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait_s
            if now >= deadline:
                raise UnavailableError(
                    f"no replica of deployment {self._name!r} became available within {wait_s}s"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - now)
            except TimeoutError:
                pass

    def _pick(self, model_id: str = "", prefer_local: bool = True, avoid: str = "") -> ReplicaTarget | None:
        """Power of two choices among replicas below max_ongoing_requests (by our count).

        Among those on this node first (unless ``prefer_local`` is false), else among
        all; for a multiplexed model, among those holding it, else those with a free
        model slot, else among all.
        """
        limit = self._max_ongoing
        inflight = self._inflight
        free = [r for r in self._replicas if inflight.get(r.replica_id, 0) < limit]
        if prefer_local and self._elsewhere:
            here = self._here
            free = [r for r in free if r.replica_id in here] or free
        if model_id and free:
            free = self._for_model(model_id, free)
        if avoid and len(free) > 1:
            free = [r for r in free if r.replica_id != avoid] or free
        if len(free) <= 1:
            return free[0] if free else None
        a, b = random.sample(free, 2)
        return a if inflight.get(a.replica_id, 0) <= inflight.get(b.replica_id, 0) else b

    def _for_model(self, model_id: str, free: list[ReplicaTarget]) -> list[ReplicaTarget]:
        """The replicas of ``free`` to choose from for a call to ``model_id``."""
        home = self._homes.get(model_id)
        held = {r.replica_id: self._held(r.replica_id) for r in free}
        holding = [r for r in free if model_id in held[r.replica_id][0] or r.replica_id == home]
        if holding:
            return holding
        roomy = [r for r in free if not held[r.replica_id][1] or len(held[r.replica_id][0]) < held[r.replica_id][1]]
        return roomy or free

    def _held(self, replica_id: str) -> tuple[frozenset[str] | set[str], int]:
        """(models ``replica_id`` holds or is loading for this router, its model slots; 0: not multiplexed)."""
        reported, capacity = self._models.get(replica_id, (frozenset(), 0))
        sent = self._unreported.get(replica_id)
        return (reported | sent if sent else reported), capacity

    def _sent_model(self, model_id: str, target: ReplicaTarget) -> None:
        """Remember where ``model_id`` went: the replica will hold it once loaded."""
        if model_id not in self._models.get(target.replica_id, (frozenset(), 0))[0]:
            self._unreported.setdefault(target.replica_id, set()).add(model_id)
        self._homes[model_id] = target.replica_id
        self._homes.move_to_end(model_id)
        while len(self._homes) > _MAX_HOMES:
            self._homes.popitem(last=False)

    # -- calls -----------------------------------------------------------------------

    def _for_target(
        self, request: replica_pb2.CallRequest, target: ReplicaTarget
    ) -> tuple[replica_pb2.CallRequest, list[memoryview]]:
        """``request`` as ``target`` can read it, and the chunks to send after it:
        by-reference arguments carry their bytes to a replica of another node's
        object store session."""
        session = target.store_session
        if not session or REF_KEY not in request.metadata:
            return request, []
        if self._session is None:
            self._session = objectstore.session_name()
        return (request, []) if session == self._session else carried_request(request)

    def _acquire(self, target: ReplicaTarget) -> None:
        self._inflight[target.replica_id] = self._inflight.get(target.replica_id, 0) + 1

    def release(self, target: ReplicaTarget) -> None:
        """Forget one in-flight call to ``target`` (streams call this when they end)."""
        self._release_id(target.replica_id)

    def _release_id(self, replica_id: str) -> None:
        before = self._inflight.get(replica_id, 0)
        if before > 1:
            self._inflight[replica_id] = before - 1
        else:
            self._inflight.pop(replica_id, None)
        if before >= self._max_ongoing:
            self._notify()  # a caller may be waiting for room

    def running_here(self, replica_id: str) -> _RunningHere:
        """A context manager counting a call that the replica ``replica_id`` (this
        process) runs in-process as one of this router's, so that the router neither
        sends that replica more than it has room for nor lets more calls wait than
        ``max_queued_requests``."""
        return _RunningHere(self, replica_id)

    async def _retry_wait(self, exc: NotAccepted, backoffs: Iterator[float], route: spans.RouteSpan) -> None:
        delay = next(backoffs) if exc.full else 0.0
        route.retried(delay)
        if self._recorder is not None:
            self._recorder.retried(self.key[0], self.key[1], exc.full, delay)
        if exc.full:
            await asyncio.sleep(delay)
        else:
            self.mark_dead(exc.target)

    async def unary(
        self,
        request: replica_pb2.CallRequest,
        *,
        wait_s: float | None = None,
        parent: otel_context.Context | None = None,
        prefer_local: bool = True,
        avoid: str = "",
    ) -> replica_pb2.CallReply:
        """Send a unary call to a replica, retrying where it was not taken.

        ``wait_s`` bounds the wait for a live replica (UnavailableError after it);
        ``avoid`` is a replica to send to only when no other has room;
        ``parent`` is the caller's trace context; ``prefer_local``: replicas on this
        node first. Cancelling the awaiting task cancels
        the call on the replica.
        """
        backoffs = self._config.backoffs()
        with spans.route(self._name, _wire.method_label(request.method), request.metadata, parent) as route:
            model_id = request.metadata.get(_MODEL_ID, "")
            while True:
                target = await self._choose(wait_s, model_id, prefer_local, avoid)
                route.chose(target.replica_id)
                if model_id:
                    self._sent_model(model_id, target)
                self._acquire(target)
                try:
                    return await self._transport.unary(target, *self._for_target(request, target))
                except NotAccepted as exc:
                    await self._retry_wait(exc, backoffs, route)
                except ReplicaDiedError:
                    self.mark_dead(target)
                    raise
                finally:
                    self.release(target)

    async def open_stream(
        self,
        request: replica_pb2.CallRequest,
        inputs: AsyncIterator[Any] | None = None,
        encode: Callable[[list[Any]], bytes] | None = None,
        *,
        wait_s: float | None = None,
        parent: otel_context.Context | None = None,
        prefer_local: bool = True,
        avoid: str = "",
    ) -> FrameStream:
        """Open a stream on a replica that accepted it; the caller must ``release`` it.

        ``avoid``: as for :meth:`unary`.

        ``inputs`` makes it a bidirectional call (see Transport.open_stream).
        Cancelling the awaiting task cancels the call on the replica.
        """
        backoffs = self._config.backoffs()
        with spans.route(self._name, _wire.method_label(request.method), request.metadata, parent) as route:
            model_id = request.metadata.get(_MODEL_ID, "")
            while True:
                target = await self._choose(wait_s, model_id, prefer_local, avoid)
                route.chose(target.replica_id)
                if model_id:
                    self._sent_model(model_id, target)
                self._acquire(target)
                try:
                    sent, chunks = self._for_target(request, target)
                    return await self._transport.open_stream(target, sent, inputs, encode, chunks)
                except NotAccepted as exc:
                    self.release(target)
                    await self._retry_wait(exc, backoffs, route)
                except BaseException:
                    self.release(target)
                    raise

    async def aclose(self) -> None:
        await self._reporter.aclose()
        if self._recorder is not None:
            self._recorder.unwatch(*self.key)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)


class _RunningHere:
    __slots__ = ("_router", "_replica_id")

    def __init__(self, router: Router, replica_id: str) -> None:
        self._router = router
        self._replica_id = replica_id

    def __enter__(self) -> None:
        inflight = self._router._inflight
        inflight[self._replica_id] = inflight.get(self._replica_id, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        self._router._release_id(self._replica_id)


def router_for(key: RouterKey) -> Router:
    """The router of deployment ``key`` (made on first use); call on the core loop."""
    from streamwise.actors._runtime import RUNTIME
    from streamwise.config import env_local_transport, env_router_config

    router = RUNTIME.routers.get(key)
    if router is not None and router.deleted:
        # The app was shut down or replaced (run() under the same name): start over
        # with a fresh watch; the old router's watch has already ended.
        router = None
    if router is None:
        address, credentials = RUNTIME.require_controller(key[1])
        if RUNTIME.transport is None:
            RUNTIME.transport = Transport(credentials, local=env_local_transport())
        recorder = router_recorder(RUNTIME.replica_id or "driver")
        router = RUNTIME.routers[key] = Router(
            key, address, credentials, RUNTIME.transport, env_router_config(), recorder
        )
    return router
