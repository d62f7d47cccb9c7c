"""Traces across processes: real replicas, spans read back from the exporters."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import streamwise
from streamwise.proto import predict_pb2, predict_pb2_grpc
from streamwise.tracing import viewer

_MEMORY: list[InMemorySpanExporter] = []


def memory_processors():
    """Span processors for TracingConfig(exporter=...): in-memory, one exporter per process."""
    if not _MEMORY:
        _MEMORY.append(InMemorySpanExporter())
    _MEMORY[0].clear()
    return [SimpleSpanProcessor(_MEMORY[0])]


@streamwise.deployment
class Tokenizer:
    async def stream(self, text: str):
        for word in text.split():
            yield word

    async def boom(self):
        raise ValueError("bad input")

    async def stream_then_fail(self):
        yield "a"
        raise ValueError("broke mid-stream")

    async def pid(self) -> int:
        return os.getpid()


@streamwise.deployment
class Model:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    async def generate(self, prompt: str):
        with trace.get_tracer("user").start_as_current_span("user-work"):
            async for word in self.tokenizer.stream.remote(prompt):
                yield word.upper()

    async def fail(self):
        return await self.tokenizer.boom.remote()

    async def pid_after_work(self) -> int:
        with trace.get_tracer("user").start_as_current_span("user-work"):
            await self.tokenizer.pid.remote()
        return os.getpid()

    async def endless(self):
        while True:
            yield 1
            await asyncio.sleep(0.001)

    async def __call__(self, inputs: dict) -> bytes:
        words = [w async for w in self.tokenizer.stream.remote(inputs["text"].decode())]
        return " ".join(words).encode()


def _jsonl(tmp_path, **kw):
    return streamwise.TracingConfig(exporter="jsonl", jsonl_dir=str(tmp_path), **kw)


def _predict(traceparent: str | None) -> bytes:
    """Predict through the ingress, as an external gRPC client sending ``traceparent`` (if any)."""

    async def main():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
            return await stub.Predict(
                predict_pb2.PredictRequest(input={"text": b"p q"}),
                metadata=(("traceparent", traceparent),) if traceparent else (),
            )

    return asyncio.run(main()).prediction


def _by_name(spans):
    out = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def test_driver_spans_in_memory(serve):
    """A handle call made under a user span records a route span (child) with the replica."""
    handle = serve(Tokenizer.bind(), tracing=streamwise.TracingConfig(exporter=memory_processors))
    with trace.get_tracer("test").start_as_current_span("client") as client:
        assert list(handle.stream.remote("a b")) == ["a", "b"]
    finished = {s.name: s for s in _MEMORY[0].get_finished_spans()}
    route = finished["route Tokenizer.stream"]
    assert route.parent.span_id == client.get_span_context().span_id
    assert route.attributes["streamwise.replica_id"].startswith("Tokenizer#")
    assert route.kind == trace.SpanKind.CLIENT


def test_one_trace_across_processes(serve, tmp_path):
    """Driver -> Model -> Tokenizer spans share one trace id with correct parent links."""
    handle = serve(Model.bind(Tokenizer.bind()), tracing=_jsonl(tmp_path))
    with trace.get_tracer("test").start_as_current_span("client"):
        assert list(handle.generate.remote("x y z")) == ["X", "Y", "Z"]
    streamwise.shutdown()  # flushes every process
    spans = viewer.load(tmp_path)
    by_name = _by_name(spans)
    assert len({s.trace_id for s in spans}) == 1
    ids = {s.span_id: s for s in spans}

    def parent(name):
        return ids[by_name[name][0].parent_id].name

    assert parent("route Model.generate") == "client"
    assert parent("Model.generate") == "route Model.generate"
    assert parent("user-work") == "Model.generate"
    assert parent("route Tokenizer.stream") == "user-work"
    assert parent("Tokenizer.stream") == "route Tokenizer.stream"
    replica = by_name["Tokenizer.stream"][0]
    assert replica.service == "Tokenizer"
    assert replica.record["attributes"]["streamwise.items"] == 3
    assert replica.record["attributes"]["streamwise.streaming"] is True
    assert [e["name"] for e in replica.record["events"]] == ["first_item"]


def test_errors_set_status_cancellation_does_not(serve, tmp_path):
    """A user exception marks spans ERROR with its type; a cancelled stream is not an error."""
    handle = serve(Model.bind(Tokenizer.bind()), tracing=_jsonl(tmp_path))
    with pytest.raises(streamwise.exceptions.RemoteError):
        handle.fail.remote().result()
    stream = handle.endless.remote()
    next(stream)
    stream.close()
    streamwise.shutdown()
    by_name = _by_name(viewer.load(tmp_path))
    boom = by_name["Tokenizer.boom"][0]
    assert (boom.status, boom.record["status_description"]) == ("ERROR", "ValueError")
    assert by_name["Model.endless"][0].status != "ERROR"


@pytest.mark.both_transports
def test_failed_stream_span_is_complete(serve, tmp_path):
    """A stream's error reaches the caller after its span ended: ERROR, with its items, every time."""
    handle = serve(Tokenizer.bind(), tracing=_jsonl(tmp_path))
    calls = 50  # the race this guards against lost about one span in a few hundred
    for _ in range(calls):
        stream = handle.stream_then_fail.remote()
        assert next(stream) == "a"
        with pytest.raises(streamwise.exceptions.RemoteError, match="broke mid-stream"):
            next(stream)
    streamwise.shutdown()
    replica = [s for s in viewer.load(tmp_path) if s.name == "Tokenizer.stream_then_fail"]
    assert len(replica) == calls
    assert all(s.status == "ERROR" and s.record["attributes"]["streamwise.items"] == 1 for s in replica)


def test_sampling_zero_records_nothing(serve, tmp_path):
    """With sampling_ratio=0 no trace is started, in any process."""
    handle = serve(Model.bind(Tokenizer.bind()), tracing=_jsonl(tmp_path, sampling_ratio=0.0))
    assert list(handle.generate.remote("a")) == ["A"]
    streamwise.shutdown()
    assert viewer.load(tmp_path) == []


def test_sampling_decision_follows_the_trace(serve, tmp_path):
    """At a ratio between 0 and 1 a trace is kept or dropped whole, in every process."""
    handle = serve(Model.bind(Tokenizer.bind()), tracing=_jsonl(tmp_path, sampling_ratio=0.5))
    calls = 40
    for _ in range(calls):
        assert list(handle.generate.remote("a")) == ["A"]
    streamwise.shutdown()
    traces: dict[str, list[str]] = {}
    for span in viewer.load(tmp_path):
        traces.setdefault(span.trace_id, []).append(span.name)
    whole = ["Model.generate", "Tokenizer.stream", "route Model.generate", "route Tokenizer.stream", "user-work"]
    assert all(sorted(names) == whole for names in traces.values()), traces
    assert 0 < len(traces) < calls  # 2**-39 that this fails by chance


def test_ingress_samples_whole_traces_of_requests_without_traceparent(serve, tmp_path):
    """The ingress starts the trace of a client's request that has none; at a ratio
    between 0 and 1 each is kept or dropped whole, in every process."""
    serve(
        Model.bind(Tokenizer.bind()),
        tracing=_jsonl(tmp_path, sampling_ratio=0.5),
        grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"),
    )
    calls = 20
    for _ in range(calls):
        assert _predict(None) == b"p q"
    streamwise.shutdown()
    traces: dict[str, list[str]] = {}
    for span in viewer.load(tmp_path):
        traces.setdefault(span.trace_id, []).append(span.name)
    shapes = {tuple(sorted(names)) for names in traces.values()}
    assert len(shapes) == 1, traces
    assert {"streamwise.PredictAPIsService/Predict", "Model.Predict", "Tokenizer.stream"} <= set(next(iter(shapes)))
    assert 0 < len(traces) < calls  # 2**-19 that this fails by chance


def test_unsampled_client_traceparent_records_nothing(serve, tmp_path):
    """A client's traceparent flagged not sampled is followed by the ingress and every replica."""
    serve(
        Model.bind(Tokenizer.bind()),
        tracing=_jsonl(tmp_path),
        grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"),
    )

    assert _predict("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00") == b"p q"
    streamwise.shutdown()
    assert viewer.load(tmp_path) == []


def test_killed_replica_keeps_completed_spans(serve, tmp_path):
    """Spans of requests a replica completed survive its SIGKILL (written before the reply):
    the request's own span, the user's span in it and the route span of its downstream call."""
    handle = serve(Model.bind(Tokenizer.bind()), tracing=_jsonl(tmp_path))
    pid = handle.pid_after_work.remote().result()
    os.kill(pid, signal.SIGKILL)
    names = {s.name for s in viewer.load(tmp_path) if s.record["resource"]["process.pid"] == pid}
    assert names == {"Model.pid_after_work", "user-work", "route Tokenizer.pid"}


def test_ingress_honors_client_traceparent(serve, tmp_path):
    """An external client's traceparent parents the ingress span; the trace goes on inside."""
    serve(
        Model.bind(Tokenizer.bind()),
        tracing=_jsonl(tmp_path),
        grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"),
    )
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

    assert _predict(f"00-{trace_id}-{parent_id}-01") == b"p q"
    streamwise.shutdown()
    spans = viewer.load(tmp_path)
    ingress = _by_name(spans)["streamwise.PredictAPIsService/Predict"][0]
    assert (ingress.trace_id, ingress.parent_id) == (trace_id, parent_id)
    assert ingress.record["attributes"]["rpc.system"] == "grpc"
    assert ingress.record["attributes"]["rpc.method"] == "Predict"
    assert {s.trace_id for s in spans} == {trace_id}
    assert "Tokenizer.stream" in _by_name(spans)


def test_viewer_waterfall_and_chrome_export(serve, tmp_path):
    """`streamwise trace view` prints the tree; `trace export --format chrome` writes trace events."""
    traces_dir = tmp_path / "traces"
    handle = serve(Model.bind(Tokenizer.bind()), tracing=_jsonl(traces_dir))
    assert list(handle.generate.remote("a b")) == ["A", "B"]
    streamwise.shutdown()
    view = subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "trace", "view", str(traces_dir)],
        capture_output=True, text=True, check=True,
    ).stdout
    lines = view.splitlines()
    assert lines[0].startswith("trace ")
    route = next(line for line in lines if "route Model.generate" in line)
    replica = next(line for line in lines if "Model.generate" in line and "route" not in line)
    assert replica.index("Model.generate") > route.index("route")  # indented under its parent
    assert "Tokenizer" in view and " ms" in view
    trace_id = lines[0].split()[1]
    filtered = subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "trace", "view", str(traces_dir), "--min-duration-ms", "1e9"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "no traces match" in filtered
    out = tmp_path / "chrome.json"
    subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "trace", "export", str(traces_dir), "--trace-id", trace_id,
         "--format", "chrome", "-o", str(out)],
        check=True, capture_output=True,
    )
    events = orjson.loads(out.read_bytes())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert {e["args"]["trace_id"] for e in complete} == {trace_id}
    assert all(e["dur"] >= 0 and "ts" in e for e in complete)
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} >= {"Model", "Tokenizer", "driver"}
