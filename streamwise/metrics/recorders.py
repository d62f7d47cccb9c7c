"""What each part of streamwise records: replicas, routers, the ingress, the controller.

Each process has one registry (``REGISTRY``). A replica's recorder counts the calls it
serves; every process that calls deployments counts its routers' retries, backoff
and waiting callers; the driver adds the ingress, the controller's replica states
and the object store. ``STREAMWISE_METRICS=0`` records nothing (for measuring what
recording costs: ``benchmarks/metrics_bench.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streamwise.config import env_metrics_enabled
from streamwise.metrics._stats import COUNT_BUCKETS, LATENCY_BUCKETS, Family, Histogram, Recorder

if TYPE_CHECKING:
    from streamwise.batching.stats import BatchStats

REGISTRY = CollectorRegistry(auto_describe=False)
ENABLED = env_metrics_enabled()

_CALL = ("application", "deployment", "replica", "method")
_REPLICA = ("application", "deployment", "replica")
_ROUTE = ("application", "deployment", "caller")


def ok_status(error: Any) -> str:
    """The status label of a call's outcome: OK, or the gRPC status it ends with."""
    if error is None:
        return "OK"
    return getattr(error, "status", "") or "INTERNAL"


class ReplicaRecorder(Recorder):
    """The calls one replica serves."""

    def __init__(self, application: str, deployment: str, replica: str) -> None:
        self._labels = (application, deployment, replica)
        self.requests = Family(
            "streamwise_replica_requests_total", "Calls a replica finished, by outcome", "counter", (*_CALL, "status")
        )
        self.errors = Family(
            "streamwise_replica_errors_total", "Calls a replica finished with an error, by status", "counter",
            (*_CALL, "status"),
        )
        self.latency = Family(
            "streamwise_replica_request_duration_seconds", "Time a replica took to serve a call (a stream: to its end)",
            "histogram", _CALL, LATENCY_BUCKETS,
        )
        self.first_item = Family(
            "streamwise_replica_stream_first_item_seconds", "Time from a stream's start to its first item leaving",
            "histogram", _CALL, LATENCY_BUCKETS,
        )
        self.items = Family(
            "streamwise_replica_stream_items", "Items each stream sent", "histogram", _CALL, COUNT_BUCKETS
        )
        self.ongoing = Family(
            "streamwise_replica_ongoing_requests", "Calls a replica runs now", "gauge", _REPLICA
        )
        self.rejected = Family(
            "streamwise_replica_rejected_total", "Calls a replica refused before running them (full or draining)",
            "counter", (*_REPLICA, "reason"),
        )
        self.batch_size = Family(
            "streamwise_batch_size", "Callers in each batch of a @batch method", "histogram", _CALL, COUNT_BUCKETS
        )
        self.batch_wait = Family(
            "streamwise_batch_wait_seconds", "How long a batch's first caller waited for it to start",
            "histogram", _CALL, LATENCY_BUCKETS,
        )
        self.batch_duration = Family(
            "streamwise_batch_duration_seconds", "How long each batch ran", "histogram", _CALL, LATENCY_BUCKETS
        )
        self.families = (
            self.requests, self.errors, self.latency, self.first_item, self.items, self.ongoing, self.rejected,
            self.batch_size, self.batch_wait, self.batch_duration,
        )
        self._keys: dict[str, tuple[str, ...]] = {}
        # Per method: the key of its OK count and its latency histogram (the hot path).
        self._hot: dict[str, tuple[tuple[str, ...], Histogram]] = {}

    def key(self, method: str) -> tuple[str, ...]:
        found = self._keys.get(method)
        if found is None:
            found = self._keys[method] = (*self._labels, method)
        return found

    def finished(self, method: str, status: str, seconds: float) -> None:
        hot = self._hot.get(method)
        if hot is None:
            key = self.key(method)
            hot = self._hot[method] = ((*key, "OK"), self.latency.histogram(key))
        ok_key, latency = hot
        counts = self.requests.values
        if status == "OK":
            counts[ok_key] = counts.get(ok_key, 0) + 1
        else:
            key = (*self.key(method), status)
            counts[key] = counts.get(key, 0) + 1
            self.errors.inc(key)
        latency.observe(seconds)

    def streamed(self, method: str, items: int, first_item_s: float | None) -> None:
        key = self.key(method)
        self.items.histogram(key).observe(items)
        if first_item_s is not None:
            self.first_item.histogram(key).observe(first_item_s)

    def refused(self, reason: str) -> None:
        self.rejected.inc((*self._labels, reason))

    def watch_ongoing(self, read: Callable[[], int]) -> None:
        self.ongoing.values[self._labels] = read

    def batch_listener(self, method: str) -> Callable[[BatchStats], None]:
        key = self.key(method)

        def record(stats: BatchStats) -> None:
            self.batch_size.histogram(key).observe(stats.size)
            self.batch_wait.histogram(key).observe(stats.wait_s)
            self.batch_duration.histogram(key).observe(stats.duration_s)

        return record


class RouterRecorder(Recorder):
    """The routers of this process: retries, backoff, callers waiting for a replica."""

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self.retries = Family(
            "streamwise_router_retries_total", "Calls a router sent again, by why (full, unreachable)", "counter",
            (*_ROUTE, "reason"),
        )
        self.backoff = Family(
            "streamwise_router_backoff_seconds_total", "Time routers waited before retrying a full replica",
            "counter", _ROUTE,
        )
        self.queued = Family(
            "streamwise_router_queued_requests", "Callers waiting for a replica with room", "gauge", _ROUTE
        )
        self.ongoing = Family(
            "streamwise_router_ongoing_requests", "Calls this process has in flight to a deployment", "gauge", _ROUTE
        )
        self.shed_calls = Family(
            "streamwise_router_shed_requests_total", "Calls refused at once because max_queued_requests callers wait",
            "counter", _ROUTE,
        )
        self.families = (self.retries, self.backoff, self.queued, self.ongoing, self.shed_calls)

    def shed(self, application: str, deployment: str) -> None:
        self.shed_calls.inc((application, deployment, self.caller))

    def watch(self, application: str, deployment: str, queued: Callable[[], int], ongoing: Callable[[], int]) -> None:
        key = (application, deployment, self.caller)
        self.queued.values[key] = queued
        self.ongoing.values[key] = ongoing

    def unwatch(self, application: str, deployment: str) -> None:
        key = (application, deployment, self.caller)
        self.queued.values.pop(key, None)
        self.ongoing.values.pop(key, None)

    def retried(self, application: str, deployment: str, full: bool, delay_s: float) -> None:
        key = (application, deployment, self.caller)
        self.retries.inc((*key, "full" if full else "unreachable"))
        if delay_s:
            self.backoff.inc(key, delay_s)


class IngressRecorder(Recorder):
    """External calls the gRPC ingress served, and the client connections it holds."""

    def __init__(self) -> None:
        self._connections: Callable[[], int | None] | None = None
        self.requests = Family(
            "streamwise_ingress_requests_total", "External gRPC calls, by status", "counter",
            ("application", "method", "status"),
        )
        self.latency = Family(
            "streamwise_ingress_request_duration_seconds", "Time the ingress took over an external call",
            "histogram", ("application", "method"), LATENCY_BUCKETS,
        )
        self.families = (self.requests, self.latency)
        self._hot: dict[tuple[str, str, str], Histogram] = {}  # (app, method, status) -> its latency

    def finished(self, application: str, method: str, status: str, seconds: float) -> None:
        key = (application, method, status)
        hot = self._hot.get(key)
        if hot is None:  # the label sets are few: the apps served, their methods, statuses
            hot = self._hot[key] = self.latency.histogram((application, method))
        counts = self.requests.values
        counts[key] = counts.get(key, 0) + 1
        hot.observe(seconds)

    def watch_connections(self, read: Callable[[], int | None]) -> None:
        """Report ``read()`` (called at each scrape; None: unknown, left out) as the
        open client connections."""
        self._connections = read

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        count = self._connections() if self._connections is not None else None
        if count is not None:
            # No application label: one connection may carry calls to every app.
            yield GaugeMetricFamily(
                "streamwise_ingress_connections", "Client connections the gRPC ingress has open", value=count
            )


class FunctionCollector:
    """A collector whose metrics a function makes at each scrape (state read then)."""

    def __init__(self, make: Callable[[], Iterator[Metric]]) -> None:
        self._make = make

    def collect(self) -> Iterator[Metric]:
        return self._make()

    def describe(self) -> list[Metric]:
        return []


def controller_metrics(apps: Callable[[], dict[str, dict[str, Any]]]) -> Iterator[Metric]:
    """Replica states, targets, restarts and autoscaled load of every deployment of ``apps()``."""
    states = GaugeMetricFamily("streamwise_replicas", "Replicas by state", labels=("application", "deployment", "state"))
    target = GaugeMetricFamily(
        "streamwise_deployment_target_replicas", "Replicas a deployment should run", labels=("application", "deployment")
    )
    restarts = CounterMetricFamily(
        "streamwise_replica_restarts_total", "Replicas replaced after dying or failing health checks",
        labels=("application", "deployment"),
    )
    seen = [
        GaugeMetricFamily(f"streamwise_autoscaling_{what}_requests", f"{what.capitalize()} calls the autoscaler "
                          "last decided on, averaged over its look-back period", labels=("application", "deployment"))
        for what in ("ongoing", "queued")
    ]
    for app, deployments in apps().items():
        for name, dep in deployments.items():
            if dep.config.autoscaling_config is not None:
                for family, value in zip(seen, dep.seen_load, strict=True):
                    family.add_metric((app, name), value)
            counts: dict[str, int] = {"STARTING": 0, "RUNNING": 0, "DRAINING": 0}
            for replica in dep.replicas.values():
                counts[replica.state.name] = counts.get(replica.state.name, 0) + 1
            for state, n in counts.items():
                states.add_metric((app, name, state), n)
            target.add_metric((app, name), dep.target)
            restarts.add_metric((app, name), dep.restarts)
    yield from (states, target, restarts, *seen)


def store_metrics(usage: Callable[[], tuple[int, int] | None]) -> Iterator[Metric]:
    """Bytes of the object store's shared memory in use, and its capacity."""
    found = usage()
    if found is None:
        return
    used, capacity = found
    yield GaugeMetricFamily("streamwise_object_store_used_bytes", "Shared memory the object store holds", value=used)
    yield GaugeMetricFamily("streamwise_object_store_capacity_bytes", "The object store's limit", value=capacity)


_router: RouterRecorder | None = None


def router_recorder(caller: str) -> RouterRecorder | None:
    """This process's router recorder (made on first use); None when metrics are off."""
    global _router
    if not ENABLED:
        return None
    if _router is None:
        _router = RouterRecorder(caller)
        REGISTRY.register(_router)
    return _router
