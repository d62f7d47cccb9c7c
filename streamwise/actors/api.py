"""``run()`` and ``shutdown()``: the driver side of the actor runtime."""

from __future__ import annotations

import asyncio
import atexit
import threading

from streamwise import objectstore
from streamwise.actors._runtime import RUNTIME, CoreLoop
from streamwise.actors.controller import Controller
from streamwise.actors.deployment import Application
from streamwise.actors.spec import plan_app
from streamwise.routing.handle import DeploymentHandle

_lock = threading.RLock()


class _Driver:
    """The core loop and the controller living on it, owned by this process."""

    def __init__(self) -> None:
        self.core = CoreLoop()
        self._stop = asyncio.Event()
        self.controller = Controller()
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
                    # Close this process's channels before the replicas go away.
                    await RUNTIME.close_routing()
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


def _ensure_driver() -> _Driver:
    global _driver
    if _driver is None:
        _driver = _Driver()
        RUNTIME.controller_address = _driver.address
        RUNTIME.core = _driver.core
        RUNTIME.core_loop = _driver.core.loop
    return _driver


def run(app: Application, name: str = "default") -> DeploymentHandle:
    """Start ``app`` (controller and every replica, in parallel); return its root handle.

    Blocks until every replica is ready. If a deployment's constructor keeps failing,
    raises :class:`~streamwise.exceptions.DeploymentStartupError` carrying the user's
    exception type, message and traceback, and leaves nothing of the app running.
    Running an app under a name already in use replaces that app.
    """
    plan = plan_app(app, name)
    with _lock:
        driver = _ensure_driver()
        driver.core.run(driver.controller.deploy(plan))
    return plan.root_handle()


def shutdown() -> None:
    """Stop every app, replica process and the controller, then delete the object
    store's shared memory; safe to call twice."""
    global _driver
    with _lock:
        driver, _driver = _driver, None
        try:
            if driver is not None:
                try:
                    driver.close()
                finally:
                    RUNTIME.controller_address = None
                    RUNTIME.core = None
                    RUNTIME.core_loop = None
        finally:
            objectstore.close_session()  # after the replicas: they no longer use it


atexit.register(shutdown)
