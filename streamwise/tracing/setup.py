"""The OpenTelemetry SDK set up from a TracingConfig, at entry points only.

``run()`` / the CLI configure the driver; each replica process configures itself from
the same config (it travels in the replica's spec). Spans of a process are flushed
when it shuts down gracefully; the JSON-lines exporter writes each span as it ends,
so a replica that is killed keeps the spans of the requests it completed.
"""

from __future__ import annotations

import os
import pathlib

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)

from streamwise.config import TracingConfig
from streamwise.tracing import spans
from streamwise.tracing.recorder import Provider

_resources: dict[int, dict] = {}


def _resource(span: ReadableSpan) -> dict:
    # Every span of a process shares one Resource: convert it once.
    resource = span.resource
    found = _resources.get(id(resource))
    if found is None:
        found = _resources[id(resource)] = {
            k: v for k, v in resource.attributes.items() if not k.startswith("telemetry.")
        }
    return found


def span_record(span: ReadableSpan) -> dict:
    """One span as the JSON object the viewer reads."""
    ctx = span.get_span_context()
    parent = span.parent
    status = span.status
    events = span.events
    links = span.links
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": status.status_code.name,
        "status_description": status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in events
        ]
        if events
        else [],
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"} for link in links
        ]
        if links
        else [],
        "resource": _resource(span),
    }


class JsonLinesProcessor(SpanProcessor):
    """Appends one JSON object per ended span to ``DIR/<service>-<pid>.jsonl``.

    Each span is one ``write`` to a file opened for appending, made as the span ends:
    nothing is buffered in the process, so a replica killed later keeps every span it
    finished. (A processor rather than an exporter: no batching layer to go through.)
    """

    def __init__(self, directory: str, service: str) -> None:
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(
            path / f"{service}-{os.getpid()}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )

    def on_end(self, span: ReadableSpan) -> None:
        fd = self._fd
        if fd is not None and span.context.trace_flags.sampled:
            os.write(fd, orjson.dumps(span_record(span), default=str) + b"\n")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every span is written as it ends

    def shutdown(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _processors(config: TracingConfig, service: str) -> list[SpanProcessor]:
    if callable(config.exporter):
        return list(config.exporter())
    if config.exporter == "jsonl":
        return [JsonLinesProcessor(config.jsonl_dir, service)]
    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return [BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True), schedule_delay_millis=500)]
    return [BatchSpanProcessor(ConsoleSpanExporter())]


class _Switch(SpanProcessor, Sampler):
    """The installed provider's sampler and span processor, re-pointable per ``run()``.

    OpenTelemetry lets a process set its global tracer provider once; a driver that
    runs, shuts down and runs again with other tracing settings swaps these instead.
    """

    def __init__(self) -> None:
        self.sampler: Sampler = ALWAYS_OFF
        self.processors: list[SpanProcessor] = []

    # Sampler
    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):  # type: ignore[override]
        if attributes and attributes.get(spans.SAMPLED_ROOT):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self.sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"streamwise({self.sampler.get_description()})"

    # SpanProcessor
    def on_start(self, span, parent_context=None) -> None:  # type: ignore[override]
        for processor in self.processors:
            processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self) -> None:
        processors, self.processors = self.processors, []
        self.sampler = ALWAYS_OFF
        for processor in processors:
            processor.shutdown()


_switch: _Switch | None = None


def configure(config: TracingConfig | None, service: str, **resource: str) -> None:
    """Install the SDK for this process from ``config`` (None or disabled: no tracing)."""
    global _switch
    if config is None or not config.enabled:
        return
    if _switch is None:
        switch = _Switch()
        provider = Provider(
            switch,
            sampler=switch,
            resource=Resource.create({"service.name": service, "process.pid": os.getpid(), **resource}),
            shutdown_on_exit=False,
        )
        provider.add_span_processor(switch)  # for the spans of user code
        trace.set_tracer_provider(provider)
        _switch = switch
    _switch.shutdown()
    _switch.processors = _processors(config, service)
    _switch.sampler = ParentBased(TraceIdRatioBased(config.sampling_ratio))
    spans.set_enabled(True, config.sampling_ratio)


def flush() -> None:
    """Export every finished span now."""
    if _switch is not None:
        _switch.force_flush()


def shutdown() -> None:
    """Flush and stop exporting; called when the process stops serving."""
    spans.set_enabled(False)
    if _switch is not None:
        _switch.shutdown()
