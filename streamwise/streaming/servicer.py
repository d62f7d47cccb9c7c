"""The replica side of the internal protocol: admits calls and runs user methods.

This is the one place where exceptions from user code become wire errors. A call is
admitted only while fewer than ``max_ongoing_requests`` run; otherwise it is rejected
before any user code runs (RESOURCE_EXHAUSTED), and the caller's router retries it
elsewhere. Admitted calls are acknowledged with initial metadata first, so a caller
can tell "never ran" (safe to retry, e.g. sent to a replica that just died) from
"died mid-call" (outcome unknown, reported as ReplicaDiedError).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import prometheus_client

from streamwise.actors._methods import MethodKind, coalesce_of
from streamwise.config import DEFAULT_COALESCE, CoalesceConfig
from streamwise.exceptions import StreamwiseError, UnknownMethodError, UsageError
from streamwise.metrics.recorders import REGISTRY, ReplicaRecorder, ok_status
from streamwise.objectstore.calls import ServerWire, receive_args, take_export
from streamwise.proto import replica_pb2, replica_pb2_grpc
from streamwise.streaming import _wire
from streamwise.streaming._chunks import Chunk
from streamwise.streaming.context import enter_request
from streamwise.streaming.frames import send_frames
from streamwise.streaming.payload import Payload, RpcPayload
from streamwise.streaming.schema import RpcMethod
from streamwise.tracing import spans

if TYPE_CHECKING:
    from streamwise.streaming.front import FrontCall  # the front imports this module's neighbours


class ReplicaServicer(replica_pb2_grpc.ReplicaServicer):
    """Serves one user object to callers over the internal protocol."""

    def __init__(
        self,
        user_object: Any,
        methods: Mapping[str, MethodKind],
        *,
        deployment: str,
        replica_id: str,
        max_ongoing_requests: int,
        coalesce: CoalesceConfig = DEFAULT_COALESCE,
        executor: ThreadPoolExecutor,
        rpcs: Mapping[str, RpcMethod] | None = None,
        recorder: ReplicaRecorder | None = None,
    ) -> None:
        self._obj = user_object
        self._recorder = recorder
        self._rpcs = dict(rpcs or {})
        self._rpc_payloads: dict[str, RpcPayload] = {}
        self._methods = dict(methods)
        self._deployment = deployment
        self._replica_id = replica_id
        self._max_ongoing = max_ongoing_requests
        self._coalesce = coalesce  # frames of streams whose method has no @coalesce
        self._executor = executor
        self._ongoing = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission -------------------------------------------------------------------

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self._draining:
            if self._recorder is not None:
                self._recorder.refused("draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{_wire.REJECT_DRAINING}: {self._replica_id}")
        if self._ongoing >= self._max_ongoing:
            if self._recorder is not None:
                self._recorder.refused("full")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{_wire.REJECT_FULL}: {self._replica_id} of {self._deployment!r} is running "
                f"max_ongoing_requests={self._max_ongoing}",
            )
        self._ongoing += 1
        self._idle.clear()

    def _done(self) -> None:
        self._ongoing -= 1
        if self._ongoing == 0:
            self._idle.set()

    @property
    def ongoing(self) -> int:
        return self._ongoing

    @property
    def below_limit(self) -> bool:
        """Below max_ongoing_requests, draining or not: what the replica's own listener
        asks of a call it accepted (see ``streaming.direct``)."""
        return self._ongoing < self._max_ongoing

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls and wait up to ``timeout_s`` for running ones; True if idle."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    # -- invoking user code ----------------------------------------------------------

    def _payload(self, request: replica_pb2.CallRequest, push: bool = True) -> Payload:
        """How this call's bytes become values and back; closed when the call ends.

        Calls from the ingress carry protobuf bytes, decoded with the RPC's message
        classes (never unpickled); calls between deployments carry codec-encoded
        values, by reference or by value (the object store's ServerWire).
        """
        if request.codec == _wire.RPC_CODEC:
            payload = self._rpc_payloads.get(request.method)  # they hold no state of a call
            if payload is None:
                rpc = self._rpcs.get(request.method)
                if rpc is None:
                    raise UnknownMethodError(self._deployment, request.method, tuple(sorted(self._rpcs)))
                payload = self._rpc_payloads[request.method] = RpcPayload(rpc)
            return payload
        return ServerWire(request.metadata, request.codec, request.response_codec, push=push)

    def _bind(
        self, request: replica_pb2.CallRequest, payload: Payload, *leading: Any
    ) -> tuple[MethodKind, Callable[[], Any]]:
        """The method kind and a ready-to-call partial."""
        target = payload.target if isinstance(payload, RpcPayload) else request.method
        kind = self._methods.get(target)
        if kind is None:
            raise UnknownMethodError(self._deployment, target, tuple(sorted(self._methods)))
        args, kwargs = payload.args(request.args)
        fn = getattr(self._obj, target)
        return kind, functools.partial(fn, *leading, *args, **kwargs)

    def _enter_context(self, request: replica_pb2.CallRequest) -> None:
        enter_request(request.metadata, self._deployment, self._replica_id)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, ctx.run, fn)

    async def _sync_gen(self, gen: Any) -> AsyncIterator[Any]:
        """A sync generator driven from the thread pool, one ``next()`` at a time."""
        sentinel = object()
        pending: concurrent.futures.Future[Any] | None = None
        try:
            while True:
                pending = self._executor.submit(contextvars.copy_context().run, next, gen, sentinel)
                item = await asyncio.wrap_future(pending)
                pending = None
                if item is sentinel:
                    return
                yield item
        finally:
            # A generator cannot be closed while a next() still runs in a worker: close
            # it in a worker once that next() returns (its finally runs then), without
            # holding up the cancellation of this call.
            try:
                self._executor.submit(_close_when_idle, pending, gen)
            except RuntimeError:  # the pool is shut down (replica stopping)
                pass

    # -- RPCs ------------------------------------------------------------------------

    async def Call(self, request: replica_pb2.CallRequest, context: grpc.aio.ServicerContext) -> replica_pb2.CallReply:
        reply = await self._call(request, context)
        assert reply is not None
        return reply

    async def CallCarried(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """:meth:`Call` for a caller in another node's object store session: the call
        (and the chunks its arguments carry, read once it is admitted), then the
        reply and the chunks its value carries. A caller that goes away mid-transfer
        cancels the call; what it had sent of its arguments is removed, and nothing
        of the reply is stored on this node."""
        first = await context.read()
        if first is grpc.aio.EOF or not first.HasField("call"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "streamwise: a carried call must start with a call")
        await self._call(first.call, context, context.write)

    async def _call(
        self,
        request: replica_pb2.CallRequest,
        context: grpc.aio.ServicerContext,
        write: Callable[[Any], Awaitable[None]] | None = None,
    ) -> replica_pb2.CallReply | None:
        """Run a unary call; its reply is returned, or sent with ``write`` followed by
        the chunks it carries."""
        await self._admit(context)
        payload: Payload | None = None
        started = time.perf_counter()
        status = "CANCELLED"
        release_args = None
        try:
            await context.send_initial_metadata(_wire.ACK_METADATA)
            if write is not None:
                release_args = await receive_args(request, functools.partial(_read_chunk, context))
            self._enter_context(request)
            with self._span(request, streaming=False) as span:
                try:
                    payload = self._payload(request, push=write is not None)
                    kind, call = self._bind(request, payload)
                    if kind is MethodKind.ASYNC:
                        result = await call()
                    elif kind is MethodKind.SYNC:
                        result = await self._in_thread(call)
                    else:
                        result = [item async for item in self._iterate(kind, call)]
                    value = payload.value(result)
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and _cancelled_here():
                        raise  # the caller went away
                    if span is not None:
                        spans.mark_error(span, exc)
                    error = _wire.error_to_proto(exc)
                    status = ok_status(error)
                    reply = replica_pb2.CallReply(error=error)
                    if write is None:
                        return reply
                    await write(reply)
                    return None
                status = "OK"
                reply = replica_pb2.CallReply(value=value)
                if write is None:
                    return reply
                await write(reply)
                for chunk in payload.take_carried():
                    await write(Chunk(chunk))
                return None
        finally:
            if payload is not None:
                payload.close()
            if release_args is not None:
                release_args()
            self._done()
            if self._recorder is not None:
                self._recorder.finished(request.method, status, time.perf_counter() - started)

    async def Fetch(self, request: replica_pb2.FetchRequest, context: grpc.aio.ServicerContext) -> None:
        """The chunks of a result a Call returned to another node's session (once).
        A caller that goes away mid-transfer ends it; the result is dropped either way."""
        chunks = take_export(request.ticket)
        if chunks is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "streamwise: no such result to fetch (expired or fetched)")
        for chunk in chunks:
            await context.write(Chunk(chunk))

    def _span(self, request: replica_pb2.CallRequest, streaming: bool):
        """The replica's span of one request, parented by the caller's trace context."""
        if not spans.enabled():
            return spans.NO_SPAN
        return spans.serve(
            f"{self._deployment}.{_wire.method_label(request.method)}",
            request.metadata,
            lambda: {
                "streamwise.deployment": self._deployment,
                "streamwise.replica_id": self._replica_id,
                "streamwise.method": request.method,
                "streamwise.streaming": streaming,
                "streamwise.request_id": request.metadata.get(_wire.REQUEST_ID, ""),
            },
        )

    def _iterate(self, kind: MethodKind, call: Callable[[], Any]) -> AsyncIterator[Any]:
        if kind is MethodKind.ASYNC_GEN:
            return call()
        if kind is MethodKind.SYNC_GEN:
            return self._sync_gen(call())
        return _single(kind, call, self)

    async def Stream(self, request: replica_pb2.CallRequest, context: grpc.aio.ServicerContext) -> None:
        await self._admit(context)
        try:
            await context.send_initial_metadata(_wire.ACK_METADATA)
            await self._serve_frames(context, request)
        finally:
            self._done()

    async def Channel(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """A call with an input stream: the user method gets an async iterator first.

        From another node's store session, the call may come here without one, only
        so that the chunks its arguments carry can follow it (read once admitted;
        cancelling the call removes what had arrived of them)."""
        await self._admit(context)
        try:
            first = await context.read()
            if first is grpc.aio.EOF or not first.HasField("call"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "streamwise: channel must start with a call")
            request = first.call
            await context.send_initial_metadata(_wire.ACK_METADATA)
            release_args = await receive_args(request, functools.partial(_read_chunk, context))
            try:
                with_inputs = release_args is None or request.metadata.get(_wire.NO_INPUTS) != "1"
                await self._serve_frames(context, request, with_inputs=with_inputs)
            finally:
                if release_args is not None:
                    release_args()
        finally:
            self._done()

    async def _serve_frames(
        self, context: grpc.aio.ServicerContext, request: replica_pb2.CallRequest, with_inputs: bool = False
    ) -> None:
        """Run the requested method and send what it yields (or returns) as frames.

        A failure goes last, as an error frame, once the request's span has ended: the
        caller takes that frame as the end of the call, so the span (which the tracing
        exporter writes as it ends) must not wait for anything after it.
        """
        self._enter_context(request)
        started = time.perf_counter()
        recorder = self._recorder
        items = _ItemCounter(context, started) if recorder is not None else None
        status = "CANCELLED"
        try:
            with self._span(request, streaming=True) as span:
                error = await self._send_results(items or context, request, with_inputs, span)
                if span is not None and error is not None:
                    spans.mark_error(span, error)
            if error is not None:
                proto = _wire.error_to_proto(error)
                status = ok_status(proto)
                await context.write(replica_pb2.Frame(error=proto))
            else:
                status = "OK"
        finally:
            if recorder is not None and items is not None:
                recorder.streamed(request.method, items.count, items.first_item_s)
                recorder.finished(request.method, status, time.perf_counter() - started)

    async def _send_results(
        self, context: Any, request: replica_pb2.CallRequest, with_inputs: bool, span: Any
    ) -> Exception | None:
        """Send the method's items; the exception it ended with, if any, is returned."""
        try:
            payload = self._payload(request)
        except Exception as exc:
            return exc
        try:
            return await self._send_items(context, request, payload, with_inputs, span)
        finally:
            payload.close()

    async def _send_items(
        self,
        context: Any,  # the call's context, or an _ItemCounter over its write
        request: replica_pb2.CallRequest,
        payload: Payload,
        with_inputs: bool,
        span: Any,
    ) -> Exception | None:
        try:
            leading = (_inputs(context, payload),) if with_inputs else ()
            kind, call = self._bind(request, payload, *leading)
            if with_inputs and kind in (MethodKind.SYNC, MethodKind.SYNC_GEN):
                raise UsageError(
                    f"{self._deployment}.{request.method} takes an input stream, so it must be "
                    "`async def` (an async iterator cannot be consumed from a thread)"
                )
            items = self._iterate(kind, call)
            policy = coalesce_of(call.func, self._coalesce)
        except Exception as exc:
            return exc
        counter = None if span is None else spans.FrameCounter(context.write, span)
        write = context.write if counter is None else counter
        if payload.chunked:
            write = _carrying(write, context.write, payload)
        try:
            error = await send_frames(items, write, payload.items, policy)
        except StreamwiseError as exc:  # e.g. an item the codec cannot encode
            error = exc
        if counter is not None:
            counter.finish()
        return error

    async def call_in_process(self, request: FrontCall) -> bytes | replica_pb2.RemoteError:
        """Run an external RPC's unary call here, for the replica's own listener.

        Like :meth:`Call`, without a reply message around the result: returns the
        encoded response, or the error the method raised. The caller checked
        :attr:`below_limit`; the call is admitted without waiting. Cancellation cancels
        the method (and propagates).
        """
        if not self._ongoing:
            self._idle.clear()
        self._ongoing += 1
        started = time.perf_counter()
        status = "CANCELLED"
        try:
            self._enter_context(request)
            with self._span(request, streaming=False) as span:
                try:
                    payload = self._payload(request)
                    kind, call = self._bind(request, payload)
                    if kind is MethodKind.ASYNC:
                        result = await call()
                    elif kind is MethodKind.SYNC:
                        result = await self._in_thread(call)
                    else:
                        result = [item async for item in self._iterate(kind, call)]
                    value = payload.value(result)
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and _cancelled_here():
                        raise  # the client went away, or its deadline passed
                    if span is not None:
                        spans.mark_error(span, exc)
                    error = _wire.error_to_proto(exc)
                    status = ok_status(error)
                    return error
                status = "OK"
                return value
        finally:
            self._done()
            if self._recorder is not None:
                self._recorder.finished(request.method, status, time.perf_counter() - started)

    async def stream_in_process(
        self,
        request: FrontCall,
        emit: Callable[[bytes], Awaitable[None]],
        inputs: AsyncIterator[bytes] | None = None,
    ) -> replica_pb2.RemoteError | None:
        """Run an external RPC's streaming call here, for the replica's own listener.

        Like :meth:`Stream` (or :meth:`Channel` with ``inputs``: the client's raw
        messages), but each response message goes to ``emit`` as the method yields
        it, encoded with the RPC's message class: no frames, as every item is one
        gRPC message anyway (and ``emit`` awaits the client's flow control). The
        caller checked :attr:`below_limit`; the call is admitted without waiting.
        Returns the error the method ended with, if any. Cancellation cancels the
        method and closes its generator (its ``finally`` runs) before it propagates.
        """
        self._ongoing += 1
        self._idle.clear()
        self._enter_context(request)
        started = time.perf_counter()
        recorder = self._recorder
        count = 0
        first_item_s: float | None = None
        status = "CANCELLED"
        try:
            with self._span(request, streaming=True) as span:
                items: Any = None
                try:
                    payload = self._payload(request)
                    assert isinstance(payload, RpcPayload)
                    leading = (_decoded(inputs, payload),) if inputs is not None else ()
                    kind, call = self._bind(request, payload, *leading)
                    if inputs is not None and kind in (MethodKind.SYNC, MethodKind.SYNC_GEN):
                        raise UsageError(
                            f"{self._deployment}.{request.method} takes an input stream, so it must be `async def`"
                        )
                    items = self._iterate(kind, call)
                    encode = payload.message_bytes
                    async for item in items:
                        message = encode(item)
                        if first_item_s is None:
                            first_item_s = time.perf_counter() - started
                        count += 1
                        await emit(message)
                    error = None
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and _cancelled_here():
                        raise  # the client went away, or its deadline passed
                    error = exc
                finally:
                    aclose = getattr(items, "aclose", None)
                    if aclose is not None:
                        await aclose()
                if span is not None:
                    span.set_attribute("streamwise.items", count)
                    if error is not None:
                        spans.mark_error(span, error)
            if error is None:
                status = "OK"
                return None
            proto = _wire.error_to_proto(error)
            status = ok_status(proto)
            return proto
        finally:
            self._done()
            if recorder is not None:
                recorder.streamed(request.method, count, first_item_s)
                recorder.finished(request.method, status, time.perf_counter() - started)

    async def CheckHealth(self, request: replica_pb2.HealthRequest, context: grpc.aio.ServicerContext) -> replica_pb2.HealthReply:
        check = getattr(self._obj, "check_health", None)
        if check is None:
            return replica_pb2.HealthReply()
        try:
            if asyncio.iscoroutinefunction(check):
                await check()
            else:
                await self._in_thread(check)
        except Exception as exc:
            return replica_pb2.HealthReply(error=_wire.error_to_proto(exc))
        return replica_pb2.HealthReply()

    async def Stats(self, request: replica_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> replica_pb2.StatsReply:
        return replica_pb2.StatsReply(ongoing_requests=self._ongoing)

    async def Metrics(self, request: replica_pb2.MetricsRequest, context: grpc.aio.ServicerContext) -> replica_pb2.MetricsReply:
        return replica_pb2.MetricsReply(text=prometheus_client.generate_latest(REGISTRY))


class _ItemCounter:
    """Stands in for a stream's context, counting the items of each frame written
    (per frame, not per item) and when the first one left; reads go to the call."""

    __slots__ = ("_context", "_write", "_started", "count", "first_item_s")

    def __init__(self, context: Any, started: float) -> None:
        self._context = context
        self._write = context.write
        self._started = started
        self.count = 0
        self.first_item_s: float | None = None

    async def write(self, frame: replica_pb2.Frame) -> None:
        if frame.count:
            if self.first_item_s is None:
                self.first_item_s = time.perf_counter() - self._started
            self.count += frame.count
        await self._write(frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _read_chunk(context: grpc.aio.ServicerContext) -> Any:
    """The next message of a call's input: a chunk's bytes, or the message itself."""
    message = await context.read()
    return message.data if type(message) is Chunk else message


def _carrying(
    write: Callable[[Any], Awaitable[None]], send: Callable[[Any], Awaitable[None]], payload: Payload
) -> Callable[[Any], Awaitable[None]]:
    """``write`` for frames, sending (with ``send``) after each one the chunks its
    envelope carries: chunks are not frames, and spans do not count them."""

    async def write_carrying(frame: replica_pb2.Frame) -> None:
        await write(frame)
        for chunk in payload.take_carried():
            await send(Chunk(chunk))

    return write_carrying


def _close_when_idle(pending: concurrent.futures.Future[Any] | None, gen: Any) -> None:
    if pending is not None:
        try:
            pending.result()
        except BaseException:
            pass
    gen.close()


def _cancelled_here() -> bool:
    """Whether the running task is being cancelled (rather than user code having raised
    CancelledError itself, which is reported to the caller like any other error)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _decoded(raw_inputs: AsyncIterator[bytes], payload: RpcPayload) -> AsyncIterator[Any]:
    """An external client's input messages, decoded as they arrive."""
    async for raw in raw_inputs:
        yield payload.message(raw)


async def _inputs(context: grpc.aio.ServicerContext, payload: Payload) -> AsyncIterator[Any]:
    """The caller's input items, decoded as they arrive (never buffered whole)."""
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        for item in payload.inputs(message.items):
            yield item


async def _single(kind: MethodKind, call: Callable[[], Any], servicer: ReplicaServicer) -> AsyncIterator[Any]:
    """A unary method called as a stream yields its one result."""
    if kind is MethodKind.ASYNC:
        yield await call()
    else:
        yield await servicer._in_thread(call)
