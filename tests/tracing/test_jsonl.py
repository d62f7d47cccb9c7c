"""When the JSON-lines processor writes: a server span at once, with what ended before it;
other spans within delay_s, when many are waiting, or at once on a thread without a loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from streamwise.tracing import propagation, setup, spans, viewer
from streamwise.tracing.recorder import SCOPE, Provider
from streamwise.tracing.setup import JsonLinesProcessor, span_line, span_record


def _names(path) -> list[str]:
    return [span.name for span in viewer.load(path)]


DELAY_S = 0.05


def test_server_span_writes_what_ended_before_it(tmp_path):
    """A server span is written as it ends, after every span that ended before it; others wait."""
    processor = JsonLinesProcessor(str(tmp_path), "svc", delay_s=3600)  # only the server span writes
    tracer = Provider(processor).get_tracer(SCOPE)

    async def main() -> list[list[str]]:
        seen = []
        tracer.start_span("route", kind=SpanKind.CLIENT).end()
        await asyncio.sleep(0)
        seen.append(_names(tmp_path))  # waits
        tracer.start_span("request", kind=SpanKind.SERVER).end()
        seen.append(_names(tmp_path))  # written with the route span, in order
        tracer.start_span("later", kind=SpanKind.INTERNAL).end()
        await asyncio.sleep(0)
        seen.append(_names(tmp_path))  # waits
        return seen

    try:
        written = ["route", "request"]
        assert asyncio.run(main()) == [[], written, written]
    finally:
        processor.shutdown()


def test_other_spans_are_written_once_the_delay_is_over(tmp_path):
    """A span that is not a server span reaches the file once delay_s has passed."""
    processor = JsonLinesProcessor(str(tmp_path), "svc", delay_s=DELAY_S)
    tracer = Provider(processor).get_tracer(SCOPE)

    async def main() -> list[str]:
        tracer.start_span("route", kind=SpanKind.CLIENT).end()
        await asyncio.sleep(4 * DELAY_S)  # the write is due first: the loop runs it before this wakes
        return _names(tmp_path)

    try:
        assert asyncio.run(main()) == ["route"]
    finally:
        processor.shutdown()


def test_without_durable_server_spans_wait_too(tmp_path):
    """Without durable (the driver), a server span waits like any other."""
    processor = JsonLinesProcessor(str(tmp_path), "driver", durable=False, delay_s=DELAY_S)
    tracer = Provider(processor).get_tracer(SCOPE)

    async def main() -> list[list[str]]:
        tracer.start_span("ingress", kind=SpanKind.SERVER).end()
        seen = [_names(tmp_path)]
        await asyncio.sleep(4 * DELAY_S)
        return [*seen, _names(tmp_path)]

    try:
        assert asyncio.run(main()) == [[], ["ingress"]]
    finally:
        processor.shutdown()


def test_many_waiting_spans_are_written_at_once(tmp_path):
    """When MAX_PENDING spans are waiting they are written without waiting for the delay."""
    processor = JsonLinesProcessor(str(tmp_path), "driver", durable=False, delay_s=3600)
    tracer = Provider(processor).get_tracer(SCOPE)

    async def main() -> int:
        for _ in range(JsonLinesProcessor.MAX_PENDING + 1):
            tracer.start_span("route", kind=SpanKind.CLIENT).end()
        return len(_names(tmp_path))

    try:
        assert asyncio.run(main()) == JsonLinesProcessor.MAX_PENDING  # the last one still waits
    finally:
        processor.shutdown()


def test_spans_on_a_thread_without_loop_are_written_at_once(tmp_path):
    """A span that ends on a thread without a running loop is written at once."""
    processor = JsonLinesProcessor(str(tmp_path), "svc")
    tracer = Provider(processor).get_tracer(SCOPE)
    thread = threading.Thread(target=lambda: tracer.start_span("in a thread").end())
    thread.start()
    thread.join()
    try:
        assert _names(tmp_path) == ["in a thread"]
    finally:
        processor.shutdown()


def test_shutdown_writes_what_is_pending(tmp_path):
    """shutdown() writes what is pending; a span ending after it is dropped quietly."""
    processor = JsonLinesProcessor(str(tmp_path), "svc")
    tracer = Provider(processor).get_tracer(SCOPE)

    async def main() -> None:
        tracer.start_span("pending", kind=SpanKind.CLIENT).end()
        processor.shutdown()  # before the turn ends
        tracer.start_span("after shutdown").end()  # dropped, nothing raised

    asyncio.run(main())
    assert _names(tmp_path) == ["pending"]


def test_a_forked_child_writes_its_own_file(tmp_path):
    """Spans pending at fork are the parent's alone; the child's go to a file of its own."""
    processor = JsonLinesProcessor(str(tmp_path), "svc")
    tracer = Provider(processor).get_tracer(SCOPE)

    async def main() -> int:
        tracer.start_span("parent's", kind=SpanKind.CLIENT).end()  # pending for a while
        pid = os.fork()
        if pid == 0:  # the child: one span of its own, then gone
            try:
                tracer.start_span("child's", kind=SpanKind.SERVER).end()
                processor.shutdown()
            finally:
                os._exit(0)
        return pid

    try:
        child = asyncio.run(main())
        assert os.waitpid(child, 0)[1] == 0
    finally:
        processor.shutdown()
    files = {path.name: _names(path) for path in tmp_path.iterdir()}
    assert files == {f"svc-{os.getpid()}.jsonl": ["parent's"], f"svc-{child}.jsonl": ["child's"]}


def test_span_line_is_the_span_record_as_json():
    """span_line, the fast path for streamwise's spans, writes what span_record describes."""
    ended = []

    class Keep(SpanProcessor):
        def on_end(self, span):
            ended.append(span)

    tracer = Provider(Keep()).get_tracer(SCOPE)
    root = tracer.start_span('a "quoted" \u00e9 name', kind=SpanKind.SERVER, attributes={"n": 1, "ok": True})
    child = tracer.start_span("child", context=trace.set_span_in_context(root))
    child.set_attribute("cleaned", [1, 2])  # not a plain value: bounded as the SDK does
    child.set_status(Status(StatusCode.ERROR, "ValueError"))
    child.end()
    root.set_status(StatusCode.OK)
    root.end()
    with_event = tracer.start_span("with event")  # events and links take the general path
    with_event.add_event("first_item", {"s": 0.5})
    with_event.end()

    assert len(ended) == 3
    for span in ended:
        assert orjson.loads(span_line(span)) == orjson.loads(orjson.dumps(span_record(span), default=str))
        assert span_line(span).endswith(b"}\n")


def _routes(directory, record: bool) -> list[dict]:
    """Sampled route spans (chosen, retried, failed, cancelled, under a caller with
    tracestate, a root), written to ``directory``; each record also gets the
    ``traceparent`` its call carried, under "sent"."""
    switch = setup._Switch()
    switch.tracer = Provider(switch).get_tracer(SCOPE)
    switch.processors = [JsonLinesProcessor(str(directory), "driver", durable=False)]
    spans.set_enabled(True, 1.0, switch.tracer.start_sampled, switch.record_route if record else None)
    caller = propagation.extract({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    with_state = propagation.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01", "tracestate": "vendor=1"}
    )
    sent: list[dict[str, str]] = [{} for _ in range(6)]
    try:
        with spans.route("A", "ok", sent[0], caller) as route:
            route.chose("A#1")
        with spans.route("A", "retried", sent[1], caller) as route:
            route.retried(0.25)
            route.chose("A#2")
        with contextlib.suppress(ValueError), spans.route("A", "failed", sent[2], caller):
            raise ValueError("boom")
        with contextlib.suppress(asyncio.CancelledError), spans.route("A", "cancelled", sent[3], caller):
            raise asyncio.CancelledError
        with spans.route("A", "traced elsewhere", sent[4], with_state):
            pass
        with spans.route("A", "root", sent[5], otel_context.Context()):
            pass
    finally:
        spans.set_enabled(False)
        switch.shutdown()
    records = [span.record for span in viewer.load(directory)]
    for record, metadata in zip(records, sent, strict=True):
        assert metadata["traceparent"] == f"00-{record['trace_id']}-{record['span_id']}-01"
        record["sent"] = {**metadata, "traceparent": metadata["traceparent"][:35]}  # without the span id
        for event in record["events"]:
            assert record["start_ns"] <= event.pop("time_ns") <= record["end_ns"]
        del record["span_id"], record["start_ns"], record["end_ns"], record["resource"]["service.instance.id"]
        if record["parent_id"] is None:  # a new trace: its id is new too
            del record["trace_id"], record["sent"]["traceparent"]
    return records


def test_route_spans_written_from_fields_are_the_spans_they_stand_for(tmp_path):
    """A route span the JSON-lines exporter writes from its fields is the line its span would give."""
    from_fields = _routes(tmp_path / "fields", record=True)
    from_spans = _routes(tmp_path / "spans", record=False)
    assert [r["attributes"].get("streamwise.retries") for r in from_fields] == [None, 1, None, None, None, None]
    assert [r["status"] for r in from_fields] == ["UNSET", "UNSET", "ERROR", "UNSET", "UNSET", "UNSET"]
    assert from_fields[4]["sent"]["tracestate"] == "vendor=1"
    assert from_fields == from_spans


def test_route_fields_become_a_span_once_another_processor_is_installed(tmp_path):
    """A route started while only JSON lines were exported, that ends after another processor
    was installed, reaches that processor as a span."""
    ended = []

    class Keep(SpanProcessor):
        def on_end(self, span):
            ended.append(span)

    switch = setup._Switch()
    switch.tracer = Provider(switch).get_tracer(SCOPE)
    switch.processors = [JsonLinesProcessor(str(tmp_path), "driver", durable=False)]
    spans.set_enabled(True, 1.0, switch.tracer.start_sampled, switch.record_route)
    metadata: dict[str, str] = {}
    try:
        with spans.route("A", "ok", metadata, otel_context.Context()) as route:
            route.chose("A#1")
            switch.shutdown()
            switch.processors = [Keep()]  # as a new configure() with another exporter does
            spans.set_enabled(True, 1.0, switch.tracer.start_sampled, None)
    finally:
        spans.set_enabled(False)
        switch.shutdown()
    assert [(span.name, span.attributes["streamwise.replica_id"]) for span in ended] == [("route A.ok", "A#1")]
    assert metadata["traceparent"] == f"00-{ended[0].context.trace_id:032x}-{ended[0].context.span_id:016x}-01"
