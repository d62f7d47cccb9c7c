"""A real OTLP/gRPC trace receiver for the tracing tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver built from the OpenTelemetry collector protos."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, Span)
        self.resources: list[dict[str, str]] = []  # the resource attributes of each export
        self._lock = threading.Lock()
        self.port = 0

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                self.resources.append(attrs)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((attrs.get("service.name", "?"), span))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver() -> Iterator[Receiver]:
    """A Receiver serving on 127.0.0.1 (its ``port``) for the test's duration."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(None)


@pytest.fixture
def tls_otlp_receiver(tls_files) -> Iterator[Receiver]:
    """A Receiver serving TLS on localhost with the test CA's server certificate."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    credentials = grpc.ssl_server_credentials([(tls_files.server_key.read_bytes(), tls_files.server_cert.read_bytes())])
    receiver.port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield receiver
    finally:
        server.stop(None)
