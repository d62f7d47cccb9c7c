"""The controller's side of autoscaling one deployment: decide, then resize.

An :class:`Autoscaler` wakes on every load report of its deployment (or every
``metrics_interval_s``), averages the reports in its :class:`~.load.LoadBook`,
asks the :class:`~.policy.Decider` for a count and, when that differs, has the
controller resize in the background, so a slow drain never delays a scale-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from streamwise.autoscaling.load import LoadBook
from streamwise.autoscaling.policy import Decider
from streamwise.config import AutoscalingConfig
from streamwise.exceptions import DeploymentStartupError

log = logging.getLogger("streamwise.autoscaling")


class Autoscaler:
    """Scales one deployment to its load while ``follow`` is given a config.

    ``target()`` is the count asked for now, ``running()`` how many run, and
    ``resize(n)`` changes the count (returning once started or drained).
    """

    def __init__(
        self,
        app: str,
        deployment: str,
        load: LoadBook,
        target: Callable[[], int],
        running: Callable[[], int],
        resize: Callable[[int], Awaitable[None]],
    ) -> None:
        self._app = app
        self._deployment = deployment
        self._load = load
        self._target = target
        self._running = running
        self._resize = resize
        self._decider: Decider | None = None
        self._task: asyncio.Task[None] | None = None
        self._resizing: set[asyncio.Task[None]] = set()
        self.seen = (0.0, 0.0)  # (ongoing, queued) at the last decision

    def follow(self, config: AutoscalingConfig | None) -> None:
        """Autoscale with ``config`` from now on (None: stop deciding); call on the
        controller's loop. Resizes under way go on to their end."""
        if config is None:
            self._decider = None
            if self._task is not None:
                self._task.cancel()
                self._task = None
            return
        self._decider = Decider(self._app, self._deployment, config)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while (decider := self._decider) is not None:
            config = decider.config
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._load.changed.wait(), config.metrics_interval_s)
            self._load.changed.clear()
            if self._decider is not decider:
                continue
            now = time.monotonic()
            ongoing, queued = self._load.totals(now, config.look_back_period_s)
            current = self._target()
            if current == 0:  # calls wait for the first replica: count all of them
                queued = max(queued, self._load.queued_now())
            self.seen = (ongoing, queued)
            wanted = decider.decide(now, current, self._running(), ongoing, queued)
            if wanted != current:
                log.info(
                    "autoscaling %r from %d to %d replicas (ongoing %.1f, queued %.1f)",
                    self._deployment, current, wanted, ongoing, queued,
                )
                task = asyncio.get_running_loop().create_task(self._resize_logged(wanted))
                self._resizing.add(task)
                task.add_done_callback(self._resizing.discard)

    async def _resize_logged(self, num_replicas: int) -> None:
        try:
            await self._resize(num_replicas)
        except DeploymentStartupError as exc:  # tried again on the next decision
            log.error("autoscaling %r could not start a replica: %s", self._deployment, exc)

    async def aclose(self) -> None:
        """Stop deciding and cancel resizes under way (the deployment is going)."""
        self._decider = None
        tasks = [t for t in (self._task, *self._resizing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
