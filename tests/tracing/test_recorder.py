"""streamwise's own spans against the SDK's: the same operations give the same spans."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from streamwise.tracing.recorder import SCOPE, Provider, RecordingSpan


def _exercise(tracer: trace.Tracer) -> None:
    root = tracer.start_span("root", kind=SpanKind.SERVER, attributes={"a": 1, "b": "two", "c": True})
    ctx = trace.set_span_in_context(root)
    child = tracer.start_span("child", context=ctx, links=[Link(root.get_span_context())])
    child.set_attribute("plain", 1.5)
    child.set_attribute("list", [1, 2, 3])  # cleaned to a tuple
    child.set_attribute("bad", object())  # dropped, as the SDK does
    child.set_attributes({"x": "y"})
    child.add_event("first_item", {"n": 1})
    child.record_exception(ValueError("boom"))
    child.set_status(Status(StatusCode.ERROR, "ValueError"))
    child.set_status(StatusCode.UNSET)  # never replaces anything
    child.update_name("child renamed")
    child.end()
    child.set_attribute("late", 1)  # after end: ignored
    root.set_status(StatusCode.OK)
    root.set_status(StatusCode.ERROR)  # OK is final
    root.end()
    with tracer.start_as_current_span("current") as current:
        assert trace.get_current_span() is current


def _describe(span) -> dict:
    return {
        "name": span.name,
        "kind": span.kind,
        "attributes": dict(span.attributes),
        "events": [(e.name, {k: v for k, v in e.attributes.items() if k != "exception.stacktrace"}) for e in span.events],
        "links": len(span.links),
        "status": (span.status.status_code, span.status.description),
        "has_parent": span.parent is not None,
        "sampled": span.context.trace_flags.sampled,
        "scope": span.instrumentation_scope.name,
        "resource": dict(span.resource.attributes),
    }


def _spans(provider: TracerProvider, scope: str) -> list[dict]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _exercise(provider.get_tracer(scope))
    return [_describe(span) for span in exporter.get_finished_spans()]


def test_streamwise_spans_match_sdk_spans():
    exporter = InMemorySpanExporter()
    ours = Provider(SimpleSpanProcessor(exporter))
    _exercise(ours.get_tracer(SCOPE))
    got = exporter.get_finished_spans()
    assert all(isinstance(span, RecordingSpan) for span in got)
    want = _spans(TracerProvider(), SCOPE)
    assert [_describe(span) for span in got] == want


def test_other_scopes_get_the_sdk_tracer():
    provider = Provider(SimpleSpanProcessor(InMemorySpanExporter()))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("user.code").start_as_current_span("mine"):
        pass
    (span,) = exporter.get_finished_spans()
    assert not isinstance(span, RecordingSpan) and span.name == "mine"


def test_start_sampled_makes_the_span_start_span_makes():
    """A span whose sampling was decided by the caller matches the sampler's span."""
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = Provider(processor)
    tracer = provider.get_tracer(SCOPE)
    parent = trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        trace_state=trace.TraceState([("vendor", "value")]),
    )
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    for start in (
        lambda: tracer.start_span("child", context=context, kind=SpanKind.SERVER, attributes={"a": 1}),
        lambda: tracer.start_sampled("child", context, parent, SpanKind.SERVER, {"a": 1}),
    ):
        start().end()
    root = tracer.start_sampled("root", trace.set_span_in_context(trace.INVALID_SPAN), None, SpanKind.CLIENT, {})
    root.end()
    by_sampler, decided, root = exporter.get_finished_spans()
    assert _describe(decided) == _describe(by_sampler)
    for span in (by_sampler, decided):
        assert span.context.trace_id == parent.trace_id and span.parent == parent
        assert span.context.trace_state == parent.trace_state and span.context.trace_flags.sampled
    assert decided.context.span_id != by_sampler.context.span_id
    assert root.parent is None and root.context.trace_id not in (0, parent.trace_id) and root.context.trace_flags.sampled
