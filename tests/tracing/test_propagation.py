"""W3C trace context read from request metadata: the same result as the SDK's propagator."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streamwise.tracing import propagation, spans

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

CASES = {
    "none": {},
    "sampled": {"traceparent": VALID},
    "not sampled": {"traceparent": VALID[:-2] + "00"},
    "not sampled, other flags": {"traceparent": VALID[:-2] + "02"},
    "not sampled, zero span id": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-00"},
    "with tracestate": {"traceparent": VALID, "tracestate": "vendor=abc,other=1"},
    "upper-case hex": {"traceparent": VALID.upper()},
    "zero trace id": {"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"},
    "zero span id": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01"},
    "future version": {"traceparent": "01" + VALID[2:] + "-extra"},
    "version ff": {"traceparent": "ff" + VALID[2:]},
    "too short": {"traceparent": VALID[:-1]},
    "sign in hex": {"traceparent": "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    "garbage": {"traceparent": "not a trace context"},
}


def _described(context) -> tuple:
    span_context = trace.get_current_span(context).get_span_context()
    return (
        span_context.trace_id,
        span_context.span_id,
        int(span_context.trace_flags),
        span_context.is_remote,
        span_context.trace_state.to_header() if span_context.trace_state else "",
    )


@pytest.mark.parametrize("case", list(CASES))
def test_extract_matches_the_sdk(case):
    metadata = CASES[case]
    assert _described(propagation.extract(metadata)) == _described(TraceContextTextMapPropagator().extract(metadata))


def test_inject_round_trips():
    metadata = CASES["with tracestate"]
    context = propagation.extract(metadata)
    out: dict[str, str] = {}
    propagation.inject(out, trace.get_current_span(context).get_span_context())
    assert out == metadata


def test_unsampled_caller_is_passed_on_as_it_came():
    """A call made while serving an unsampled request carries the caller's traceparent on."""
    header = VALID[:-2] + "00"
    spans.set_enabled(True, sampling_ratio=1.0)
    try:
        token = otel_context.attach(propagation.extract({"traceparent": header}))
        try:
            out: dict[str, str] = {}
            with spans.route("Downstream", "method", out, None) as route:
                route.chose("Downstream#1")  # nothing recorded, nothing raised
        finally:
            otel_context.detach(token)
    finally:
        spans.set_enabled(False)
    assert out == {"traceparent": header}


def test_unsampled_root_is_passed_on_to_every_call_under_it():
    """A request that starts an unsampled trace hands one traceparent, flagged not
    sampled, to every call made while serving it, and is current as a valid span."""
    spans.set_enabled(True, sampling_ratio=0.0)
    try:
        with spans.serve("Ingress/Method", {}, dict) as span:
            assert span is None
            current = trace.get_current_span().get_span_context()
            sent = []
            for _ in range(2):
                out: dict[str, str] = {}
                with spans.route("Downstream", "method", out, None):
                    pass
                sent.append(out)
    finally:
        spans.set_enabled(False)
    assert current.is_valid and not current.trace_flags.sampled and not current.is_remote
    assert sent[0] == sent[1] == {"traceparent": f"00-{current.trace_id:032x}-{current.span_id:016x}-00"}
    assert _described(propagation.extract(sent[0]))[:3] == (current.trace_id, current.span_id, 0)
