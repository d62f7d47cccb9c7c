"""W3C trace context read from request metadata: the same result as the SDK's propagator."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streamwise.tracing import propagation, sampling, spans

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


def test_unsampled_new_trace_sends_nothing_and_samples_nothing_under_it():
    """A request that starts a trace which is not sampled gets no ids: the calls made
    while serving it carry no traceparent, and the installed sampler starts no span
    under it, though it samples every new trace elsewhere."""
    sampler = sampling.sampler(1.0)
    spans.set_enabled(True, sampling_ratio=0.0)
    try:
        with spans.serve("Ingress/Method", {}, dict, external=True) as span:
            current = trace.get_current_span()
            sent = []
            for _ in range(2):
                out: dict[str, str] = {}
                with spans.route("Downstream", "method", out, None):
                    pass
                sent.append(out)
            under = sampler.should_sample(otel_context.get_current(), 1, "user-work").decision
    finally:
        spans.set_enabled(False)
    assert span is None and current is propagation.UNSAMPLED and not current.get_span_context().is_valid
    assert sent == [{}, {}]
    assert under is Decision.DROP
    assert sampler.should_sample(otel_context.get_current(), 1, "user-work").decision is Decision.RECORD_AND_SAMPLE


def test_only_the_ingress_starts_a_trace_for_a_request_without_traceparent():
    """A replica takes a call without traceparent as one its caller did not sample,
    whatever the ratio; the ingress, serving a request from outside, samples it."""
    spans.set_enabled(True, sampling_ratio=1.0)
    try:
        with spans.serve("Replica.method", {}, dict) as in_replica:
            current = trace.get_current_span()
        with spans.serve("Ingress/Method", {}, dict, external=True) as in_ingress:
            pass
    finally:
        spans.set_enabled(False)
    assert in_replica is None and current is propagation.UNSAMPLED
    assert in_ingress is not None


def test_pause_keeps_the_configuration():
    """Paused, the helpers do what they do with tracing off; resumed, what they did."""
    spans.set_enabled(True, sampling_ratio=1.0)
    try:
        sent = []
        for paused in (True, False):
            spans.pause(paused)
            out: dict[str, str] = {}
            with spans.route("Downstream", "method", out, otel_context.Context()):
                pass
            sent.append(out)
    finally:
        spans.set_enabled(False)
    spans.pause(False)
    assert sent[0] == {} and list(sent[1]) == ["traceparent"]
    assert not spans.enabled()  # resuming does not turn on what is not configured


_FOREIGN_PROVIDER = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import streamwise
from streamwise.tracing import setup, spans

exporter = InMemorySpanExporter()
provider = TracerProvider()  # its default sampler: parent-based, new traces always
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
setup.configure(streamwise.TracingConfig(sampling_ratio=0.0, exporter="console"), "replica", replica=True)
with spans.serve("Replica.method", {}, dict) as span:
    with trace.get_tracer("user").start_as_current_span("user-work"):
        pass
    out = {}
    with spans.route("Downstream", "method", out, None):
        pass
setup.shutdown()
print(span, len(exporter.get_finished_spans()), out)
"""


def test_unsampled_request_under_a_provider_installed_before_streamwise():
    """A process that had a tracer provider keeps its sampler, which does not know
    UNSAMPLED: an unsampled request still drops the spans user code starts in it,
    and still sends nothing downstream."""
    done = subprocess.run([sys.executable, "-c", _FOREIGN_PROVIDER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "0", "{}"]
