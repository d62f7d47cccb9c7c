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
import contextvars
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from streamwise import codec as codecs
from streamwise.actors._methods import MethodKind
from streamwise.exceptions import StreamwiseError, UnknownMethodError, UsageError
from streamwise.objectstore.calls import ServerWire
from streamwise.proto import replica_pb2, replica_pb2_grpc
from streamwise.streaming import _wire
from streamwise.streaming.context import RequestContext, _CURRENT
from streamwise.streaming.frames import send_frames


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
        executor: ThreadPoolExecutor,
    ) -> None:
        self._obj = user_object
        self._methods = dict(methods)
        self._deployment = deployment
        self._replica_id = replica_id
        self._max_ongoing = max_ongoing_requests
        self._executor = executor
        self._ongoing = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission -------------------------------------------------------------------

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{_wire.REJECT_DRAINING}: {self._replica_id}")
        if self._ongoing >= self._max_ongoing:
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

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls and wait up to ``timeout_s`` for running ones; True if idle."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    # -- invoking user code ----------------------------------------------------------

    def _bind(
        self, request: replica_pb2.CallRequest, wire: ServerWire, *leading: Any
    ) -> tuple[MethodKind, Callable[[], Any]]:
        kind = self._methods.get(request.method)
        if kind is None:
            raise UnknownMethodError(self._deployment, request.method, tuple(sorted(self._methods)))
        args, kwargs = wire.loads_args(request.args)
        fn = getattr(self._obj, request.method)
        return kind, functools.partial(fn, *leading, *args, **kwargs)

    def _enter_context(self, request: replica_pb2.CallRequest) -> None:
        _CURRENT.set(RequestContext.from_metadata(request.metadata, self._deployment, self._replica_id))

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, ctx.run, fn)

    async def _sync_gen(self, gen: Any) -> AsyncIterator[Any]:
        sentinel = object()
        try:
            while True:
                item = await self._in_thread(functools.partial(next, gen, sentinel))
                if item is sentinel:
                    return
                yield item
        finally:
            await self._in_thread(gen.close)

    # -- RPCs ------------------------------------------------------------------------

    async def Call(self, request: replica_pb2.CallRequest, context: grpc.aio.ServicerContext) -> replica_pb2.CallReply:
        await self._admit(context)
        wire = ServerWire(request.metadata, request.codec, request.response_codec)
        try:
            await context.send_initial_metadata(_wire.ACK_METADATA)
            self._enter_context(request)
            try:
                kind, call = self._bind(request, wire)
                if kind is MethodKind.ASYNC:
                    result = await call()
                elif kind is MethodKind.SYNC:
                    result = await self._in_thread(call)
                else:
                    result = [item async for item in self._iterate(kind, call)]
                value = wire.dumps_result(result)
            except Exception as exc:
                return replica_pb2.CallReply(error=_wire.error_to_proto(exc))
            return replica_pb2.CallReply(value=value)
        finally:
            wire.close()
            self._done()

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
        """A call with an input stream: the user method gets an async iterator first."""
        await self._admit(context)
        try:
            first = await context.read()
            if first is grpc.aio.EOF or not first.HasField("call"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "streamwise: channel must start with a call")
            request = first.call
            await context.send_initial_metadata(_wire.ACK_METADATA)
            await self._serve_frames(context, request, _inputs(context, codecs.get_codec(request.codec)))
        finally:
            self._done()

    async def _serve_frames(
        self, context: grpc.aio.ServicerContext, request: replica_pb2.CallRequest, *inputs: AsyncIterator[Any]
    ) -> None:
        """Run the requested method and send what it yields (or returns) as frames."""
        self._enter_context(request)
        wire = ServerWire(request.metadata, request.codec, request.response_codec)
        try:
            await self._send_frames(context, request, wire, *inputs)
        finally:
            wire.close()

    async def _send_frames(
        self,
        context: grpc.aio.ServicerContext,
        request: replica_pb2.CallRequest,
        wire: ServerWire,
        *inputs: AsyncIterator[Any],
    ) -> None:
        try:
            kind, call = self._bind(request, wire, *inputs)
            if inputs and kind in (MethodKind.SYNC, MethodKind.SYNC_GEN):
                raise UsageError(
                    f"{self._deployment}.{request.method} takes an input stream, so it must be "
                    "`async def` (an async iterator cannot be consumed from a thread)"
                )
            items = self._iterate(kind, call)
            encode = wire.dumps_items
        except Exception as exc:
            await context.write(replica_pb2.Frame(error=_wire.error_to_proto(exc)))
            return
        try:
            await send_frames(items, context.write, encode)
        except StreamwiseError as exc:  # e.g. an item the codec cannot encode
            await context.write(replica_pb2.Frame(error=_wire.error_to_proto(exc)))

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


async def _inputs(context: grpc.aio.ServicerContext, codec: codecs.Codec) -> AsyncIterator[Any]:
    """The caller's input items, decoded as they arrive (never buffered whole)."""
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        for item in codec.loads(message.items):
            yield item


async def _single(kind: MethodKind, call: Callable[[], Any], servicer: ReplicaServicer) -> AsyncIterator[Any]:
    """A unary method called as a stream yields its one result."""
    if kind is MethodKind.ASYNC:
        yield await call()
    else:
        yield await servicer._in_thread(call)
