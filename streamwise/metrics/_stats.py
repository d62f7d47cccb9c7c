"""Counts kept in plain Python numbers, turned into Prometheus families when scraped.

Recording happens on a process's event loop, on the request path, so it must cost
next to nothing: an increment of an int and, for a histogram, a ``bisect`` into its
bounds. No lock is taken (everything is recorded on one loop, and a scrape reads
on that loop too); prometheus-client makes the families and the text format.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class Histogram:
    """Observations of one label set: per-bucket counts, sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class Family:
    """One metric: its kind, labels, and the value of each label set seen."""

    __slots__ = ("name", "doc", "kind", "labels", "values", "bounds")

    def __init__(self, name: str, doc: str, kind: str, labels: tuple[str, ...], bounds: tuple[float, ...] = ()) -> None:
        self.name, self.doc, self.kind, self.labels, self.bounds = name, doc, kind, labels, bounds
        self.values: dict[tuple[str, ...], Any] = {}

    def histogram(self, key: tuple[str, ...]) -> Histogram:
        found = self.values.get(key)
        if found is None:
            found = self.values[key] = Histogram(self.bounds)
        return found

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def metric(self) -> Metric:
        if self.kind == "counter":
            family: Any = CounterMetricFamily(self.name, self.doc, labels=self.labels)
            for key, value in self.values.items():
                family.add_metric(key, value)
        elif self.kind == "gauge":
            family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
            for key, value in self.values.items():
                family.add_metric(key, value() if callable(value) else value)
        else:
            family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
            for key, hist in self.values.items():
                family.add_metric(key, hist.buckets(), hist.sum)
        return family


class Recorder:
    """A prometheus-client collector over the families its subclass records into."""

    families: tuple[Family, ...] = ()

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.metric()

    def describe(self) -> Iterable[Metric]:
        return ()  # families appear as they are first recorded into
