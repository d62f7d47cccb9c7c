"""The driver's side of external gRPC: owns the public port and says which apps it serves.

Two paths, chosen by ``GrpcOptions.direct``:

- **Direct** (default). The root replicas of the apps listen on the public port
  themselves (``streaming.direct``). The driver binds the port with ``SO_REUSEPORT``
  without listening on it, which holds the port for the replicas (a ``port=0`` is
  resolved here, once) and keeps other users' processes off it. It serves the apps
  table to those replicas over the internal ``FrontTable`` service, and it listens
  on the port itself (the proxy :class:`~streamwise.streaming.front.Front`) only
  while no root replica of any app runs: before the first has started, after the
  last died, or scaled to zero (so the call that wakes a deployment finds a
  listener). Once one runs again, the driver's listener stops (GOAWAY: its clients
  reconnect to the replicas) and lets its running calls finish.
- **Proxy** (``direct=False``). The driver's listener alone serves the port and
  forwards every call, undecoded, through the router to a replica.

Either way the listener runs on the driver's core loop, beside the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc

from streamwise import _auth as auth
from streamwise.actors.spec import FrontSpec
from streamwise.config import GrpcOptions
from streamwise.exceptions import UsageError
from streamwise.proto import front_pb2, front_pb2_grpc
from streamwise.routing.router import Router, router_for
from streamwise.streaming import _wire
from streamwise.streaming.front import Front, FrontApp, RouterDispatch
from streamwise.streaming.schema import rpc_table

log = logging.getLogger("streamwise.ingress")

_TABLE_ACK_TIMEOUT_S = 10.0


class Ingress:
    """Serves the apps run with ``grpc_options`` to external gRPC clients."""

    def __init__(
        self, options: GrpcOptions, credentials: auth.Credentials | None = None, cluster_host: str = "",
        table_port: int = 0,
    ) -> None:
        """``cluster_host``: the driver's address when replicas may run on other
        machines (they then follow the app table over TCP, with the app's TLS), on
        ``table_port`` if it is free (where a dead driver's replicas, taken back,
        look for it), else any."""
        if options.direct and credentials is None:
            raise UsageError("the direct gRPC ingress needs the app's credentials")
        self.options = options
        self._credentials = credentials
        self._cluster_host = cluster_host
        self._table_port = table_port
        # Root replicas a dead driver left, reconnecting to the app table at its old
        # port, get none until an app is added: an empty one would turn their apps off.
        self._first_added = asyncio.Event()
        if not table_port:
            self._first_added.set()
        self._rpcs = rpc_table(options.servicer_functions)
        self._apps: dict[str, FrontApp] = {}
        self._front: Front | None = None  # the driver's own listener
        self._port = 0
        self._reservation: socket.socket | None = None
        self._table = _TableService(self)
        self._table_server: grpc.aio.Server | None = None
        self._table_address = ""
        self._changed = asyncio.Event()
        self._version = 0
        self._watchers: set[_Watcher] = set()  # replicas following the table
        self._acked = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._adding = 0  # apps being started: calls for one not served yet wait for it
        self._stopping: set[asyncio.Task[None]] = set()
        self.draining = False
        self.address = ""

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        """Bind and start serving; returns ``host:port`` (the bound port when port=0)."""
        if not self.options.direct:
            self._port = await self._listen()
        else:
            self._port = self._reserve()
            try:
                assert self._credentials is not None
                server = auth.internal_server(self._credentials, _wire.GRPC_OPTIONS)
                front_pb2_grpc.add_FrontTableServicer_to_server(self._table, server)
                self._table_address = auth.bind_unix(server, self._credentials.socket("front"))
                if self._cluster_host:  # root replicas on other machines follow it here
                    self._table_address = self._bind_table(server)
                await server.start()
                self._table_server = server
                await self._listen()
            except BaseException:
                await self.aclose()
                raise
            self._follower = asyncio.get_running_loop().create_task(self._follow_replicas())
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "::", "[::]") else self.options.host
        self.address = f"{host}:{self._port}"
        return self.address

    def _bind_table(self, server: grpc.aio.Server) -> str:
        assert self._credentials is not None
        if self._table_port:
            try:
                return auth.bind_tcp(server, self._credentials, self._cluster_host, self._table_port)
            except RuntimeError as exc:
                # Root replicas a dead driver left then follow another address: replaced.
                log.warning("the app table cannot listen where it did (%s): on a new port", exc)
        return auth.bind_tcp(server, self._credentials, self._cluster_host)

    def _reserve(self) -> int:
        """Bind the public address with SO_REUSEPORT, not listening; returns the port."""
        host = self.options.host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, self.options.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(sockaddr)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise UsageError(f"cannot bind the gRPC ingress to {self.options.host}:{self.options.port}: {exc}") from exc
        self._reservation = sock
        return sock.getsockname()[1]

    async def _listen(self) -> int:
        options = self.options
        if self._port:
            options = _with_port(options, self._port)
        front = Front(
            options, self._rpcs, self._apps, RouterDispatch(options.replica_wait_timeout_s),
            expecting=lambda: self._adding > 0,
        )
        port = await front.start()
        await front.set_serving(bool(self._apps))
        self._front = front
        return port

    def front_spec(self) -> FrontSpec | None:
        """What a root replica needs to listen on the public port; None on the proxy path."""
        if not self.options.direct or not self._table_address:
            return None
        return FrontSpec(options=_with_port(self.options, self._port), table_address=self._table_address)

    @contextlib.contextmanager
    def adding(self) -> Iterator[None]:
        """While an app is being started: a call that reaches this driver's listener
        for an app it does not serve yet waits for it (up to replica_wait_timeout_s),
        instead of NOT_FOUND at once (as when a driver starts beside replicas a dead
        one left serving on the port)."""
        self._expect(+1)
        try:
            yield
        finally:
            self._expect(-1)

    def _expect(self, change: int) -> None:
        self._adding += change
        if self._front is not None:
            self._front.apps_changed()  # waiters look again (and give up if nothing comes)

    async def add_app(self, name: str, deployment: str, methods: Mapping[str, Any]) -> None:
        """Serve ``name``; health turns SERVING (its replicas are ready by now)."""
        self._apps[name] = FrontApp(name, deployment, frozenset(methods))
        self._first_added.set()
        if self._front is not None:
            self._front.apps_changed()
            await self._front.set_serving(True)
        self._notify()
        await self._delivered()
        if self.options.direct:
            # Hand the port to the replicas before run() returns: clients that connect
            # afterwards find only the replicas listening.
            await self._rebalance(wait_closed=True)

    async def _delivered(self, timeout_s: float = _TABLE_ACK_TIMEOUT_S) -> None:
        """Wait until every replica following the table serves by the latest one
        (a replica that does not answer within ``timeout_s`` is not waited for)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while any(w.acked < self._version for w in self._watchers):
                    self._acked.clear()
                    await self._acked.wait()

    def remove_app(self, name: str) -> None:
        self._apps.pop(name, None)
        self._notify()

    def _notify(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def table(self) -> front_pb2.AppTable:
        return front_pb2.AppTable(
            apps=[front_pb2.FrontApp(name=a.name, deployment=a.deployment, methods=sorted(a.methods)) for a in self._apps.values()],
            draining=self.draining,
            version=self._version,
        )

    async def aclose(self) -> None:
        """Drain: report NOT_SERVING (here and on the replicas' listeners), let running
        RPCs finish (up to drain_timeout_s), stop. The replicas' listeners stop when
        their replicas do (they drain the same way)."""
        self.draining = True
        self._first_added.set()
        self._notify()
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        front, self._front = self._front, None
        if front is not None:
            await front.aclose(self.options.drain_timeout_s)
        await asyncio.gather(*self._stopping, return_exceptions=True)
        server, self._table_server = self._table_server, None
        if server is not None:
            await server.stop(0)
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    # -- who listens -------------------------------------------------------------------

    async def _rebalance(self, wait_closed: bool = False) -> list[Router]:
        """Listen on the port exactly while no root replica of any app runs; returns
        the routers whose replica sets tell the next change. ``wait_closed``: return
        only once a listener that stops is closed (its calls finished)."""
        running = 0
        routers = [router_for((app.name, app.deployment)) for app in list(self._apps.values())]
        for router in routers:
            running += await router.live_replicas()
        if running and self._front is not None:
            front, self._front = self._front, None
            task = asyncio.get_running_loop().create_task(front.aclose(self.options.drain_timeout_s, draining=False))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        elif not running and self._front is None and not self.draining:
            await self._listen()
        if wait_closed and self._stopping:
            await asyncio.shield(asyncio.gather(*self._stopping, return_exceptions=True))
        return routers

    async def _follow_replicas(self) -> None:
        while True:
            changed = self._changed
            routers = await self._rebalance()
            waiters = [asyncio.ensure_future(w) for w in (*(r.wait_changed() for r in routers), changed.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)


class _TableService(front_pb2_grpc.FrontTableServicer):
    """Streams the apps table to the root replicas, whole, at each change, and
    collects the versions each one says it serves by."""

    def __init__(self, ingress: Ingress) -> None:
        self._ingress = ingress

    async def WatchApps(self, request_iterator: AsyncIterator[front_pb2.AppsAck], context: grpc.aio.ServicerContext) -> None:
        ingress = self._ingress
        watcher = _Watcher()
        ingress._watchers.add(watcher)

        async def read_acks() -> None:
            async for ack in request_iterator:
                watcher.acked = ack.version
                ingress._acked.set()

        reader = asyncio.get_running_loop().create_task(read_acks())
        try:
            if auth.presented(context.invocation_metadata(), _wire.TABLE_KNOWN_KEY) is not None:
                await ingress._first_added.wait()  # a replica that knew a table before this driver
            while True:
                changed = ingress._changed
                table = ingress.table()
                await context.write(table)
                if table.draining:
                    return
                await changed.wait()
        finally:
            ingress._watchers.discard(watcher)
            ingress._acked.set()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


class _Watcher:
    __slots__ = ("acked",)

    def __init__(self) -> None:
        self.acked = -1


def _with_port(options: GrpcOptions, port: int) -> GrpcOptions:
    return dataclasses.replace(options, port=port)
