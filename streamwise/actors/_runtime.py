"""Process-wide runtime state: where the controller is and which loop serves sync callers.

Every streamwise process has one *core loop*: in the driver it runs on a daemon thread
started by ``run()``; in a replica it is the replica's own event loop. All gRPC work
of the process (routers, channels, calls) happens on that loop, because grpc.aio
serves one event loop per process reliably. Callers on other threads or other event
loops hand their calls to the core loop and wait on the result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from streamwise.exceptions import DeploymentNotFoundError, UsageError

if TYPE_CHECKING:
    from streamwise._auth import Credentials
    from streamwise.routing.router import Router, RouterKey
    from streamwise.routing.transport import Transport

T = TypeVar("T")


class CoreLoop:
    """An asyncio event loop running on a daemon thread of the driver process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="streamwise-core", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Finish whatever is left so nothing pending is destroyed with the loop.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the core loop and block for its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise UsageError("blocking call made on the streamwise core loop; use await instead")
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


class ProcessRuntime:
    """Per-process state shared by handles, routers and the controller client."""

    def __init__(self) -> None:
        self.controller_address: str | None = None
        self.credentials: Credentials | None = None  # the app's secret, with the controller
        self.core: CoreLoop | None = None  # driver only
        self.core_loop: asyncio.AbstractEventLoop | None = None
        self.replica_id: str | None = None  # set in replica processes
        # How long this process goes on without its controller, reconnecting (``_outage``):
        # 0 but in replicas the Ray launcher started (on any node).
        self.controller_grace_s = 0.0
        # Live only on the core loop:
        self.routers: dict[RouterKey, Router] = {}
        self.transport: Transport | None = None

    def set_controller(self, address: str | None, credentials: Credentials | None) -> None:
        self.controller_address = address
        self.credentials = credentials

    def require_controller(self, what: str) -> tuple[str, Credentials]:
        """The controller's address and the credentials its app's calls carry."""
        if self.controller_address is None or self.credentials is None:
            raise DeploymentNotFoundError(what, "streamwise is not running; call streamwise.run() first")
        return self.controller_address, self.credentials

    async def close_routing(self) -> None:
        """Close every router and channel (on the core loop, before it stops)."""
        routers, self.routers = list(self.routers.values()), {}
        for router in routers:
            await router.aclose()
        transport, self.transport = self.transport, None
        if transport is not None:
            await transport.aclose()


RUNTIME = ProcessRuntime()
