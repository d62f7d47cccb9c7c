"""The spans streamwise makes, through the OpenTelemetry API only.

Library code calls these helpers; they do nothing (and cost next to nothing) until
:mod:`streamwise.tracing.setup` configured tracing in this process. Trace context
crosses processes in each request's metadata map as W3C ``traceparent`` /
``tracestate``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

_TRACER = trace.get_tracer("streamwise")
_enabled = False


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def capture() -> otel_context.Context | None:
    """The caller's trace context, to parent spans made later on another thread."""
    return otel_context.get_current() if _enabled else None


def extract(metadata: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(metadata)


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
    __slots__ = ()

    def chose(self, replica_id: str) -> None:
        pass

    def retried(self, backoff_s: float) -> None:
        pass


_NO_ROUTE = _NoRoute()


@contextlib.contextmanager
def route(
    deployment: str, method: str, metadata: MutableMapping[str, str], parent: otel_context.Context | None
) -> Iterator[RouteSpan | _NoRoute]:
    """A client span around routing one call; its context goes into ``metadata``."""
    if not _enabled:
        yield _NO_ROUTE
        return
    span = _TRACER.start_span(
        f"route {deployment}.{method}",
        context=parent,
        kind=SpanKind.CLIENT,
        attributes={"streamwise.deployment": deployment, "streamwise.method": method},
    )
    record = RouteSpan(span)
    propagate.inject(metadata, context=trace.set_span_in_context(span, parent))
    try:
        yield record
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit | _cancelled()):
            mark_error(span, exc)
        raise
    finally:
        span.set_attribute("streamwise.retries", record.retries)
        span.set_attribute("streamwise.backoff_s", record.backoff_s)
        span.end()


def _cancelled() -> type[BaseException]:
    import asyncio

    return asyncio.CancelledError


@contextlib.contextmanager
def serve(
    name: str, metadata: Mapping[str, str], attributes: Mapping[str, Any], links: list[Link] | None = None
) -> Iterator[trace.Span | None]:
    """A server span made current for the request, parented from ``metadata``."""
    if not _enabled:
        yield None
        return
    with _TRACER.start_as_current_span(
        name,
        context=propagate.extract(metadata),
        kind=SpanKind.SERVER,
        attributes=dict(attributes),
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            if not isinstance(exc, _cancelled() | GeneratorExit):
                mark_error(span, exc)
            raise


async def counted(items: AsyncIterator[Any], span: trace.Span | None) -> AsyncIterator[Any]:
    """Pass ``items`` through, recording how many were yielded and when the first was."""
    if span is None:
        async for item in items:
            yield item
        return
    count = 0
    started = time.monotonic()
    try:
        async for item in items:
            if count == 0:
                span.add_event(
                    "first_item", {"streamwise.time_to_first_item_s": time.monotonic() - started}
                )
            count += 1
            yield item
    finally:
        span.set_attribute("streamwise.items", count)
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


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
