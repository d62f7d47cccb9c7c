"""The ingress's own RPCs: ListApplications and Healthz, under streamwise's and Ray Serve's names."""

from __future__ import annotations

import grpc
import ray_serve_api_pb2
import ray_serve_api_pb2_grpc

import streamwise
from streamwise.proto import serve_api_pb2, serve_api_pb2_grpc


@streamwise.deployment
class Echo:
    async def __call__(self, inputs: dict) -> bytes:
        return inputs["x"]


def _serve_two(serve) -> str:
    options = streamwise.GrpcOptions(port=0, host="127.0.0.1")
    serve(Echo.bind(), name="first", grpc_options=options)
    serve(Echo.bind(), name="second", grpc_options=options)
    return streamwise.ingress_address()


def test_list_applications_and_healthz(serve):
    """ListApplications names every app served; Healthz answers success."""
    address = _serve_two(serve)
    with grpc.insecure_channel(address) as channel:
        stub = serve_api_pb2_grpc.ServeAPIServiceStub(channel)
        listed = stub.ListApplications(serve_api_pb2.ListApplicationsRequest(), timeout=10)
        assert sorted(listed.application_names) == ["first", "second"]
        assert stub.Healthz(serve_api_pb2.HealthzRequest(), timeout=10).message == "success"


def test_a_ray_serve_client_works_unchanged(serve):
    """A client generated from Ray Serve's own service definition gets the same answers."""
    address = _serve_two(serve)
    with grpc.insecure_channel(address) as channel:
        stub = ray_serve_api_pb2_grpc.RayServeAPIServiceStub(channel)
        listed = stub.ListApplications(ray_serve_api_pb2.ListApplicationsRequest(), timeout=10)
        assert sorted(listed.application_names) == ["first", "second"]
        assert stub.Healthz(ray_serve_api_pb2.HealthzRequest(), timeout=10).message == "success"
