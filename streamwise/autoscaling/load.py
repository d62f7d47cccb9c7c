"""Load reports: pushed by replicas and routers, averaged by the controller.

A :class:`LoadReporter` samples one number of its process (a replica's calls
running, a router's calls waiting) a few times per interval and pushes the mean to
the controller once per interval, on one client stream for its whole life; it
pushes at once when told calls wait with no replica running (scale from zero).
The controller keeps each source's reports in a :class:`LoadBook` and averages them
over the look-back period. The request path never waits on any of this.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from streamwise._auth import Credentials, channel as auth_channel
from streamwise.actors import _outage
from streamwise.proto import controller_pb2, controller_pb2_grpc
from streamwise.streaming import _wire

log = logging.getLogger("streamwise.autoscaling")

_SAMPLES_PER_INTERVAL = 4
_MIN_SAMPLE_PERIOD_S = 0.005


class LoadReporter:
    """Reports ``ongoing()`` and ``queued()`` of one deployment every ``interval_s``.

    ``start`` begins (or, with a new interval, re-times) the reports; ``urgent``
    sends one now; ``aclose`` ends the stream, so the controller forgets this
    source. Losing the controller stops the reports quietly (the process is going
    away then), unless the process rides it out (``_outage``): then they resume once
    the controller is back.
    """

    def __init__(
        self,
        key: tuple[str, str],
        controller_address: str,
        credentials: Credentials,
        ongoing: Callable[[], int],
        queued: Callable[[], int],
    ) -> None:
        self._key = key
        self._address = controller_address
        self._credentials = credentials
        self._ongoing = ongoing
        self._queued = queued
        self._interval_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._urgent = False

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def start(self, interval_s: float) -> None:
        """Report every ``interval_s`` from now on (0 stops); call on the owner's loop."""
        if interval_s == self._interval_s:
            return
        self._interval_s = interval_s
        if interval_s <= 0:
            if self._task is not None:
                self._task.cancel()
                self._task = None
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        else:
            self._wake.set()  # re-time the running loop

    def urgent(self) -> None:
        """Send a report now: calls wait and no replica runs."""
        if self._task is not None and not self._urgent:
            self._urgent = True
            self._wake.set()

    async def _reports(self, reconnect: _outage.Reconnect) -> AsyncIterator[controller_pb2.LoadReport]:
        app, deployment = self._key
        ongoing = queued = 0.0
        samples = 0
        next_report = time.monotonic() + self._interval_s
        while True:
            period = max(_MIN_SAMPLE_PERIOD_S, self._interval_s / _SAMPLES_PER_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), period)
            self._wake.clear()
            ongoing_now, queued_now = self._ongoing(), self._queued()
            ongoing += ongoing_now
            queued += queued_now
            samples += 1
            now = time.monotonic()
            if self._urgent:  # what is waiting now, not diluted by the quiet before
                self._urgent = False
                yield controller_pb2.LoadReport(app=app, deployment=deployment, ongoing=ongoing_now, queued=queued_now)
            elif now >= next_report:
                yield controller_pb2.LoadReport(
                    app=app, deployment=deployment, ongoing=ongoing / samples, queued=queued / samples
                )
            else:
                continue
            reconnect.connected()  # the report was taken: the stream is open
            ongoing = queued = 0.0
            samples = 0
            next_report = now + self._interval_s

    async def _run(self) -> None:
        channel = auth_channel(self._address, _wire.GRPC_OPTIONS)
        reconnect = _outage.Reconnect(f"the load reports of {self._key[0]}/{self._key[1]}")
        try:
            stub = controller_pb2_grpc.ControllerStub(channel)
            while True:
                try:
                    await stub.ReportLoad(self._reports(reconnect), metadata=self._credentials.metadata)
                    return
                except grpc.aio.AioRpcError as exc:
                    if not _outage.rides_out(exc):
                        log.debug("load reports of %s/%s stopped: %s", *self._key, exc.code().name)
                        return
                    await reconnect.wait(exc)  # a replica riding out a lost controller
        finally:
            await channel.close()

    async def aclose(self) -> None:
        """Stop reporting; cancelling this waits no further."""
        task, self._task = self._task, None
        self._interval_s = 0.0
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class LoadBook:
    """Each source's recent reports of one deployment, and their averaged totals."""

    def __init__(self) -> None:
        self._samples: dict[object, collections.deque[tuple[float, float, float]]] = {}
        self.changed = asyncio.Event()

    def record(self, source: object, report: controller_pb2.LoadReport, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.setdefault(source, collections.deque()).append((now, report.ongoing, report.queued))
        self.changed.set()

    def forget(self, source: object) -> None:
        if self._samples.pop(source, None) is not None:
            self.changed.set()

    def totals(self, now: float, look_back_s: float) -> tuple[float, float]:
        """(ongoing, queued): the sum over sources of each one's mean report within
        the last ``look_back_s`` (its latest report, if none is that recent)."""
        ongoing = queued = 0.0
        since = now - look_back_s
        for samples in self._samples.values():
            while len(samples) > 1 and samples[0][0] < since:
                samples.popleft()
            n = len(samples)
            ongoing += sum(s[1] for s in samples) / n
            queued += sum(s[2] for s in samples) / n
        return ongoing, queued

    def queued_now(self) -> float:
        """Calls waiting in the latest report of every source."""
        return sum(samples[-1][2] for samples in self._samples.values() if samples)
