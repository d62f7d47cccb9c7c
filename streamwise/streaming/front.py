"""One external gRPC listener: turns each RPC, undecoded, into a call of an app's root deployment.

A :class:`Front` is a grpc.aio server on the app's public address, serving the
user's services (as raw bytes both ways), health, reflection and the ServeAPI. It
looks the app up from the ``application`` metadata, builds the internal
call (request id, multiplexing ids, trace context, deadline: a :class:`FrontCall`), and hands it
to a :class:`Dispatch`, which decides where the call runs: through the router to a
replica (the driver's proxy listener, :class:`RouterDispatch`), or in the replica
that accepted the connection (``streaming.direct``). It is the one place where
streamwise errors become gRPC statuses for external clients.

The front never decodes a client's message: the replica that runs the call decodes
it with the user's generated classes (``payload.RpcPayload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.trace import Status, StatusCode

from streamwise import exceptions
from streamwise.config import GrpcOptions
from streamwise.exceptions import UsageError
from streamwise.metrics import recorders
from streamwise.metrics.recorders import IngressRecorder
from streamwise.proto import replica_pb2
from streamwise.routing.handle import open_frames
from streamwise.routing.router import router_for
from streamwise.streaming import _connections, _limits, _services, _wire, serve_api
from streamwise.streaming.payload import pack_messages, unpack_messages
from streamwise.streaming.schema import RpcMethod, service_names
from streamwise.tracing import spans

_OWN_SERVICES = ("/grpc.", f"/{serve_api.SERVICE}/", f"/{serve_api.RAY_SERVICE}/")  # health, reflection, ServeAPI
_PASSTHROUGH = frozenset(("request_id", _wire.MODEL_ID, _wire.SESSION_ID, "traceparent", "tracestate"))

Emit = Callable[[bytes], Awaitable[None]]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FrontApp:
    """An app served on the public port: its name, root deployment and that one's methods."""

    name: str
    deployment: str
    methods: frozenset[str]


class FrontCall:
    """An external call on its way to a replica: what a ``CallRequest`` carries, as
    plain Python objects. A call run in the replica that accepted it never becomes a
    message; one routed to another replica does (:meth:`request`)."""

    __slots__ = ("method", "args", "metadata")
    codec = _wire.RPC_CODEC
    response_codec = _wire.RPC_CODEC

    def __init__(self, method: str, metadata: dict[str, str], args: bytes = b"") -> None:
        self.method = method
        self.metadata = metadata
        self.args = args

    def request(self) -> replica_pb2.CallRequest:
        return replica_pb2.CallRequest(
            method=self.method, codec=self.codec, response_codec=self.response_codec, args=self.args,
            metadata=self.metadata,
        )


class Abort(Exception):
    """End the RPC with this status (raised inside handlers, turned into context.abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _UnknownApp(Abort):
    """NOT_FOUND for the application a call names (or for its lack of one): an app
    this front is still being given may yet answer it (``Front(expecting=...)``)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, details)


def remote_abort(err: replica_pb2.RemoteError) -> Abort:
    code = getattr(grpc.StatusCode, err.status, None) if err.status else None
    # User errors reach clients as type and message only: tracebacks stay inside.
    return Abort(code or grpc.StatusCode.INTERNAL, f"{err.type_name}: {err.message}")


def _abort_for(exc: BaseException) -> Abort:
    """The status an external client sees for an error on the way to a replica."""
    if isinstance(exc, Abort):
        return exc
    if isinstance(exc, exceptions.BackPressureError):
        return Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, exceptions.DeploymentNotFoundError):
        return Abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, exceptions.UnavailableError):
        return Abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, exceptions.RequestTimeoutError | TimeoutError):
        return Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out")
    return Abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class Dispatch(Protocol):
    """Where a front's calls run. Cancelling the awaiting task cancels the call."""

    async def unary(self, app: FrontApp, call: FrontCall) -> bytes: ...

    async def stream(self, app: FrontApp, call: FrontCall, inputs: AsyncIterator[bytes] | None, emit: Emit) -> None:
        """Run a streaming call, passing each response message to ``emit`` as it comes."""
        ...


class RouterDispatch:
    """Sends every call through the router to a replica of the app's root deployment."""

    def __init__(self, wait_s: float, avoid: str = "") -> None:
        self._wait_s = wait_s
        self._avoid = avoid  # a replica to choose only when no other has room (the caller itself)

    async def unary(self, app: FrontApp, call: FrontCall) -> bytes:
        router = router_for((app.name, app.deployment))
        reply = await router.unary(call.request(), wait_s=self._wait_s, avoid=self._avoid)
        if reply.HasField("error"):
            raise remote_abort(reply.error)
        return reply.value

    async def stream(self, app: FrontApp, call: FrontCall, inputs: AsyncIterator[bytes] | None, emit: Emit) -> None:
        frames = open_frames(
            (app.name, app.deployment),
            call.request(),
            decode=unpack_messages,
            error=remote_abort,
            inputs=inputs,
            encode_inputs=pack_messages if inputs is not None else None,
            wait_s=self._wait_s,
            avoid=self._avoid,
        )
        async with frames:
            async for message in frames:
                await emit(message)


class Front:
    """One public listener serving the apps of ``apps`` (shared, kept current by its owner).

    ``serving`` tells the health service and ServeAPI whether the apps are ready.
    """

    def __init__(
        self,
        options: GrpcOptions,
        rpcs: Mapping[str, RpcMethod],
        apps: Mapping[str, FrontApp],
        dispatch: Dispatch,
        expecting: Callable[[], bool] = lambda: False,
    ) -> None:
        self.options = options
        self._rpcs = rpcs
        self._apps = apps
        self._dispatch = dispatch
        self._server: grpc.aio.Server | None = None
        self._closing: asyncio.Task[None] | None = None
        self._health = _Health()
        self._not_found = grpc.stream_stream_rpc_method_handler(self.not_found)
        # True while the owner is adding apps (a driver starting them): a call for an
        # app not served yet then waits for it, up to replica_wait_timeout_s.
        self._expecting = expecting
        self._apps_changed = asyncio.Event()
        self._inflight = 0  # calls of the user's services running
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._recorder: IngressRecorder | None = None
        if recorders.ENABLED:
            self._recorder = IngressRecorder()
            recorders.REGISTRY.register(self._recorder)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> int:
        """Bind the public address and serve; returns the bound port.

        gRPC core binds with ``SO_REUSEPORT`` (its default), so several fronts of one
        user (the replicas, the driver) may listen on one port; the kernel spreads
        new connections among them.
        """
        before = _connections.server_ids()
        server = grpc.aio.server(options=_limits.server_options(self.options))
        if self._recorder is not None:
            server_id = _connections.created_since(before)
            if server_id is not None:
                self._recorder.watch_connections(lambda: _connections.open_connections(server_id))
        # One generic handler for every service (see ``_services``): the user's RPCs,
        # health, the ServeAPI, reflection; any other path gets NOT_FOUND.
        methods = _services.Methods(self._unknown)
        methods.add_servicer(health_pb2_grpc.add_HealthServicer_to_server, self._health)
        serve_api.add_to_server(serve_api.ServeAPI(self.app_names, lambda: self._draining), methods)
        names = service_names(self._rpcs)
        served = [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            serve_api.SERVICE,
            serve_api.RAY_SERVICE,
            reflection.SERVICE_NAME,
        ]
        methods.add_servicer(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflection.aio.ReflectionServicer(served)
        )
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for path, rpc in self._rpcs.items():
            by_service.setdefault(rpc.service, {})[path.rsplit("/", 1)[1]] = _method_handler(self, rpc)
        for service, handlers in by_service.items():
            methods.add(service, handlers)
        server.add_generic_rpc_handlers([methods])
        target = f"{self.options.host}:{self.options.port}"
        try:
            port = server.add_secure_port(target, self._credentials()) if self.options.ssl_certificate else (
                server.add_insecure_port(target)
            )
        except RuntimeError as exc:
            raise UsageError(f"cannot bind the gRPC ingress to {target}: {exc}") from exc
        await server.start()
        self._server = server
        await self.set_serving(False)
        return port

    def _credentials(self) -> grpc.ServerCredentials:
        o = self.options
        return grpc.ssl_server_credentials(
            [(o.ssl_private_key, o.ssl_certificate)],
            root_certificates=o.ssl_client_ca,
            require_client_auth=o.ssl_client_ca is not None,
        )

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *service_names(self._rpcs)):
            await self._health.set(service, status)

    async def aclose(self, drain_s: float, *, draining: bool = True) -> None:
        """Stop listening (clients get GOAWAY and reconnect elsewhere), let running
        RPCs finish for up to ``drain_s``, then cancel the rest.

        ``draining``: the apps are going away, so health and Healthz say so first;
        False when other listeners on the port go on serving them. A second call
        waits for the first one's close; cancelling a caller does not stop the close.
        """
        if self._closing is None:
            if self._server is None:
                return
            self._closing = asyncio.get_running_loop().create_task(self._close(self._server, drain_s, draining))
        await asyncio.shield(self._closing)

    async def _close(self, server: grpc.aio.Server, drain_s: float, draining: bool) -> None:
        if draining:
            self._draining = True
            await self._health.enter_graceful_shutdown()
        # Stopping first sends GOAWAY; gRPC then waits for every call it took (also
        # those whose handler has not run yet) up to drain_s before cancelling them.
        stopping = asyncio.get_running_loop().create_task(server.stop(drain_s))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_s)
            self._health.end_watches()  # they would hold the stop until drain_s
        finally:
            try:
                await stopping
            finally:
                self._server = None
                if self._recorder is not None:
                    recorders.REGISTRY.unregister(self._recorder)
                    self._recorder = None

    # -- requests --------------------------------------------------------------------

    def app_names(self) -> list[str]:
        return sorted(self._apps)

    def apps_changed(self) -> None:
        """Its owner changed the apps: calls waiting for one look again."""
        self._apps_changed.set()
        self._apps_changed = asyncio.Event()

    async def _app_arrives(self, deadline: float) -> bool:
        """Wait, while apps are being added and until ``deadline`` (loop time), for
        the next change of the apps; whether there was one."""
        changed = self._apps_changed
        remaining = deadline - asyncio.get_running_loop().time()
        if not self._expecting() or remaining <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)
        return changed.is_set()

    def _lookup(
        self, rpc: RpcMethod, context: grpc.aio.ServicerContext, metadata: dict[str, str], span: Any
    ) -> tuple[FrontApp, FrontCall]:
        app_name = metadata.get("application")
        if app_name:
            app = self._apps.get(app_name)
            if app is None:
                raise _UnknownApp(
                    f"unknown application {app_name!r}; running: {', '.join(self.app_names()) or 'none'}",
                )
        elif len(self._apps) == 1:
            app = next(iter(self._apps.values()))
        else:
            raise _UnknownApp(
                f"choose an application with 'application' metadata; running: "
                f"{', '.join(self.app_names()) or 'none'}",
            )
        if rpc.target not in app.methods:
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"application {app.name!r} (deployment {app.deployment!r}) has no method "
                f"{rpc.target!r} for {rpc.path}; its methods: {', '.join(sorted(app.methods))}",
            )
        request_id = metadata.get("request_id") or _wire.new_request_id()
        context.set_trailing_metadata((("request_id", request_id),))
        passed = {key: metadata[key] for key in _PASSTHROUGH if key in metadata}  # not every header a client sends
        passed["request_id"] = request_id
        # The client's deadline, or request_timeout_s: calls made while serving the
        # request inherit it, so none outlives it.
        remaining = context.time_remaining()
        limit = self.options.request_timeout_s
        if limit is not None:
            remaining = limit if remaining is None else min(remaining, limit)
        if remaining is not None:
            passed[_wire.DEADLINE] = repr(time.time() + remaining)
        if span is not None:
            span.set_attribute("streamwise.request_id", request_id)
            span.set_attribute("streamwise.application", app.name)
        return app, FrontCall(rpc.path, passed)

    async def _serve(
        self, rpc: RpcMethod, context: grpc.aio.ServicerContext, run: Callable[[Any, dict[str, str]], Awaitable[T]]
    ) -> T:
        """Count the RPC, trace it, bound it by request_timeout_s, map errors to statuses.

        ``run(span, metadata)`` does the call, given the RPC's span (None when not
        traced) and the client's metadata; the client's W3C trace context, if any,
        is the span's parent. An error aborts the RPC with its status; cancellation
        (the client went away) cancels ``run``.
        """
        if not self._inflight:
            self._idle.clear()
        self._inflight += 1
        metadata = _metadata(context)
        started = time.perf_counter()
        status = "CANCELLED"
        try:
            with spans.serve(
                rpc.path.lstrip("/"),
                metadata,
                lambda: {"rpc.system": "grpc", "rpc.service": rpc.service, "rpc.method": rpc.path.rsplit("/", 1)[1]},
                external=True,
            ) if spans.enabled() else spans.NO_SPAN as span:
                try:
                    limit = self.options.request_timeout_s
                    deadline = None
                    while True:
                        try:
                            if limit is None:
                                result = await run(span, metadata)
                            else:
                                async with asyncio.timeout(limit):
                                    result = await run(span, metadata)
                            break
                        except _UnknownApp:  # raised before the call went anywhere
                            now = asyncio.get_running_loop().time()
                            if deadline is None:
                                wait = self.options.replica_wait_timeout_s
                                deadline = now + (wait if limit is None else min(wait, limit))
                            if not await self._app_arrives(deadline):
                                raise
                            if limit is not None:  # the wait counts against request_timeout_s
                                limit = max(0.001, limit - (asyncio.get_running_loop().time() - now))
                    status = "OK"
                    return result
                except Exception as exc:
                    abort = _abort_for(exc)
                    status = abort.code.name
                    if span is not None:
                        span.set_status(Status(StatusCode.ERROR, abort.code.name))
                        span.set_attribute("rpc.grpc.status_code", abort.code.value[0])
                    await context.abort(abort.code, abort.details)
                    raise  # not reached: abort raises
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            if self._recorder is not None:
                # Only names of apps served: a client's metadata must not make new series.
                app = metadata.get("application") or (next(iter(self._apps)) if len(self._apps) == 1 else "")
                app = app if app in self._apps else "unknown"
                self._recorder.finished(app, rpc.path, status, time.perf_counter() - started)

    async def unary_unary(self, rpc: RpcMethod, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def run(span: Any, metadata: dict[str, str]) -> bytes:
            app, call = self._lookup(rpc, context, metadata, span)
            call.args = raw
            return await self._dispatch.unary(app, call)

        return await self._serve(rpc, context, run)

    async def unary_stream(self, rpc: RpcMethod, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        async def run(span: Any, metadata: dict[str, str]) -> None:
            app, call = self._lookup(rpc, context, metadata, span)
            call.args = raw
            await self._dispatch.stream(app, call, None, context.write)

        await self._serve(rpc, context, run)

    async def stream_unary(self, rpc: RpcMethod, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async def run(span: Any, metadata: dict[str, str]) -> bytes:
            app, call = self._lookup(rpc, context, metadata, span)
            replies: list[bytes] = []

            async def collect(message: bytes) -> None:
                replies.append(message)

            await self._dispatch.stream(app, call, requests, collect)
            if len(replies) != 1:
                raise Abort(grpc.StatusCode.INTERNAL, f"{rpc.path} produced {len(replies)} responses, expected 1")
            return replies[0]

        return await self._serve(rpc, context, run)

    async def stream_stream(self, rpc: RpcMethod, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async def run(span: Any, metadata: dict[str, str]) -> None:
            app, call = self._lookup(rpc, context, metadata, span)
            await self._dispatch.stream(app, call, requests, context.write)

        await self._serve(rpc, context, run)

    def _unknown(self, path: str) -> grpc.RpcMethodHandler | None:
        """The handler of a path no service here has: NOT_FOUND naming those served
        (gRPC's own UNIMPLEMENTED for unknown methods of the health, reflection and
        ServeAPI services)."""
        if path.startswith(_OWN_SERVICES):
            return None
        return self._not_found

    async def not_found(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        served = ", ".join(sorted(self._rpcs))
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown method; this server serves: {served}")


class _Health(health.aio.HealthServicer):
    """The standard health service, whose Watch streams end (OK) once told to."""

    def __init__(self) -> None:
        super().__init__()
        self._ended = asyncio.Event()

    async def Watch(self, request: Any, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait((watch, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            ended.cancel()
            await asyncio.gather(watch, ended, return_exceptions=True)

    def end_watches(self) -> None:
        self._ended.set()


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _method_handler(front: Front, rpc: RpcMethod) -> grpc.RpcMethodHandler:
    # partial keeps the handlers coroutine functions, which grpc.aio awaits on the loop.
    if rpc.client_streaming and rpc.server_streaming:
        return grpc.stream_stream_rpc_method_handler(functools.partial(front.stream_stream, rpc))
    if rpc.client_streaming:
        return grpc.stream_unary_rpc_method_handler(functools.partial(front.stream_unary, rpc))
    if rpc.server_streaming:
        return grpc.unary_stream_rpc_method_handler(functools.partial(front.unary_stream, rpc))
    return grpc.unary_unary_rpc_method_handler(functools.partial(front.unary_unary, rpc))
