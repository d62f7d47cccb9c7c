"""The batch span: one span per batch, linking the span of every request in it.

A batch serves many requests, so its span links each request's span (callers that
join a continuous batch later are linked as they join). When every request of the
batch belongs to one trace, or the batch has one request (whose trace, if not
sampled, may have no ids), the span sits in that trace (under its first request),
and a request that is not sampled gets none; when the requests come from several
traces it starts a trace of its own. While the batch runs its span is
current in the runner task, so spans the user's function makes are its children.
Nothing happens unless tracing is set up in this process.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace

from streamwise.tracing import spans

if TYPE_CHECKING:
    from streamwise.batching._queue import Entry, Taken
    from streamwise.batching.stats import BatchStats


def _link(entry: Entry) -> trace.Link | None:
    return entry.context.run(spans.current_link)


def open_span(name: str, taken: Taken) -> trace.Span | None:
    """Start the batch's span and make it current for the rest of this task."""
    if not spans.enabled():
        return None
    links = [link for link in map(_link, taken.entries) if link is not None]
    attributes = {
        "streamwise.batch.function": name,
        "streamwise.batch.size": len(taken.entries),
        "streamwise.batch.wait_s": taken.wait_s,
        "streamwise.batch.queue_length": taken.queue_length,
        "streamwise.multiplexed_model_id": taken.model_id,
    }
    entries = taken.entries
    if len(entries) == 1 or (entries and len({link.context.trace_id for link in links}) == 1 and len(links) == len(entries)):
        parent = entries[0].context  # one trace (or one request, whose trace may have no ids): stay in it
    else:
        parent = contextvars.Context()  # several traces: no request's child
    span = parent.run(spans.start_span, f"batch {name}", links, attributes)
    if span is not None:
        otel_context.attach(trace.set_span_in_context(span))
    return span


def joined(span: trace.Span | None, entries: list[Entry]) -> None:
    if span is not None:
        for link in map(_link, entries):
            if link is not None:
                span.add_link(link.context, link.attributes)


def close_span(span: trace.Span | None, stats: BatchStats, error: BaseException | None) -> None:
    if span is None:
        return
    span.set_attribute("streamwise.batch.steps", stats.steps)
    span.set_attribute("streamwise.batch.joined", stats.joined)
    if isinstance(error, Exception):  # cancellation is not a failure
        spans.mark_error(span, error)
    span.end()
