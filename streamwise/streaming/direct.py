"""Direct ingress: a root replica serves external gRPC clients on the app's public port.

Every replica of an app's root deployment runs a :class:`~streamwise.streaming.front.Front`
on the public ``host:port``; gRPC core binds it with ``SO_REUSEPORT``, so the
replicas (and the driver, while no replica runs) share the port and the kernel
spreads new *connections* among them. A call that a replica accepted runs
in-process when it is for this replica's own deployment and the replica has room
(below ``max_ongoing_requests``; a multiplexed model loaded here; while it drains,
only what its listener accepted before it stopped):
through the :class:`~streamwise.streaming.servicer.ReplicaServicer`, as an internal
call is (admission, request context, spans, metrics), without a hop; a stream's
items go to the client as they are yielded, one message each, without frames. Otherwise (the replica is full, the call names another app) it
goes through the router like any call, to another replica if one has room; so the
calls of one client channel spread across replicas once one replica is full.

The apps served on the port come from the driver's ``FrontTable`` stream (internal,
authenticated with the app's secret). When that stream says the driver drains, or
ends, or the replica is stopped, the listener stops first: clients get GOAWAY and
reconnect to the port's other listeners, while running calls finish.

Who may connect: anyone who can reach the public port, exactly as with the driver's
ingress (the same ``GrpcOptions``: TLS, client certificates, connection limits).
External bytes are only ever decoded with the user's generated message classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from streamwise import _auth as auth
from streamwise._auth import Credentials
from streamwise.actors import _outage, multiplex
from streamwise.actors.spec import FrontSpec
from streamwise.proto import front_pb2, front_pb2_grpc, replica_pb2
from streamwise.routing.router import Router, router_for
from streamwise.streaming import _wire
from streamwise.streaming.front import Emit, Front, FrontApp, FrontCall, RouterDispatch, remote_abort
from streamwise.streaming.schema import rpc_table
from streamwise.streaming.servicer import ReplicaServicer
from streamwise.tracing import spans

log = logging.getLogger("streamwise.ingress")


class InProcessDispatch:
    """Runs a call in this replica while it has room; routes it otherwise."""

    def __init__(self, servicer: ReplicaServicer, app: str, deployment: str, replica_id: str, wait_s: float) -> None:
        self._servicer = servicer
        self._app = app
        self._deployment = deployment
        self._replica_id = replica_id
        self._router = RouterDispatch(wait_s, avoid=replica_id)
        self._model_router = RouterDispatch(wait_s)  # the router knows which replica holds a model
        self._own: Router | None = None  # this process's router of its own deployment
        self._here: Any = None  # its count of the calls run here (stateless: one serves all)

    def _takes(self, app: FrontApp, call: FrontCall) -> bool:
        """Whether to run the call here: this replica's deployment, room for it, and
        for a multiplexed model, the model already loaded here. A replica that drains
        still runs what its listener accepted before it stopped (clients have GOAWAY
        by then), within its grace: elsewhere may not be known to it (its driver died)."""
        if not (app.name == self._app and app.deployment == self._deployment and self._servicer.below_limit):
            return False
        model_id = call.metadata.get(_wire.MODEL_ID)
        return not model_id or model_id in multiplex.held()

    def _counted(self) -> Any:
        # Calls run here count in this process's router of the deployment too: calls it
        # routes then wait (and are shed past max_queued_requests) as they would for
        # any replica that is full.
        router = self._own
        if router is None or router.deleted:
            router = self._own = router_for((self._app, self._deployment))
            self._here = router.running_here(self._replica_id)
        return self._here

    def _elsewhere(self, call: FrontCall) -> RouterDispatch:
        return self._model_router if call.metadata.get(_wire.MODEL_ID) else self._router

    def _route_span(self, call: FrontCall) -> Any:
        # The same span a routed call gets; its trace context goes into the call's metadata.
        if not spans.enabled():
            return spans.NO_ROUTE
        return spans.route(self._deployment, _wire.method_label(call.method), call.metadata, None)

    async def unary(self, app: FrontApp, call: FrontCall) -> bytes:
        if not self._takes(app, call):
            return await self._elsewhere(call).unary(app, call)
        with self._counted():
            if spans.enabled():
                with self._route_span(call) as route:
                    route.chose(self._replica_id)
                    result = await self._servicer.call_in_process(call)
            else:  # the common case, without a no-op span's three calls
                result = await self._servicer.call_in_process(call)
        if isinstance(result, replica_pb2.RemoteError):
            raise remote_abort(result)
        return result

    async def stream(self, app: FrontApp, call: FrontCall, inputs: AsyncIterator[bytes] | None, emit: Emit) -> None:
        if self._takes(app, call):
            with self._counted(), self._route_span(call) as route:
                route.chose(self._replica_id)
                error = await self._servicer.stream_in_process(call, emit, inputs)
            if error is not None:
                raise remote_abort(error)
            return
        await self._elsewhere(call).stream(app, call, inputs, emit)


class DirectFront:
    """This replica's listener on the public port, until ``aclose()``."""

    def __init__(
        self,
        spec: FrontSpec,
        servicer: ReplicaServicer,
        *,
        app: str,
        deployment: str,
        methods: Mapping[str, Any],
        replica_id: str,
        credentials: Credentials,
    ) -> None:
        self._spec = spec
        self._credentials = credentials
        self._own = FrontApp(app, deployment, frozenset(methods))
        self._apps: dict[str, FrontApp] = {app: self._own}
        options = spec.options
        dispatch = InProcessDispatch(servicer, app, deployment, replica_id, options.replica_wait_timeout_s)
        self._front = Front(options, rpc_table(options.servicer_functions), self._apps, dispatch)
        self._channel: grpc.aio.Channel | None = None
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Learn the apps served on the port, then listen on it."""
        self._channel = auth.channel(self._spec.table_address, _wire.GRPC_OPTIONS)
        watch = self._open_table()
        first = await watch.read()
        if first is grpc.aio.EOF:
            raise RuntimeError("the driver ended the app table before sending it")
        await self._front.start()
        await self._apply(first, watch)
        self._follower = asyncio.get_running_loop().create_task(self._follow(watch))

    async def _apply(self, table: front_pb2.AppTable, watch: Any) -> None:
        apps = {a.name: FrontApp(a.name, a.deployment, frozenset(a.methods)) for a in table.apps}
        serving = self._own.name in apps
        apps.setdefault(self._own.name, self._own)
        self._apps.clear()
        self._apps.update(apps)
        await self._front.set_serving(serving and not table.draining)
        await watch.write(front_pb2.AppsAck(version=table.version))

    async def _follow(self, watch: Any) -> None:
        """Apply the driver's tables; once it drains (or is gone) stop taking clients.

        The replica goes on serving internal calls until it is stopped itself. One
        riding out a lost controller (``_outage``) goes on listening with the apps
        it knows, and reopens the table stream meanwhile.
        """
        reconnect = _outage.Reconnect("the app table of the public port")
        while True:
            try:
                while (table := await watch.read()) is not grpc.aio.EOF:
                    reconnect.connected()
                    await self._apply(table, watch)
            except grpc.aio.AioRpcError as exc:
                if _outage.rides_out(exc):
                    await reconnect.wait(exc)
                    watch = self._open_table(reconnecting=True)
                    continue
                log.debug("the app table stream ended: %r", exc)
            except asyncio.InvalidStateError as exc:
                log.debug("the app table stream ended: %r", exc)
            break
        await self._front.aclose(self._spec.options.drain_timeout_s)

    def _open_table(self, reconnecting: bool = False) -> Any:
        """The app table stream; ``reconnecting``: this replica serves by a table
        already (a new driver holds it back until it has one of its own)."""
        assert self._channel is not None
        known = ((_wire.TABLE_KNOWN_KEY, "1"),) if reconnecting else ()
        return front_pb2_grpc.FrontTableStub(self._channel).WatchApps(metadata=(*self._credentials.metadata, *known))

    async def aclose(self, drain_s: float | None = None) -> None:
        """Stop listening (GOAWAY), let external calls finish for up to ``drain_s``
        (default: the options' ``drain_timeout_s``), then cancel the rest."""
        await self._front.aclose(self._spec.options.drain_timeout_s if drain_s is None else drain_s)
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
