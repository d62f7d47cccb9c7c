"""The external gRPC server: each RPC is forwarded, undecoded, to an app's ingress deployment.

The ingress never decodes a client's message: request bytes travel to a replica of the
app's root deployment, which decodes them with the user's generated classes (see
``payload.RpcPayload``); response bytes come back in frames and are written to the
client one message per item. It runs on the driver's core loop, beside the
controller, and is the one place where streamwise errors become gRPC statuses for
external clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import Status, StatusCode

from streamwise import exceptions
from streamwise.config import GrpcOptions
from streamwise.exceptions import UsageError
from streamwise.metrics import recorders
from streamwise.metrics.recorders import IngressRecorder
from streamwise.proto import replica_pb2
from streamwise.routing.handle import open_frames
from streamwise.routing.router import router_for
from streamwise.streaming import _connections, _limits, _wire, serve_api
from streamwise.streaming.payload import pack_messages, unpack_messages
from streamwise.streaming.schema import RpcMethod, rpc_table, service_names
from streamwise.tracing import spans

_REGISTERED = ("/grpc.", f"/{serve_api.SERVICE}/", f"/{serve_api.RAY_SERVICE}/")
_PASSTHROUGH = ("request_id", _wire.MODEL_ID, _wire.SESSION_ID, "traceparent", "tracestate")


@dataclasses.dataclass(frozen=True)
class _App:
    name: str
    deployment: str
    methods: frozenset[str]


class _Abort(Exception):
    """End the RPC with this status (raised inside handlers, turned into context.abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


def _remote_abort(err: replica_pb2.RemoteError) -> _Abort:
    code = getattr(grpc.StatusCode, err.status, None) if err.status else None
    # User errors reach clients as type and message only: tracebacks stay inside.
    return _Abort(code or grpc.StatusCode.INTERNAL, f"{err.type_name}: {err.message}")


def _abort_for(exc: BaseException) -> _Abort:
    """The status an external client sees for an error on the way to a replica."""
    if isinstance(exc, _Abort):
        return exc
    if isinstance(exc, exceptions.BackPressureError):
        return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, exceptions.DeploymentNotFoundError):
        return _Abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, exceptions.UnavailableError):
        return _Abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, exceptions.RequestTimeoutError | TimeoutError):
        return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out")
    return _Abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class Ingress:
    """Serves the apps run with ``grpc_options`` to external gRPC clients."""

    def __init__(self, options: GrpcOptions) -> None:
        self.options = options
        self._rpcs = rpc_table(options.servicer_functions)
        self._apps: dict[str, _App] = {}
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._recorder: IngressRecorder | None = None
        if recorders.ENABLED:
            self._recorder = IngressRecorder()
            recorders.REGISTRY.register(self._recorder)
        self.address = ""

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        """Bind and start serving; returns ``host:port`` (the bound port when port=0)."""
        before = _connections.server_ids()
        server = grpc.aio.server(options=_limits.server_options(self.options))
        if self._recorder is not None:
            server_id = _connections.created_since(before)
            if server_id is not None:
                self._recorder.watch_connections(lambda: _connections.open_connections(server_id))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        serve_api.add_to_server(serve_api.ServeAPI(self.app_names, lambda: self._draining), server)
        names = service_names(self._rpcs)
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                serve_api.SERVICE,
                serve_api.RAY_SERVICE,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        server.add_generic_rpc_handlers([_Handler(self)])
        target = f"{self.options.host}:{self.options.port}"
        try:
            port = server.add_secure_port(target, self._credentials()) if self.options.ssl_certificate else (
                server.add_insecure_port(target)
            )
        except RuntimeError as exc:
            raise UsageError(f"cannot bind the gRPC ingress to {target}: {exc}") from exc
        await server.start()
        self._server = server
        for name in ("", *names):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "::", "[::]") else self.options.host
        self.address = f"{host}:{port}"
        return self.address

    def _credentials(self) -> grpc.ServerCredentials:
        o = self.options
        return grpc.ssl_server_credentials(
            [(o.ssl_private_key, o.ssl_certificate)],
            root_certificates=o.ssl_client_ca,
            require_client_auth=o.ssl_client_ca is not None,
        )

    async def add_app(self, name: str, deployment: str, methods: Mapping[str, Any]) -> None:
        """Serve ``name``; health turns SERVING (its replicas are ready by now)."""
        self._apps[name] = _App(name, deployment, frozenset(methods))
        for service in ("", *service_names(self._rpcs)):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def remove_app(self, name: str) -> None:
        self._apps.pop(name, None)

    async def aclose(self) -> None:
        """Drain: report NOT_SERVING, let running RPCs finish (up to drain_timeout_s), stop."""
        if self._server is None:
            return
        self._draining = True
        await self._health.enter_graceful_shutdown()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.options.drain_timeout_s)
        await self._server.stop(0)
        self._server = None
        if self._recorder is not None:
            recorders.REGISTRY.unregister(self._recorder)
            self._recorder = None

    # -- requests --------------------------------------------------------------------

    def app_names(self) -> list[str]:
        return sorted(self._apps)

    def _lookup(
        self, rpc: RpcMethod, context: grpc.aio.ServicerContext, metadata: dict[str, str], span: Any
    ) -> tuple[_App, replica_pb2.CallRequest]:
        app_name = metadata.get("application")
        if app_name:
            app = self._apps.get(app_name)
            if app is None:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown application {app_name!r}; running: {', '.join(self.app_names()) or 'none'}",
                )
        elif len(self._apps) == 1:
            app = next(iter(self._apps.values()))
        else:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"choose an application with 'application' metadata; running: "
                f"{', '.join(self.app_names()) or 'none'}",
            )
        if rpc.target not in app.methods:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"application {app.name!r} (deployment {app.deployment!r}) has no method "
                f"{rpc.target!r} for {rpc.path}; its methods: {', '.join(sorted(app.methods))}",
            )
        request_id = metadata.get("request_id") or os.urandom(8).hex()
        context.set_trailing_metadata((("request_id", request_id),))
        request = replica_pb2.CallRequest(method=rpc.path, codec=_wire.RPC_CODEC, response_codec=_wire.RPC_CODEC)
        for key in _PASSTHROUGH:
            if key in metadata:
                request.metadata[key] = metadata[key]
        request.metadata["request_id"] = request_id
        # The client's deadline, or request_timeout_s: calls made while serving the
        # request inherit it, so none outlives it.
        remaining = [t for t in (context.time_remaining(), self.options.request_timeout_s) if t is not None]
        if remaining:
            request.metadata[_wire.DEADLINE] = repr(time.time() + min(remaining))
        if span is not None:
            span.set_attribute("streamwise.request_id", request_id)
            span.set_attribute("streamwise.application", app.name)
        return app, request

    @contextlib.asynccontextmanager
    async def _serving(
        self, rpc: RpcMethod, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[Any, dict[str, str]]]:
        """Count the RPC, trace it, bound it by request_timeout_s, map errors to statuses.

        Yields the RPC's span (None when not traced) and the client's metadata. The
        client's W3C trace context, if any, is the span's parent.
        """
        self._inflight += 1
        self._idle.clear()
        metadata = _metadata(context)
        started = time.perf_counter()
        status = "CANCELLED"
        try:
            with spans.serve(
                rpc.path.lstrip("/"),
                metadata,
                lambda: {"rpc.system": "grpc", "rpc.service": rpc.service, "rpc.method": rpc.path.rsplit("/", 1)[1]},
                external=True,
            ) as span:
                try:
                    if self.options.request_timeout_s is None:
                        yield span, metadata
                    else:
                        async with asyncio.timeout(self.options.request_timeout_s):
                            yield span, metadata
                    status = "OK"
                except Exception as exc:
                    abort = _abort_for(exc)
                    status = abort.code.name
                    if span is not None:
                        span.set_status(Status(StatusCode.ERROR, abort.code.name))
                        span.set_attribute("rpc.grpc.status_code", abort.code.value[0])
                    await context.abort(abort.code, abort.details)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            if self._recorder is not None:
                # Only names of apps served: a client's metadata must not make new series.
                app = metadata.get("application") or (next(iter(self._apps)) if len(self._apps) == 1 else "")
                app = app if app in self._apps else "unknown"
                self._recorder.finished(app, rpc.path, status, time.perf_counter() - started)

    def _frames(self, app: _App, request: replica_pb2.CallRequest, inputs: Any = None):
        return open_frames(
            (app.name, app.deployment),
            request,
            decode=unpack_messages,
            error=_remote_abort,
            inputs=inputs,
            encode_inputs=pack_messages if inputs is not None else None,
            wait_s=self.options.replica_wait_timeout_s,
        )

    async def unary_unary(self, rpc: RpcMethod, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with self._serving(rpc, context) as (span, metadata):
            app, request = self._lookup(rpc, context, metadata, span)
            request.args = raw
            router = router_for((app.name, app.deployment))
            reply = await router.unary(request, wait_s=self.options.replica_wait_timeout_s)
            if reply.HasField("error"):
                raise _remote_abort(reply.error)
            return reply.value
        return b""  # not reached: _serving aborts

    async def unary_stream(self, rpc: RpcMethod, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        async with self._serving(rpc, context) as (span, metadata):
            app, request = self._lookup(rpc, context, metadata, span)
            request.args = raw
            async with self._frames(app, request) as frames:
                async for message in frames:
                    await context.write(message)

    async def stream_unary(self, rpc: RpcMethod, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async with self._serving(rpc, context) as (span, metadata):
            app, request = self._lookup(rpc, context, metadata, span)
            async with self._frames(app, request, requests) as frames:
                replies = [message async for message in frames]
            if len(replies) != 1:
                raise _Abort(grpc.StatusCode.INTERNAL, f"{rpc.path} produced {len(replies)} responses, expected 1")
            return replies[0]
        return b""

    async def stream_stream(self, rpc: RpcMethod, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with self._serving(rpc, context) as (span, metadata):
            app, request = self._lookup(rpc, context, metadata, span)
            async with self._frames(app, request, requests) as frames:
                async for message in frames:
                    await context.write(message)

    async def not_found(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        served = ", ".join(sorted(self._rpcs))
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown method; this server serves: {served}")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class _Handler(grpc.GenericRpcHandler):
    """Hands every RPC path to the ingress, as raw bytes both ways."""

    def __init__(self, ingress: Ingress) -> None:
        self._ingress = ingress

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = details.method
        if path.startswith(_REGISTERED):
            return None  # health, reflection and the ingress's own RPCs are registered services
        ingress = self._ingress
        rpc = ingress._rpcs.get(path)
        if rpc is None:
            return grpc.stream_stream_rpc_method_handler(ingress.not_found)
        # partial keeps the handlers coroutine functions, which grpc.aio awaits on the loop.
        if rpc.client_streaming and rpc.server_streaming:
            return grpc.stream_stream_rpc_method_handler(functools.partial(ingress.stream_stream, rpc))
        if rpc.client_streaming:
            return grpc.stream_unary_rpc_method_handler(functools.partial(ingress.stream_unary, rpc))
        if rpc.server_streaming:
            return grpc.unary_stream_rpc_method_handler(functools.partial(ingress.unary_stream, rpc))
        return grpc.unary_unary_rpc_method_handler(functools.partial(ingress.unary_unary, rpc))
