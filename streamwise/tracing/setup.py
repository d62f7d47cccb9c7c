"""The OpenTelemetry SDK set up from a TracingConfig, at entry points only.

``run()`` / the CLI configure the driver; each replica process configures itself from
the same config (it travels in the replica's spec). Spans of a process are flushed
when it shuts down gracefully; the JSON-lines exporter writes the spans of a request
before its reply leaves, so a replica that is killed keeps the spans of the requests
it completed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import pathlib
import threading
import weakref
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from streamwise.config import TracingConfig, env_otel_service_name
from streamwise.tracing import sampling, spans
from streamwise.tracing.recorder import SCOPE, UNSET, Provider, RecordingSpan, Tracer

# Every span of a process shares one Resource: it is converted once. (The entry holds
# the Resource, so that its id is not reused by another.)
_resources: dict[int, tuple[Resource, dict, bytes]] = {}


def _converted(resource: Resource) -> tuple[Resource, dict, bytes]:
    found = _resources.get(id(resource))
    if found is None:
        attributes = {k: v for k, v in resource.attributes.items() if not k.startswith("telemetry.")}
        found = _resources[id(resource)] = (resource, attributes, orjson.dumps(attributes, default=str))
    return found


def _resource(resource: Resource) -> dict:
    return _converted(resource)[1]


# Enum members hash through a Python-level __hash__: these are looked up by identity.
_KIND = {id(kind): kind.name for kind in SpanKind}
_CODE = {id(code): code.name for code in StatusCode}


def span_record(span: ReadableSpan) -> dict:
    """One span as the JSON object the viewer reads."""
    attributes: Any
    if type(span) is RecordingSpan:
        # streamwise's own spans (most of them): their fields as they are, without
        # the copies and calls ReadableSpan's properties make.
        trace_id, span_id, parent_id = span.trace_id, span.span_id, span.parent_id
        name, kind, start_ns, end_ns, status = span._name, span._kind, span._start_time, span._end_time, span._status
        attributes, events, links, resource = span._attributes, span._events, span._links, span._resource
        if type(attributes) is not dict:
            attributes = dict(attributes)
    else:
        ctx, parent = span.context or INVALID_SPAN_CONTEXT, span.parent
        trace_id, span_id, parent_id = ctx.trace_id, ctx.span_id, parent.span_id if parent is not None else 0
        name, kind, start_ns, end_ns, status = span.name, span.kind, span.start_time, span.end_time, span.status
        attributes, events, links, resource = dict(span.attributes or {}), span.events, span.links, span.resource
    if status is UNSET:
        code, description = "UNSET", None
    else:
        code, description = _CODE[id(status.status_code)], status.description
    return {
        "trace_id": f"{trace_id:032x}",
        "span_id": f"{span_id:016x}",
        "parent_id": f"{parent_id:016x}" if parent_id else None,
        "name": name,
        "kind": _KIND[id(kind)],
        "start_ns": start_ns,
        "end_ns": end_ns,
        "status": code,
        "status_description": description,
        "attributes": attributes,
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in events]
        if events
        else [],
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"} for link in links
        ]
        if links
        else [],
        "resource": _resource(resource),
    }


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_KIND_BYTES = {id(kind): kind.name.encode() for kind in SpanKind}
_CODE_BYTES = {id(code): code.name.encode() for code in StatusCode}
_LINE = (
    b'{"trace_id":"%032x","span_id":"%016x","parent_id":%b,"name":%b,"kind":"%b","start_ns":%d,"end_ns":%d,'
    b'"status":"%b","status_description":%b,"attributes":%b,"events":[],"links":[],"resource":%b}\n'
)


def span_line(span: ReadableSpan) -> bytes:
    """``span_record(span)`` as one line of JSON (its newline included)."""
    if type(span) is not RecordingSpan or span._events or span._links:
        return orjson.dumps(span_record(span), default=str, option=orjson.OPT_APPEND_NEWLINE)
    # streamwise's own spans (most of them), written straight into the line's template.
    attributes = span._attributes
    assert attributes is not None  # a RecordingSpan always has its own
    if type(attributes) is not dict:  # bounded, once user code set a value that needed cleaning
        attributes = dict(attributes)
    return _line(
        span.trace_id,
        span.span_id,
        span.parent_id,
        span._name,
        _KIND_BYTES[id(span._kind)],
        span._start_time,  # type: ignore[arg-type]  # started
        span._end_time,  # type: ignore[arg-type]  # ended
        span._status,
        attributes,
        span._resource,
    )


def _line(
    trace_id: int,
    span_id: int,
    parent_id: int,
    name: str,
    kind: bytes,
    start_ns: int,
    end_ns: int,
    status: Status,
    attributes: dict,
    resource: Resource,
) -> bytes:
    """The JSON line of a span without events or links, from its fields."""
    return _LINE % (
        trace_id,
        span_id,
        b'"%016x"' % parent_id if parent_id else b"null",
        orjson.dumps(name),
        kind,
        start_ns,
        end_ns,
        b"UNSET" if status is UNSET else _CODE_BYTES[id(status.status_code)],
        b"null" if status is UNSET else orjson.dumps(status.description),
        orjson.dumps(attributes, default=str),
        _converted(resource)[2],
    )


class JsonLinesProcessor(SpanProcessor):
    """Appends one JSON object per ended span to ``DIR/<service>-<pid>.jsonl``.

    Nothing waits long in the process: a span is written at most ``delay_s`` after it
    ended, in one ``write`` with the others that ended meanwhile (at once on a thread
    without a running loop, or when ``MAX_PENDING`` are waiting). With ``durable``
    (in replicas), a server span is written as it ends, with every span that ended
    before it: a request's own spans, and those of its downstream calls, end before
    its server span, and that one ends before the reply leaves, so a replica killed
    later keeps them for every request it completed. The driver, which is not
    restarted, batches its ingress spans too, and writes what is pending when it shuts
    down. A write releases the GIL, and on a busy driver another thread takes it:
    one write per batch rather than per request is what keeps tracing cheap there.

    Thread-safe: spans may end on any thread. A process forked from this one writes
    its own file. (A processor rather than an exporter: no batching layer to go
    through.)
    """

    MAX_PENDING = 512

    def __init__(self, directory: str, service: str, durable: bool = True, delay_s: float = 0.05) -> None:
        self._durable = durable
        self._delay_s = delay_s
        self._path = pathlib.Path(directory)
        self._path.mkdir(parents=True, exist_ok=True)
        self._service = service
        self._lock = threading.Lock()  # the file: writes and close
        self._pending: collections.deque[bytes] = collections.deque()  # appended without the lock
        # The loop on which a write of the pending lines is due (within delay_s).
        self._due_on: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = self._open()
        forked = weakref.WeakMethod(self._forked)
        os.register_at_fork(after_in_child=lambda: (method := forked()) is not None and method())

    def _open(self) -> int:
        name = f"{self._service}-{os.getpid()}.jsonl"
        return os.open(self._path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _forked(self) -> None:
        # The child: what is pending is the parent's to write; the file is the parent's.
        self._lock = threading.Lock()
        self._pending.clear()
        self._due_on = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._open()

    def on_end(self, span: ReadableSpan) -> None:
        if type(span) is RecordingSpan:
            sampled, kind = span.sampled, span._kind
        else:
            sampled, kind = span.context.trace_flags.sampled, span.kind
        if sampled:
            self.add(span_line(span), kind is SpanKind.SERVER)

    def add(self, line: bytes, server: bool = False) -> None:
        """Write ``line``, the JSON line of a sampled span (``server``: a server span)."""
        if self._fd is None:
            return
        self._pending.append(line)
        if (server and self._durable) or len(self._pending) >= self.MAX_PENDING:
            self._write()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        if self._due_on is not loop:
            self._due_on = loop
            loop.call_later(self._delay_s, self._when_due)

    def _when_due(self) -> None:
        self._due_on = None
        self._write()

    def _write(self) -> None:
        with self._lock:
            pending = self._pending
            lines = []
            try:  # popleft until empty: safe against appends from other threads
                while True:
                    lines.append(pending.popleft())
            except IndexError:
                pass
            if lines and self._fd is not None:
                data = memoryview(b"".join(lines))
                while data:  # a regular file takes it all, short of a full disk
                    data = data[os.write(self._fd, data) :]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._write()
        return True

    def shutdown(self) -> None:
        self._write()
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)


def _processors(config: TracingConfig, service: str, replica: bool) -> list[SpanProcessor]:
    if callable(config.exporter):
        return list(config.exporter())
    if config.exporter == "jsonl":
        return [JsonLinesProcessor(config.jsonl_dir, service, durable=replica)]
    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = config.otlp_endpoint
        if endpoint is None:  # the OTEL_EXPORTER_OTLP_* variables decide, as for any OTel program
            exporter = OTLPSpanExporter()
        else:  # a bare host:port is a plain collector; a URL's scheme says whether TLS is used
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=None if "://" in endpoint else True)
        return [BatchSpanProcessor(exporter, schedule_delay_millis=500)]
    return [BatchSpanProcessor(ConsoleSpanExporter())]


class _Switch(SpanProcessor, Sampler):
    """The installed provider's sampler and span processor, re-pointable per ``run()``.

    OpenTelemetry lets a process set its global tracer provider once; a driver that
    runs, shuts down and runs again with other tracing settings swaps these instead.
    """

    def __init__(self) -> None:
        self.sampler: Sampler = ALWAYS_OFF
        self.processors: list[SpanProcessor] = []
        self.tracer: Tracer | None = None  # the provider's, for streamwise's own spans

    def record_route(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent_id: int,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        error: BaseException | None,
    ) -> None:
        """``spans.RecordRoute``: while every processor is a JsonLinesProcessor, the line
        is written from the fields; otherwise (a failed call, or processors swapped by
        a new ``configure`` meanwhile) the span is made and ended as a span."""
        tracer = self.tracer
        assert tracer is not None
        if error is None and self.lines_only():
            line = _line(trace_id, span_id, parent_id, name, b"CLIENT", start_ns, end_ns, UNSET, attributes, tracer.resource)
            for processor in self.processors:
                processor.add(line)  # type: ignore[attr-defined]
            return
        parent = SpanContext(trace_id, parent_id, True, _SAMPLED) if parent_id else None
        span = RecordingSpan(tracer, name, trace_id, span_id, True, None, parent, SpanKind.CLIENT, attributes, (), start_ns)
        if error is not None:
            spans.mark_error(span, error, timestamp=end_ns)
        span.end(end_ns)

    def lines_only(self) -> bool:
        """Whether every processor is a JsonLinesProcessor (none needs a span object)."""
        return bool(self.processors) and all(type(p) is JsonLinesProcessor for p in self.processors)

    # Sampler
    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):  # type: ignore[override]
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


def _resource_of(service: str, attributes: dict[str, str]) -> Resource:
    """This process's resource: OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (read by
    the SDK), with streamwise's attributes; ``service`` names it unless those do."""
    own: dict[str, object] = {"process.pid": os.getpid(), **attributes}
    if env_otel_service_name() is None:
        own["service.name"] = service
    return Resource.create(own)


_switch: _Switch | None = None
_start: spans.StartSampled | None = None


def configure(config: TracingConfig | None, service: str, *, replica: bool = False, **resource: str) -> None:
    """Install the SDK for this process from ``config`` (None or disabled: no tracing).

    ``replica``: this process is a replica, which keeps the spans of the requests it
    completed should it be killed (see JsonLinesProcessor).
    """
    global _switch, _start
    if config is None or not config.enabled:
        return
    if _switch is None:
        switch = _Switch()
        provider = Provider(
            switch,
            sampler=switch,
            resource=_resource_of(service, resource),
            shutdown_on_exit=False,
        )
        provider.add_span_processor(switch)  # for the spans of user code
        trace.set_tracer_provider(provider)
        if trace.get_tracer_provider() is provider:
            # Not so when the process had a provider already: spans then go through
            # that one (and its sampler).
            switch.tracer = provider.get_tracer(SCOPE)  # type: ignore[assignment]
            _start = switch.tracer.start_sampled  # type: ignore[union-attr]
        _switch = switch
    _switch.shutdown()
    _switch.processors = _processors(config, service, replica)
    _switch.sampler = sampling.sampler(config.sampling_ratio)
    record_route = _switch.record_route if _switch.tracer is not None and _switch.lines_only() else None
    spans.set_enabled(True, config.sampling_ratio, _start, record_route, foreign_sampler=_start is None)


def flush() -> None:
    """Export every finished span now."""
    if _switch is not None:
        _switch.force_flush()


def shutdown() -> None:
    """Flush and stop exporting; called when the process stops serving."""
    spans.set_enabled(False)
    if _switch is not None:
        _switch.shutdown()
