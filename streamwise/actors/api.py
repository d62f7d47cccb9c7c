"""``run()``, ``open_app()`` and ``shutdown()``: the driver side of the actor runtime."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from streamwise import _config_file, _event_loop as event_loop, objectstore
from streamwise.metrics import recorders
from streamwise.metrics.endpoint import MetricsEndpoint, replica_metrics
from streamwise.actors._runtime import RUNTIME, CoreLoop
from streamwise.actors.controller import Controller
from streamwise.actors.management import ManagementServer, ManagementService
from streamwise.actors.deployment import Application
from streamwise.actors.spec import AppPlan, plan_app
from streamwise.actors.launcher import Launcher
from streamwise.config import (
    DEFAULT_METRICS_HOST,
    GrpcOptions,
    ManagementOptions,
    RayCluster,
    TracingConfig,
    cluster_config,
    env_tracing_config,
)
from streamwise.exceptions import UsageError
from streamwise.routing.handle import DeploymentHandle
from streamwise.streaming.ingress import Ingress
from streamwise.tracing import setup as tracing_setup

if TYPE_CHECKING:
    from streamwise.actors._deployment_state import _Deployment

_lock = threading.RLock()


_shutdown_listeners: list[Callable[[], None]] = []


def add_shutdown_listener(listener: Callable[[], None]) -> None:
    """Call ``listener`` (from any thread) when an operator shuts the driver down
    through the management API (``streamwise shutdown``), after every app is gone."""
    _shutdown_listeners.append(listener)


_replica_observers: list[Callable[[_Deployment], None]] = []


def add_replica_observer(observer: Callable[[_Deployment], None]) -> None:
    """Call ``observer(deployment)`` on the driver's core loop at each change of a
    deployment's replicas (one starts running, begins draining, stops), in drivers
    started after this call. ``streamwise run`` prints its progress lines so."""
    _replica_observers.append(observer)


class _Services:
    """What the driver runs on its core loop: the controller, the management API and
    the gRPC ingress."""

    def __init__(self, cluster: RayCluster | None = None, first_app: str = "") -> None:
        """``first_app``: the name of the first app run; on a cluster, a dead driver's
        replicas of it are taken back (``_succession``)."""
        event_loop.chosen()  # the replicas': a wrong STREAMWISE_EVENT_LOOP fails here, not in each replica
        self.cluster = cluster
        self.controller = Controller(_launcher(cluster), succeed=first_app)
        self.controller.observers.extend(_replica_observers)
        self.ingress: Ingress | None = None
        self.management: ManagementServer | None = None
        self.metrics: MetricsEndpoint | None = None
        self.tracing: TracingConfig | None = None  # of the last app run
        self._collectors: list[recorders.FunctionCollector] = []

    async def start_metrics(self, host: str, port: int) -> None:
        """Serve Prometheus metrics of this driver and its replicas on ``host:port``
        (once; call on the core loop)."""
        if self.metrics is not None:
            return
        controller = self.controller

        async def replicas() -> list[bytes]:
            metadata = controller.credentials.metadata if controller.credentials is not None else ()
            addresses = [r.address for deps in controller.all_deployments().values() for d in deps.values()
                         for r in d.replicas.values() if r.address]
            return list(await asyncio.gather(*(replica_metrics(a, metadata) for a in addresses)))

        endpoint = MetricsEndpoint(asyncio.get_running_loop(), replicas)
        try:
            endpoint.start(host, port)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self.metrics = endpoint
        self._collectors = [
            recorders.FunctionCollector(lambda: recorders.controller_metrics(controller.all_deployments)),
            recorders.FunctionCollector(lambda: recorders.store_metrics(objectstore.usage)),
        ]
        for collector in self._collectors:
            recorders.REGISTRY.register(collector)

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for collector in self._collectors:
            recorders.REGISTRY.unregister(collector)
        self._collectors = []

    async def start_management(self) -> None:
        """Serve the management API beside the controller (once it has started)."""
        assert self.controller.credentials is not None
        ingress = lambda: self.ingress.address if self.ingress is not None else ""  # noqa: E731
        service = ManagementService(self.controller, self.delete_app, self._shut_down, self.deploy_file, ingress)
        management = ManagementServer(service, self.controller.credentials.run_dir)
        await management.start(ingress)
        self.management = management

    async def start_management_tcp(self, options: ManagementOptions) -> None:
        """Serve the management API on a TCP port with TLS too (once per driver)."""
        assert self.management is not None
        await self.management.start_tcp(options)

    async def deploy_file(self, text: str, filename: str) -> list[str]:
        """Deploy every application of a config file's ``text``; their names.

        Only applications: a running driver's gRPC, metrics and tracing options were
        set when it started.
        """
        config = _config_file.parse(text, filename)
        if (
            config.grpc_options or config.metrics_port is not None or config.tracing or config.metrics_host
            or config.management or config.cluster
        ):
            raise UsageError(
                f"{filename}: grpc_options, metrics_port, metrics_host, tracing, management and cluster are set when a "
                "driver starts "
                "(streamwise run FILE); streamwise deploy takes applications only"
            )
        plans = [
            self.plan(_config_file.applied(app, config.base_dir), app.name, self.tracing) for app in config.applications
        ]
        for plan in plans:
            await self.deploy(plan)
        return [plan.name for plan in plans]

    async def delete_app(self, name: str) -> None:
        if self.ingress is not None:
            self.ingress.remove_app(name)
        await self.controller.delete_app(name)

    async def _shut_down(self) -> bool:
        """Tell the listeners; True if there were any (they stop the driver)."""
        for listener in list(_shutdown_listeners):
            listener()
        return bool(_shutdown_listeners)

    async def start_ingress(self, options: GrpcOptions) -> None:
        if self.ingress is not None:
            if self.ingress.options != options:
                raise UsageError(
                    "the gRPC ingress already runs with other options; shutdown() first to change them"
                )
            return
        ingress = Ingress(
            options, self.controller.credentials, self.controller.launcher_host, self.controller.succession.table_port
        )
        await ingress.start()
        self.ingress = ingress
        if self.management is not None:
            self.management.write_driver_file(ingress.address)

    def plan(self, app: Application, name: str, tracing: TracingConfig | None) -> AppPlan:
        if self.ingress is None:
            return plan_app(app, name, None, tracing)
        return plan_app(app, name, self.ingress.options.servicer_functions, tracing, self.ingress.front_spec())

    async def deploy(self, plan: AppPlan) -> None:
        if self.ingress is None:
            await self.controller.deploy(plan)
        else:
            self.ingress.remove_app(plan.name)
            with self.ingress.adding():
                await self.controller.deploy(plan)
                await self.ingress.add_app(plan.name, plan.root.config.name, plan.root.methods)
        # Only now, with this driver's replicas serving the app and its port, do those
        # a dead driver left go: their clients move over without a gap.
        await self.controller.retire_orphans(plan.name)

    async def close_front(self) -> None:
        """Drain external clients, then close this process's channels (before replicas go)."""
        self.close_metrics()
        if self.management is not None:
            await self.management.aclose()
        if self.ingress is not None:
            await self.ingress.aclose()
        await RUNTIME.close_routing()


class _Driver:
    """A core loop on a daemon thread, running the services for sync callers of run()."""

    def __init__(self, cluster: RayCluster | None, first_app: str) -> None:
        self.services = _Services(cluster, first_app)
        self.core = CoreLoop()
        self._stop = asyncio.Event()
        started: asyncio.Future[str] = asyncio.Future(loop=self.core.loop)
        self._main = self.core.submit(self._serve(started))
        try:
            self.address = self.core.run(_wait(started))
        except BaseException:
            self.core.stop()
            raise

    async def _serve(self, started: asyncio.Future[str]) -> None:
        try:
            async with self.services.controller as controller:
                await self.services.start_management()
                started.set_result(controller.address)
                try:
                    await self._stop.wait()
                finally:
                    await self.services.close_front()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    def close(self) -> None:
        self.core.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._main.result()
        finally:
            self.core.stop()


async def _wait(future: asyncio.Future[str]) -> str:
    return await future


_driver: _Driver | None = None
_active: _Services | None = None  # the services of run() or of an open_app() block


def _launcher(cluster: RayCluster | None) -> Launcher | None:
    if cluster is None:
        return None
    from streamwise.actors.ray_launcher import RayLauncher

    return RayLauncher(cluster)


def _ensure_driver(cluster: RayCluster | None, first_app: str) -> _Driver:
    global _driver, _active
    if _driver is not None and _driver.services.cluster != cluster:
        raise UsageError(
            f"this process already runs apps with cluster={_driver.services.cluster!r}; "
            f"shutdown() before running with cluster={cluster!r}"
        )
    if _driver is None:
        if RUNTIME.core_loop is not None:
            raise UsageError("streamwise already runs on an event loop here (open_app); run() cannot start too")
        _driver = _Driver(cluster, first_app)
        _active = _driver.services
        RUNTIME.set_controller(_driver.address, _driver.services.controller.credentials)
        RUNTIME.core = _driver.core
        RUNTIME.core_loop = _driver.core.loop
    return _driver


def run(
    app: Application,
    name: str = "default",
    *,
    grpc_options: GrpcOptions | None = None,
    tracing: TracingConfig | None = None,
    metrics_port: int | None = None,
    metrics_host: str = DEFAULT_METRICS_HOST,
    management: ManagementOptions | None = None,
    cluster: str | RayCluster | None = None,
) -> DeploymentHandle:
    """Start ``app`` (controller and every replica, in parallel); return its root handle.

    Blocks until every replica is ready. If a deployment's constructor keeps failing,
    raises :class:`~streamwise.exceptions.DeploymentStartupError` carrying the user's
    exception type, message and traceback, and leaves nothing of the app running.
    Running an app under a name already in use replaces that app.

    With ``grpc_options`` the gRPC ingress starts (once per process) and serves this
    app's root deployment to external clients; apps run later are served too.
    ``tracing`` (default: from ``STREAMWISE_TRACING*`` env vars) turns on
    OpenTelemetry traces in this process and in the app's replicas. With
    ``metrics_port`` (0: any free port) Prometheus metrics of this process and every
    replica are served on ``metrics_host:metrics_port`` (see ``metrics_address()``).
    With ``management`` the management API is served on a TCP port too, with TLS
    (once per process; see ``management_address()``); it is always served on the
    driver's Unix socket.
    """
    tracing = tracing if tracing is not None else env_tracing_config()
    _check_management(management)
    where = cluster_config(cluster)
    with _lock:
        driver = _ensure_driver(where, name)
        tracing_setup.configure(tracing, "driver")
        services = driver.services
        if metrics_port is not None:
            driver.core.run(services.start_metrics(metrics_host, metrics_port))
        if management is not None:
            driver.core.run(services.start_management_tcp(management))
        if grpc_options is not None:
            driver.core.run(services.start_ingress(grpc_options))
        services.tracing = tracing
        plan = services.plan(app, name, tracing)
        driver.core.run(services.deploy(plan))
    return plan.root_handle()


@contextlib.asynccontextmanager
async def open_app(
    app: Application,
    name: str = "default",
    *,
    grpc_options: GrpcOptions | None = None,
    tracing: TracingConfig | None = None,
    metrics_port: int | None = None,
    metrics_host: str = DEFAULT_METRICS_HOST,
    management: ManagementOptions | None = None,
    cluster: str | RayCluster | None = None,
) -> AsyncIterator[DeploymentHandle]:
    """Run ``app`` on the running event loop for the duration of an ``async with`` block.

    Like :func:`run`, but the controller, routers and ingress live on the caller's own
    event loop instead of a background thread, so handle calls made from that loop
    need no hop between threads. Leaving the block (normally, by an exception, or by
    cancellation) drains the ingress and stops every replica it started.
    """
    tracing = tracing if tracing is not None else env_tracing_config()
    _check_management(management)
    global _active
    with _lock:
        if _driver is not None or RUNTIME.core_loop is not None:
            raise UsageError("streamwise already runs in this process; shutdown() it or leave that block first")
        RUNTIME.core_loop = asyncio.get_running_loop()
    try:
        services = _Services(cluster_config(cluster), name)  # a wrong setting raises here: let go of the loop
        async with services.controller as controller:
            RUNTIME.set_controller(controller.address, controller.credentials)
            await services.start_management()
            _active = services
            try:
                tracing_setup.configure(tracing, "driver")
                if metrics_port is not None:
                    await services.start_metrics(metrics_host, metrics_port)
                if management is not None:
                    await services.start_management_tcp(management)
                if grpc_options is not None:
                    await services.start_ingress(grpc_options)
                plan = services.plan(app, name, tracing)
                await services.deploy(plan)
                yield plan.root_handle()
            finally:
                await services.close_front()
    finally:
        with _lock:
            _active = None
            RUNTIME.set_controller(None, None)
            RUNTIME.core_loop = None
        tracing_setup.shutdown()
        objectstore.close_session()


def metrics_address() -> str:
    """``host:port`` of the Prometheus scrape endpoint (``/metrics``), when it runs."""
    with _lock:
        if _active is None or _active.metrics is None:
            raise UsageError("no metrics endpoint is running; pass metrics_port to streamwise.run()")
        return _active.metrics.address


def management_address() -> str:
    """``host:port`` where the management API listens on TCP (the bound port when port=0)."""
    with _lock:
        if _active is None or _active.management is None or not _active.management.tcp_address:
            raise UsageError("the management API listens on no TCP port; pass management= to streamwise.run()")
        return _active.management.tcp_address


def management_token_file() -> str:
    """The path of the file holding the management token every call must carry."""
    with _lock:
        if _active is None or _active.management is None:
            raise UsageError("no streamwise app is running in this process")
        return _active.management.token_path


def _check_management(management: object) -> None:
    if management is not None and not isinstance(management, ManagementOptions):
        raise UsageError(f"management must be a streamwise.ManagementOptions, got {management!r}")


def ingress_address() -> str:
    """``host:port`` where the gRPC ingress listens (the bound port when port=0)."""
    with _lock:
        if _active is None or _active.ingress is None:
            raise UsageError("no gRPC ingress is running; pass grpc_options to streamwise.run()")
        return _active.ingress.address


def shutdown() -> None:
    """Stop every app, replica process and the controller, then delete the object
    store's shared memory; safe to call twice.

    (An ``open_app`` block stops what it started when it is left.)
    """
    global _driver, _active
    with _lock:
        driver, _driver = _driver, None
        if driver is None and _active is not None:
            return  # an open_app block owns the runtime; leaving it stops everything
        try:
            if driver is not None:
                _active = None
                try:
                    driver.close()
                finally:
                    RUNTIME.set_controller(None, None)
                    RUNTIME.core = None
                    RUNTIME.core_loop = None
                    tracing_setup.shutdown()
        finally:
            objectstore.close_session()  # after the replicas: they no longer use it


atexit.register(shutdown)
