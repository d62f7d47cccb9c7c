"""The spans streamwise makes, through the OpenTelemetry API only.

Library code calls these helpers; they do nothing (and cost next to nothing) until
:mod:`streamwise.tracing.setup` configured tracing in this process. Trace context
crosses processes in each request's metadata map as W3C ``traceparent`` /
``tracestate``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

_TRACER = trace.get_tracer("streamwise")
# W3C trace context (traceparent/tracestate) is what crosses every hop, external
# clients' included; the global composite propagator would add a baggage pass per hop.
_W3C = TraceContextTextMapPropagator()
_enabled = False
_ratio = 1.0

# Marks a root span streamwise chose to sample, so the SDK's sampler keeps it (the
# decision is made here, before any SDK work, to keep unsampled requests cheap).
SAMPLED_ROOT = "streamwise.sampled_root"


def set_enabled(enabled: bool, sampling_ratio: float = 1.0) -> None:
    global _enabled, _ratio
    _enabled = enabled
    _ratio = sampling_ratio


def enabled() -> bool:
    return _enabled


def capture() -> otel_context.Context | None:
    """The caller's trace context, to parent spans made later on another thread."""
    return otel_context.get_current() if _enabled else None


def extract(metadata: Mapping[str, str]) -> otel_context.Context:
    return _W3C.extract(metadata)


def _decide(parent: otel_context.Context) -> tuple[bool, bool, otel_context.Context]:
    """(record a span?, is it a root?, the context to go on with when not recording).

    Parent-based: a sampled parent is followed, an unsampled one too. A root is
    sampled with the configured ratio; an unsampled root still gets ids (flagged not
    sampled) so every downstream process agrees without doing SDK work.
    """
    span_context = trace.get_current_span(parent).get_span_context()
    if span_context.is_valid:
        return bool(span_context.trace_flags.sampled), False, parent
    if _ratio >= 1.0 or random.random() < _ratio:
        return True, True, parent
    unsampled = SpanContext(
        trace_id=random.getrandbits(128), span_id=random.getrandbits(64), is_remote=False, trace_flags=TraceFlags(0)
    )
    return False, True, trace.set_span_in_context(NonRecordingSpan(unsampled), parent)


def mark_error(span: trace.Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` as an error (callers skip cancellation)."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class RouteSpan:
    """Records a routing decision on the caller's side of a call."""

    __slots__ = ("span", "retries", "backoff_s")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.retries = 0
        self.backoff_s = 0.0

    def chose(self, replica_id: str) -> None:
        self.span.set_attribute("streamwise.replica_id", replica_id)

    def retried(self, backoff_s: float) -> None:
        self.retries += 1
        self.backoff_s += backoff_s


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


class _NoSpan:
    """A context manager yielding None: ``serve`` when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def route(
    deployment: str, method: str, metadata: MutableMapping[str, str], parent: otel_context.Context | None
) -> contextlib.AbstractContextManager[RouteSpan | _NoRoute]:
    """A client span around routing one call; its context goes into ``metadata``."""
    return _route(deployment, method, metadata, parent) if _enabled else _NO_ROUTE


@contextlib.contextmanager
def _route(
    deployment: str, method: str, metadata: MutableMapping[str, str], parent: otel_context.Context | None
) -> Iterator[RouteSpan | _NoRoute]:
    if parent is None:
        parent = otel_context.get_current()
    record, root, carried = _decide(parent)
    if not record:
        _W3C.inject(metadata, context=carried)
        yield _NO_ROUTE
        return
    attributes: dict[str, Any] = {"streamwise.deployment": deployment, "streamwise.method": method}
    if root:
        attributes[SAMPLED_ROOT] = True
    span = _TRACER.start_span(f"route {deployment}.{method}", context=parent, kind=SpanKind.CLIENT, attributes=attributes)
    record = RouteSpan(span)
    _W3C.inject(metadata, context=trace.set_span_in_context(span, parent))
    try:
        yield record
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit | _cancelled()):
            mark_error(span, exc)
        raise
    finally:
        if record.retries:  # rare: spare the common case two attribute writes
            span.set_attribute("streamwise.retries", record.retries)
            span.set_attribute("streamwise.backoff_s", record.backoff_s)
        span.end()


def _cancelled() -> type[BaseException]:
    import asyncio

    return asyncio.CancelledError


def serve(
    name: str, metadata: Mapping[str, str], attributes: Callable[[], dict[str, Any]], links: list[Link] | None = None
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """A server span made current for the request, parented from ``metadata``.

    Yields None when tracing is off or the request is not sampled (the unsampled
    context is still made current, so downstream calls carry it on).
    """
    return _serve(name, metadata, attributes, links) if _enabled else _NO_SPAN


@contextlib.contextmanager
def _serve(
    name: str, metadata: Mapping[str, str], attributes: Callable[[], dict[str, Any]], links: list[Link] | None
) -> Iterator[trace.Span | None]:
    parent = _W3C.extract(metadata)
    record, root, carried = _decide(parent)
    if not record:
        token = otel_context.attach(carried)
        try:
            yield None
        finally:
            otel_context.detach(token)
        return
    values = attributes()
    if root:
        values[SAMPLED_ROOT] = True
    # start_span + attach rather than start_as_current_span: the same span, without
    # the SDK's three nested context managers on every request.
    span = _TRACER.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=values, links=links)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        if not isinstance(exc, _cancelled() | GeneratorExit):
            mark_error(span, exc)
        raise
    finally:
        otel_context.detach(token)
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
    """A root-less span linking to others (a batch links every request in it)."""
    if not _enabled:
        return None
    return _TRACER.start_span(name, links=links, attributes=dict(attributes))
