"""The tracer behind streamwise's own spans: SDK spans without per-span bookkeeping.

``setup.configure`` installs a TracerProvider whose tracer for the ``streamwise``
instrumentation scope comes from here; every other scope (user code) gets the SDK's
own tracers, unchanged. The spans made here are SDK ``ReadableSpan``s, so every span
processor and exporter takes them as they are. What they skip is work streamwise's
spans do not need on every request:

- the attributes given at start are streamwise's own, already valid values: they are
  kept as given (attributes set later that are not plain str/bool/int/float values,
  e.g. by user code on the current span, are cleaned and bounded as the SDK does);
- no lock: a span belongs to the one task serving its request;
- no copy at the end: the span itself is handed to the processors.

Sampling goes through the provider's sampler, ids through its id generator, exactly
as in the SDK's tracer.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator, Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

SCOPE = "streamwise"

_PLAIN = (str, bool, int, float)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
# The status of every span until one is set.
UNSET = Status(StatusCode.UNSET)


class RecordingSpan(trace.Span, ReadableSpan):
    """A recording span that is also the ReadableSpan its processors receive.

    Besides ReadableSpan's fields it keeps, for exporters that read many spans, its ids
    as plain ints (``trace_id``, ``span_id``, ``parent_id``: 0 for a root) and whether
    it is ``sampled``.

    Its fields are slots (no ``__dict__`` is made unless something sets another
    attribute), so that the many spans in flight at a time are fewer and smaller
    objects for the garbage collector to go through.
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_instrumentation_info",
        "_instrumentation_scope",
        "_kind",
        "_links",
        "_name",
        "_parent",
        "_resource",
        "_start_time",
        "_status",
        "_tracer",
        "parent_id",
        "sampled",
        "span_id",
        "trace_id",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        trace_id: int,
        span_id: int,
        sampled: bool,
        trace_state: TraceState | None,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
        start_time: int,
    ) -> None:
        # ReadableSpan's fields, set here rather than through its keyword-only
        # __init__: this runs for every request.
        self._name = name
        self._context = SpanContext(trace_id, span_id, False, _SAMPLED if sampled else _NOT_SAMPLED, trace_state)
        self._kind = kind
        self._instrumentation_info = None
        self._instrumentation_scope = tracer.scope
        self._parent = parent
        self._start_time = start_time
        self._end_time: int | None = None
        self._attributes = attributes
        self._events: Sequence[Event] = ()  # a list from the first event on
        self._links = tuple(links) if links else ()
        self._resource = tracer.resource
        self._status = UNSET
        self._tracer = tracer
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent.span_id if parent is not None else 0
        self.sampled = sampled

    # -- the API's Span ------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end_time is not None:
            return
        attributes = self._attributes
        if type(attributes) is dict:
            limit: int = self._tracer.limits.max_span_attributes  # type: ignore[assignment]  # set by SpanLimits
            if type(value) in _PLAIN and type(key) is str and key and len(attributes) < limit:
                attributes[key] = value
                return
            limits = self._tracer.limits
            attributes = self._attributes = BoundedAttributes(
                limits.max_span_attributes, attributes, immutable=False, max_value_len=limits.max_span_attribute_length
            )
        attributes[key] = value  # type: ignore[index]

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self._end_time is not None:
            return
        limits = self._tracer.limits
        if len(self._events) >= limits.max_events:  # type: ignore[operator]  # an int once SpanLimits is made
            return
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, immutable=True, max_value_len=limits.max_attribute_length
        )
        self._events = [*self._events, Event(name, bounded, timestamp)]

    def add_link(self, context: SpanContext, attributes: Any = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As in the SDK: OK is final, UNSET never replaces anything.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self, exception: BaseException, attributes: Any = None, timestamp: int | None = None, escaped: bool = False
    ) -> None:
        cls = type(exception)
        module = cls.__module__
        values: dict[str, Any] = {
            "exception.type": f"{module}.{cls.__qualname__}" if module and module != "builtins" else cls.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            values.update(attributes)
        self.add_event("exception", values, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._tracer.processor.on_end(self)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and self.is_recording():
            self.record_exception(exc, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.end()


class Tracer(trace.Tracer):
    """Makes RecordingSpans for the provider it belongs to."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor) -> None:
        self._provider = provider
        self.processor = processor
        self.resource = provider.resource
        self.scope = InstrumentationScope(SCOPE)
        self.limits = SpanLimits()

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        provider = self._provider
        links = links or ()
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
        else:
            parent = None
            trace_id = provider.id_generator.generate_trace_id()
        result = provider.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = result.decision
        span_id = provider.id_generator.generate_span_id()
        if not decision.is_recording():
            flags = _SAMPLED if decision.is_sampled() else _NOT_SAMPLED
            return trace.NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, result.trace_state))
        values = dict(result.attributes) if result.attributes else {}
        span = RecordingSpan(
            self,
            name,
            trace_id,
            span_id,
            decision.is_sampled(),
            result.trace_state,
            parent,
            kind,
            values,
            links,
            start_time if start_time is not None else time_ns(),
        )
        self.processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    def start_sampled(
        self,
        name: str,
        context: otel_context.Context,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link] = (),
    ) -> RecordingSpan:
        """A sampled span under ``parent`` (None: the root of a new trace), no sampler asked.

        For callers that made the parent-based decision themselves (``spans``): the
        span is what ``start_span`` makes when the sampler says RECORD_AND_SAMPLE.
        ``context`` is the parent's context, as the processors' ``on_start`` sees it;
        ``attributes`` is kept as the span's own dict.
        """
        ids = self._provider.id_generator
        if parent is None:
            trace_id, trace_state = ids.generate_trace_id(), None
        else:
            trace_id, trace_state = parent.trace_id, parent.trace_state
        span = RecordingSpan(
            self, name, trace_id, ids.generate_span_id(), True, trace_state, parent, kind, attributes, links, time_ns()
        )
        self.processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span, end_on_exit=end_on_exit, record_exception=record_exception, set_status_on_exception=set_status_on_exception
        ) as current:
            yield current


class Provider(TracerProvider):
    """The SDK's TracerProvider, with streamwise's own scope served by ``Tracer``.

    ``processor`` receives streamwise's spans; it must also be added to the provider
    (with ``add_span_processor``) for the spans of every other scope.
    """

    def __init__(self, processor: SpanProcessor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._streamwise = Tracer(self, processor)

    def get_tracer(self, instrumenting_module_name: str, *args: Any, **kwargs: Any) -> trace.Tracer:
        if instrumenting_module_name == SCOPE:
            return self._streamwise
        return super().get_tracer(instrumenting_module_name, *args, **kwargs)
