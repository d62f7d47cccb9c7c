"""The spans streamwise makes, through the OpenTelemetry API only.

Library code calls these helpers; they do nothing (and cost next to nothing) until
:mod:`streamwise.tracing.setup` configured tracing in this process. Trace context
crosses processes in each request's metadata map as W3C ``traceparent`` /
``tracestate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from streamwise.tracing import propagation
from streamwise.tracing.propagation import EMPTY, UNSAMPLED, UnsampledCaller, UnsampledWithIds, inject, random_id

_TRACER = trace.get_tracer("streamwise")
_enabled = False  # configured and not paused
_configured = False
_ratio = 1.0

# Starts a span that is to be sampled: (name, parent context, the parent's span
# context or None for a new trace, kind, attributes, links) -> a recording span.
StartSampled = Callable[[str, otel_context.Context, SpanContext | None, SpanKind, dict[str, Any], Sequence[Link]], trace.Span]


def _start_with_api(
    name: str,
    context: otel_context.Context,
    parent: SpanContext | None,
    kind: SpanKind,
    attributes: dict[str, Any],
    links: Sequence[Link],
) -> trace.Span:
    # Whatever provider is installed; its sampler has the last word.
    return _TRACER.start_span(name, context=context, kind=kind, attributes=attributes, links=links)


_start: StartSampled = _start_with_api

# Records a sampled route span from its fields alone, when all the exporter needs is
# those: (name, trace_id, span_id, parent span_id or 0, start_ns, end_ns, attributes,
# the exception it failed with or None).
RecordRoute = Callable[[str, int, int, int, int, int, dict[str, Any], BaseException | None], None]
_record_route: RecordRoute | None = None


def set_enabled(
    enabled: bool,
    sampling_ratio: float = 1.0,
    start: StartSampled | None = None,
    record_route: RecordRoute | None = None,
    foreign_sampler: bool = False,
) -> None:
    """Turn streamwise's spans on or off in this process.

    Sampling is decided here, parent-based, before any SDK work: a root is sampled
    with ``sampling_ratio``. ``start`` makes the spans that are sampled (default: the
    installed provider's tracer, whose sampler is asked again). With ``record_route``,
    route spans, which are never made current, are handed to it as fields instead of
    being made as spans. ``foreign_sampler``: the installed provider's sampler is not
    streamwise's (sampling.py), which knows UNSAMPLED.
    """
    global _enabled, _configured, _ratio, _start, _record_route, _foreign_sampler
    _enabled = _configured = enabled
    _foreign_sampler = foreign_sampler
    _ratio = sampling_ratio
    _start = start if start is not None else _start_with_api
    _record_route = record_route


def pause(paused: bool) -> None:
    """Pause (or resume) streamwise's spans in this process, keeping how they were
    configured: while paused, every helper here does what it does with tracing off.
    For A/B measurements of tracing within one process; spans that user code starts
    are still sampled by the installed sampler. ``set_enabled`` (a new configuration)
    resumes."""
    global _enabled
    _enabled = _configured and not paused


def enabled() -> bool:
    return _enabled


def capture() -> otel_context.Context | None:
    """The caller's trace context, to parent spans made later on another thread."""
    return otel_context.get_current() if _enabled else None


# Sampling is parent-based: a sampled parent is followed, an unsampled one too. A
# root is sampled with the configured ratio. A new trace that is not sampled gets no
# ids: nothing would ever be recorded under them, so nothing about it crosses a hop,
# and a replica takes a call without ``traceparent`` (every streamwise caller traces
# when its callee does) as one whose caller did not sample it. Its requests are
# current as UNSAMPLED, under which the installed sampler starts nothing either.

_UNSAMPLED_CONTEXT = trace.set_span_in_context(UNSAMPLED, EMPTY)
_foreign_sampler = False  # the installed sampler is not streamwise's (see UnsampledWithIds)


def _unsampled_context() -> otel_context.Context:
    if _foreign_sampler:
        return trace.set_span_in_context(UnsampledWithIds(), EMPTY)
    return _UNSAMPLED_CONTEXT


def _in_unsampled_trace(span: trace.Span) -> bool:
    """Whether ``span`` is that of a request whose new trace is not sampled."""
    return span is UNSAMPLED or type(span) is UnsampledWithIds


def _sample_root() -> bool:
    return _ratio >= 1.0 or random.random() < _ratio


def mark_error(span: trace.Span, exc: BaseException, timestamp: int | None = None) -> None:
    """Record ``exc`` on ``span`` as an error (callers skip cancellation), at
    ``timestamp`` (ns since the epoch; default: now)."""
    span.record_exception(exc, timestamp=timestamp)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class RouteSpan(Protocol):
    """What the router tells the span of a call it routes."""

    def chose(self, replica_id: str) -> None: ...

    def retried(self, backoff_s: float) -> None: ...


class _NoRoute:
    """Stands in for a route span (and its context manager) when nothing is recorded."""

    __slots__ = ()

    def chose(self, replica_id: str) -> None:
        pass

    def retried(self, backoff_s: float) -> None:
        pass

    def __enter__(self) -> _NoRoute:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_ROUTE = _NoRoute()
NO_ROUTE = _NO_ROUTE  # what route() returns while tracing is off


class _NoSpan:
    """A context manager yielding None: ``serve`` when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()
NO_SPAN = _NO_SPAN  # what serve() returns while tracing is off


def route(
    deployment: str, method: str, metadata: MutableMapping[str, str], parent: otel_context.Context | None
) -> contextlib.AbstractContextManager[RouteSpan]:
    """A client span around routing one call, under ``parent`` (default: the current
    context); its context goes into ``metadata``.

    Whether the call is sampled is decided here: a call that is not gets the
    ``traceparent`` of a caller that has one (a client's, or a user's span) at once,
    and nothing to record.
    """
    if not _enabled:
        return _NO_ROUTE
    context = parent if parent is not None else otel_context.get_current()
    current = trace.get_current_span(context)
    if current is UNSAMPLED or type(current) is UnsampledWithIds:  # inline _in_unsampled_trace: every call
        return _NO_ROUTE
    if type(current) is UnsampledCaller:  # serving a request its caller did not sample
        metadata["traceparent"] = current.header
        return _NO_ROUTE
    caller = current.get_span_context()
    if caller.is_valid:
        if caller.trace_flags.sampled:
            return _Route(deployment, method, metadata, context, caller)
        inject(metadata, caller)
        return _NO_ROUTE
    if _sample_root():
        return _Route(deployment, method, metadata, context, None)
    return _NO_ROUTE  # a new trace, not sampled: the callee gets no traceparent


def _ends_in_error(exc: BaseException | None) -> bool:
    """Whether leaving a span with ``exc`` marks it as failed (cancellation does not)."""
    return exc is not None and not isinstance(exc, asyncio.CancelledError | GeneratorExit)


class _Route:
    """The context manager ``route`` returns for a sampled call, and the RouteSpan it
    yields (a class, not a generator: it runs on every sampled call).

    A sampled call's span is either a span (``_span``) or, with ``_record_route``, the
    fields kept here until the call ends and are handed to ``_record``, the
    ``_record_route`` of the moment the call started.
    """

    __slots__ = (
        "_attributes", "_backoff_s", "_deployment", "_ids", "_metadata", "_method", "_parent", "_retries", "_span",
        "_record", "_start_ns", "_under",
    )  # fmt: skip

    def __init__(
        self,
        deployment: str,
        method: str,
        metadata: MutableMapping[str, str],
        parent: otel_context.Context,
        under: SpanContext | None,
    ) -> None:
        self._deployment = deployment
        self._method = method
        self._metadata = metadata
        self._parent = parent
        self._under = under  # the new span's parent (sampled); None: a new trace
        self._span: trace.Span | None = None
        self._record: RecordRoute | None = None
        self._retries = 0
        self._backoff_s = 0.0

    def chose(self, replica_id: str) -> None:
        if self._span is None:
            self._attributes["streamwise.replica_id"] = replica_id
        else:
            self._span.set_attribute("streamwise.replica_id", replica_id)

    def retried(self, backoff_s: float) -> None:
        self._retries += 1
        self._backoff_s += backoff_s

    def __enter__(self) -> RouteSpan:
        under = self._under
        attributes: dict[str, Any] = {"streamwise.deployment": self._deployment, "streamwise.method": self._method}
        if _record_route is not None:
            self._record = _record_route
            trace_id = under.trace_id if under is not None else random_id(128)
            span_id = random_id(64)
            self._ids = (trace_id, span_id, under.span_id if under is not None else 0)
            self._attributes = attributes
            self._metadata["traceparent"] = "00-%032x-%016x-01" % (trace_id, span_id)
            if under is not None and under.trace_state:
                self._metadata["tracestate"] = under.trace_state.to_header()
            self._start_ns = time.time_ns()
            return self
        name = f"route {self._deployment}.{self._method}"
        span = self._span = _start(name, self._parent, under, SpanKind.CLIENT, attributes, ())
        inject(self._metadata, span.get_span_context())
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        span = self._span
        if span is None:  # recorded as fields (__enter__ set _record)
            self._record_fields(exc)
            return
        if _ends_in_error(exc):
            mark_error(span, exc)  # type: ignore[arg-type]
        if self._retries:  # rare: spare the common case two attribute writes
            span.set_attribute("streamwise.retries", self._retries)
            span.set_attribute("streamwise.backoff_s", self._backoff_s)
        span.end()

    def _record_fields(self, exc: BaseException | None) -> None:
        end_ns = time.time_ns()
        attributes = self._attributes
        if self._retries:
            attributes["streamwise.retries"] = self._retries
            attributes["streamwise.backoff_s"] = self._backoff_s
        trace_id, span_id, parent_id = self._ids
        name = f"route {self._deployment}.{self._method}"
        error = exc if _ends_in_error(exc) else None
        self._record(name, trace_id, span_id, parent_id, self._start_ns, end_ns, attributes, error)  # type: ignore[misc]


def serve(
    name: str,
    metadata: Mapping[str, str],
    attributes: Callable[[], dict[str, Any]],
    links: list[Link] | None = None,
    *,
    external: bool = False,
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """A server span made current for the request, parented from ``metadata``.

    Yields None when tracing is off or the request is not sampled (the unsampled
    context is still made current, so that nothing under it is sampled either).
    ``external``: the request comes from outside streamwise (the ingress), where one
    without a valid ``traceparent`` starts a trace; inside, a streamwise caller sends
    none only for a request whose new trace it did not sample. A request that is
    cancelled ends its span without an error status; any other exception sets one.
    """
    return _Serve(name, metadata, attributes, links, external) if _enabled else _NO_SPAN


class _Serve:
    """The context manager ``serve`` returns while tracing is on."""

    __slots__ = ("_name", "_metadata", "_attributes", "_links", "_external", "_span", "_token")

    def __init__(
        self,
        name: str,
        metadata: Mapping[str, str],
        attributes: Callable[[], dict[str, Any]],
        links: list[Link] | None,
        external: bool,
    ) -> None:
        self._name = name
        self._metadata = metadata
        self._attributes = attributes
        self._links = links
        self._external = external
        self._span: trace.Span | None = None
        self._token: object = None

    def __enter__(self) -> trace.Span | None:
        parent, parent_span, root = propagation.parse(self._metadata)
        if parent_span is None:
            if not root:  # the caller's span is not sampled: neither is this one
                self._token = otel_context.attach(parent)
                return None
            if not (self._external and _sample_root()):
                self._token = otel_context.attach(_unsampled_context())
                return None
        # start + attach rather than start_as_current_span: the same span, without
        # the SDK's three nested context managers on every request.
        span = _start(self._name, parent, parent_span, SpanKind.SERVER, self._attributes(), self._links or ())
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        span = self._span
        if span is not None and _ends_in_error(exc):
            mark_error(span, exc)  # type: ignore[arg-type]
        otel_context.detach(self._token)  # type: ignore[arg-type]
        if span is not None:
            span.end()


class FrameCounter:
    """Wraps a stream's frame writer to record, per frame (not per item), how many
    items were sent and when the first one left."""

    __slots__ = ("_write", "_span", "_count", "_started")

    def __init__(self, write: Callable[[Any], Awaitable[None]], span: trace.Span) -> None:
        self._write = write
        self._span = span
        self._count = 0
        self._started = time.monotonic()

    async def __call__(self, frame: Any) -> None:
        if frame.count:
            if self._count == 0:
                self._span.add_event(
                    "first_item", {"streamwise.time_to_first_item_s": time.monotonic() - self._started}
                )
            self._count += frame.count
        await self._write(frame)

    def finish(self) -> None:
        self._span.set_attribute("streamwise.items", self._count)


def current_link() -> Link | None:
    """A link to the current span (for batch spans that group many requests)."""
    if not _enabled:
        return None
    ctx = trace.get_current_span().get_span_context()
    return Link(ctx) if ctx.is_valid else None


def start_span(name: str, links: list[Link], attributes: Mapping[str, Any]) -> trace.Span | None:
    """A span linking to others (a batch links every request in it), under the
    current context; None under a request whose new trace is not sampled, where
    nothing is recorded."""
    if not _enabled or _in_unsampled_trace(trace.get_current_span()):
        return None
    return _TRACER.start_span(name, links=links, attributes=dict(attributes))
