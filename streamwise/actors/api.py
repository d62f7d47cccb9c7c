"""``run()`` and ``shutdown()``: the driver side of the actor runtime."""

from __future__ import annotations

import asyncio
import atexit
import threading

from streamwise.actors._runtime import RUNTIME, CoreLoop
from streamwise.actors.controller import Controller
from streamwise.actors.deployment import Application
from streamwise.actors.spec import AppPlan, plan_app
from streamwise.config import GrpcOptions, TracingConfig, env_tracing_config
from streamwise.exceptions import UsageError
from streamwise.routing.handle import DeploymentHandle
from streamwise.streaming.ingress import Ingress
from streamwise.tracing import setup as tracing_setup

_lock = threading.RLock()


class _Driver:
    """The core loop and what lives on it (controller, ingress), owned by this process."""

    def __init__(self) -> None:
        self.core = CoreLoop()
        self._stop = asyncio.Event()
        self.controller = Controller()
        self.ingress: Ingress | None = None
        started: asyncio.Future[str] = asyncio.Future(loop=self.core.loop)
        self._main = self.core.submit(self._serve(started))
        try:
            self.address = self.core.run(_wait(started))
        except BaseException:
            self.core.stop()
            raise

    async def _serve(self, started: asyncio.Future[str]) -> None:
        try:
            async with self.controller:
                started.set_result(self.controller.address)
                try:
                    await self._stop.wait()
                finally:
                    if self.ingress is not None:
                        await self.ingress.aclose()  # drain external clients first
                    # Close this process's channels before the replicas go away.
                    await RUNTIME.close_routing()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    async def start_ingress(self, options: GrpcOptions) -> None:
        if self.ingress is not None:
            if self.ingress.options != options:
                raise UsageError(
                    "the gRPC ingress already runs with other options; shutdown() first to change them"
                )
            return
        ingress = Ingress(options)
        await ingress.start()
        self.ingress = ingress

    async def deploy(self, plan: AppPlan) -> None:
        if self.ingress is not None:
            self.ingress.remove_app(plan.name)
        await self.controller.deploy(plan)
        if self.ingress is not None:
            await self.ingress.add_app(plan.name, plan.root.config.name, plan.root.methods)

    def close(self) -> None:
        self.core.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._main.result()
        finally:
            self.core.stop()


async def _wait(future: asyncio.Future[str]) -> str:
    return await future


_driver: _Driver | None = None


def _ensure_driver() -> _Driver:
    global _driver
    if _driver is None:
        _driver = _Driver()
        RUNTIME.controller_address = _driver.address
        RUNTIME.core = _driver.core
        RUNTIME.core_loop = _driver.core.loop
    return _driver


def run(
    app: Application,
    name: str = "default",
    *,
    grpc_options: GrpcOptions | None = None,
    tracing: TracingConfig | None = None,
) -> DeploymentHandle:
    """Start ``app`` (controller and every replica, in parallel); return its root handle.

    Blocks until every replica is ready. If a deployment's constructor keeps failing,
    raises :class:`~streamwise.exceptions.DeploymentStartupError` carrying the user's
    exception type, message and traceback, and leaves nothing of the app running.
    Running an app under a name already in use replaces that app.

    With ``grpc_options`` the gRPC ingress starts (once per process) and serves this
    app's root deployment to external clients; apps run later are served too.
    ``tracing`` (default: from ``STREAMWISE_TRACING*`` env vars) turns on
    OpenTelemetry traces in this process and in the app's replicas.
    """
    tracing = tracing if tracing is not None else env_tracing_config()
    with _lock:
        tracing_setup.configure(tracing, "driver")
        driver = _ensure_driver()
        if grpc_options is not None:
            driver.core.run(driver.start_ingress(grpc_options))
        ingress = driver.ingress
        plan = plan_app(app, name, ingress.options.servicer_functions if ingress is not None else None, tracing)
        driver.core.run(driver.deploy(plan))
    return plan.root_handle()


def ingress_address() -> str:
    """``host:port`` where the gRPC ingress listens (the bound port when port=0)."""
    with _lock:
        if _driver is None or _driver.ingress is None:
            raise UsageError("no gRPC ingress is running; pass grpc_options to streamwise.run()")
        return _driver.ingress.address


def shutdown() -> None:
    """Stop every app, replica process and the controller; safe to call twice."""
    global _driver
    with _lock:
        driver, _driver = _driver, None
        if driver is None:
            return
        try:
            driver.close()
        finally:
            RUNTIME.controller_address = None
            RUNTIME.core = None
            RUNTIME.core_loop = None
            tracing_setup.shutdown()


atexit.register(shutdown)
