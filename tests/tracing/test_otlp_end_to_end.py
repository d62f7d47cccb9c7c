"""End to end: spans of client -> ingress -> A -> B (with a batch) reach a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import streamwise
from streamwise.proto import predict_pb2, predict_pb2_grpc


@streamwise.deployment(max_ongoing_requests=8)
class Back:
    async def words(self, text: str):
        for word in text.split():
            yield word

    @streamwise.batch(max_batch_size=2, batch_wait_timeout_s=3600)
    async def lengths(self, words: list[str]) -> list[int]:
        return [len(w) for w in words]


@streamwise.deployment
class Front:
    def __init__(self, back):
        self.back = back

    async def __call__(self, inputs: dict) -> bytes:
        words = [w async for w in self.back.words.remote(inputs["text"].decode())]
        # Two concurrent calls fill one batch of two (the size trigger; the timeout is huge).
        lengths = await asyncio.gather(*(self.back.lengths.remote(w) for w in words))
        return "-".join(f"{w}{n}" for w, n in zip(words, lengths, strict=True)).encode()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "proxy"])
def test_spans_reach_otlp_receiver_in_one_trace(serve, otlp_receiver, direct):
    """Every hop's span arrives over OTLP/gRPC under the client's trace id, correctly
    parented; the external call's span is made where it was accepted (the root
    replica on the direct path, the driver's ingress on the proxy path)."""
    receiver, port = otlp_receiver, otlp_receiver.port
    serve(
        Front.bind(Back.bind()),
        grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1", direct=direct),
        tracing=streamwise.TracingConfig(exporter="otlp", otlp_endpoint=f"127.0.0.1:{port}"),
    )
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async def call():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
            return await stub.Predict(
                predict_pb2.PredictRequest(input={"text": b"a bb"}),
                metadata=(("traceparent", f"00-{trace_id}-{client_span}-01"),),
            )

    assert asyncio.run(call()).prediction == b"a1-bb2"
    streamwise.shutdown()  # every process flushes its spans at graceful shutdown

    assert {span.trace_id.hex() for _, span in receiver.spans} == {trace_id}
    batch = [span for _, span in receiver.spans if span.name == "batch Back.lengths"]
    batched = [span for _, span in receiver.spans if span.name == "Back.lengths"]
    # One batch span serves both requests: it links each of them, and (both being of
    # this trace) sits in the trace under one of them.
    assert len(batch) == 1 and len(batched) == 2
    assert {link.span_id.hex() for link in batch[0].links} == {span.span_id.hex() for span in batched}
    assert batch[0].parent_span_id.hex() in {span.span_id.hex() for span in batched}
    assert [attr.value.int_value for attr in batch[0].attributes if attr.key == "streamwise.batch.size"] == [2]
    spans = {span.name: (service, span) for service, span in receiver.spans}
    by_id = {span.span_id.hex(): name for name, (_, span) in spans.items()}

    def parent(name):
        return by_id.get(spans[name][1].parent_span_id.hex())

    ingress_service, ingress = spans["streamwise.PredictAPIsService/Predict"]
    assert ingress.parent_span_id.hex() == client_span
    assert ingress_service == ("Front" if direct else "driver")
    assert parent("route Front.Predict") == "streamwise.PredictAPIsService/Predict"
    assert parent("Front.Predict") == "route Front.Predict"
    assert parent("route Back.words") == "Front.Predict"
    assert parent("Back.words") == "route Back.words"
    services = {service for service, _ in spans.values()}
    assert {"Front", "Back"} <= services
