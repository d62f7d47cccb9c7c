"""The driver's Prometheus scrape endpoint, merging every process's metrics.

At each scrape the driver collects its own registry and asks each running replica
for its metrics (``Replica.Metrics``, over the authenticated internal plane), then
serves them as one exposition: a family recorded in several processes appears once,
with the samples of all (each carries its ``replica`` or ``caller`` label).

Who may connect: anyone who can reach ``host:port`` (default 127.0.0.1): the
endpoint only answers HTTP GETs with metric names and numbers, and takes no input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from streamwise.metrics.recorders import REGISTRY
from streamwise.proto import replica_pb2
from streamwise.streaming import _wire

_REPLICA_TIMEOUT_S = 2.0
_SCRAPE_TIMEOUT_S = 10.0


async def replica_metrics(address: str, metadata: tuple[tuple[str, str], ...]) -> bytes:
    """A replica's metrics in the text format; empty if it does not answer in time."""
    reply = await _wire.ask_replica(address, metadata, "Metrics", replica_pb2.MetricsRequest(), _REPLICA_TIMEOUT_S)
    return b"" if reply is None else reply.text


def merge(texts: list[bytes]) -> list[Metric]:
    """One family per name, holding the samples every text has of it."""
    merged: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            into.samples.extend(family.samples)
    return list(merged.values())


class _Merged:
    def __init__(self, gather: Callable[[], list[bytes]]) -> None:
        self._gather = gather

    def collect(self) -> Iterator[Metric]:
        return iter(merge(self._gather()))

    def describe(self) -> list[Metric]:
        return []


class MetricsEndpoint:
    """Serves ``/metrics`` on ``host:port`` from a thread of its own until ``close()``.

    ``replicas()`` (run on ``loop``) returns the texts of every replica's metrics.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, replicas: Callable[[], Coroutine[Any, Any, list[bytes]]]
    ) -> None:
        self._loop = loop
        self._replicas = replicas
        self._server: Any = None
        self._thread: Any = None
        self.address = ""

    def _gather(self) -> list[bytes]:
        async def everything() -> list[bytes]:
            # On the loop that records: the driver's numbers are read where they change.
            return [prometheus_client.generate_latest(REGISTRY), *await self._replicas()]

        return asyncio.run_coroutine_threadsafe(everything(), self._loop).result(_SCRAPE_TIMEOUT_S)

    def start(self, host: str, port: int) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self._gather))
        self._server, self._thread = prometheus_client.start_http_server(port, host, registry)
        self._thread.name = "streamwise-metrics"
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.address = f"{shown}:{self._server.server_port}"
        return self.address

    def close(self) -> None:
        """Stop serving; returns once the server's thread has ended."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join()
