"""The ingress's own RPCs: the applications it serves, and whether it is healthy.

``streamwise.ServeAPIService`` (``proto/serve_api.proto``), also served as Ray Serve's
``ray.serve.RayServeAPIService``: the messages are the same on the wire, so a Ray
Serve client's ``ListApplications`` and ``Healthz`` calls work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from streamwise.proto import serve_api_pb2, serve_api_pb2_grpc
from streamwise.streaming._services import Methods

RAY_SERVICE = "ray.serve.RayServeAPIService"
SERVICE = "streamwise.ServeAPIService"


class ServeAPI(serve_api_pb2_grpc.ServeAPIServiceServicer):
    """``app_names()`` lists the served applications; ``draining()`` says the ingress is stopping."""

    def __init__(self, app_names: Callable[[], list[str]], draining: Callable[[], bool]) -> None:
        self._app_names = app_names
        self._draining = draining

    async def ListApplications(self, request: Any, context: grpc.aio.ServicerContext) -> serve_api_pb2.ListApplicationsResponse:
        return serve_api_pb2.ListApplicationsResponse(application_names=self._app_names())

    async def Healthz(self, request: Any, context: grpc.aio.ServicerContext) -> serve_api_pb2.HealthzResponse:
        if self._draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the streamwise ingress is draining")
        return serve_api_pb2.HealthzResponse(message="success")


def add_to_server(servicer: ServeAPI, methods: Methods) -> None:
    """Serve ``servicer`` under streamwise's service name and Ray Serve's."""
    methods.add_servicer(serve_api_pb2_grpc.add_ServeAPIServiceServicer_to_server, servicer)
    messages = {
        "ListApplications": (serve_api_pb2.ListApplicationsRequest, serve_api_pb2.ListApplicationsResponse),
        "Healthz": (serve_api_pb2.HealthzRequest, serve_api_pb2.HealthzResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in messages.items()
    }
    methods.add(RAY_SERVICE, handlers)
