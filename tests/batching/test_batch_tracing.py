"""The batch span: one per batch, linking the span of every request in it."""

from __future__ import annotations

from opentelemetry import trace

import streamwise
from streamwise.tracing import viewer

HUGE_S = 3600.0


@streamwise.deployment(max_ongoing_requests=8)
class Traced:
    @streamwise.batch(max_batch_size=3, batch_wait_timeout_s=HUGE_S)
    async def double(self, items):
        with trace.get_tracer("user").start_as_current_span("model-forward"):
            return [2 * item for item in items]


def test_batch_span_links_every_request(serve, tmp_path):
    """A batch of three calls makes one root span linking the three requests' spans;
    the function's own spans are its children."""
    handle = serve(Traced.bind(), tracing=streamwise.TracingConfig(exporter="jsonl", jsonl_dir=str(tmp_path)))
    responses = [handle.double.remote(i) for i in range(3)]
    assert sorted(r.result(timeout_s=30) for r in responses) == [0, 2, 4]
    streamwise.shutdown()  # flushes every process
    spans = viewer.load(tmp_path)
    (batch,) = [s for s in spans if s.name == "batch Traced.double"]
    requests = [s for s in spans if s.name == "Traced.double"]
    assert len(requests) == 3
    assert batch.parent_id is None
    assert {link["span_id"] for link in batch.record["links"]} == {s.span_id for s in requests}
    assert batch.record["attributes"]["streamwise.batch.size"] == 3
    (forward,) = [s for s in spans if s.name == "model-forward"]
    assert forward.parent_id == batch.span_id


@streamwise.deployment
class OneAtATime:
    @streamwise.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def double(self, items):
        context = trace.get_current_span().get_span_context()
        minted = context.is_valid and not context.trace_flags.sampled  # ids of a trace nobody records
        with trace.get_tracer("user").start_as_current_span("model-forward"):
            return [(2 * item, minted) for item in items]


def test_batch_of_one_request_follows_its_sampling(serve, tmp_path):
    """A batch of one request is in that request's trace, kept or dropped with it: a
    request that is not sampled starts no trace of its own for its batch, nor gets
    ids for one (which calls from the batch would send on)."""
    config = streamwise.TracingConfig(exporter="jsonl", jsonl_dir=str(tmp_path), sampling_ratio=0.5)
    handle = serve(OneAtATime.bind(), tracing=config)
    calls = 20
    assert [handle.double.remote(i).result(timeout_s=30) for i in range(calls)] == [(2 * i, False) for i in range(calls)]
    streamwise.shutdown()
    spans = viewer.load(tmp_path)
    requests = {s.span_id: s for s in spans if s.name == "OneAtATime.double"}
    batches = [s for s in spans if s.name == "batch OneAtATime.double"]
    assert 0 < len(requests) < calls  # 2**-19 that this fails by chance
    assert sorted(b.parent_id for b in batches) == sorted(requests)
    assert all(b.trace_id == requests[b.parent_id].trace_id for b in batches)
    assert len([s for s in spans if s.name == "model-forward"]) == len(batches)
