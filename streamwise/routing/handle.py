"""DeploymentHandle: how Python code calls a deployment.

``handle.method.remote(*args, **kwargs)`` starts a call and returns a
:class:`DeploymentResponse` (unary methods) or :class:`DeploymentResponseGenerator`
(generator methods; the kind is known from the deployment, no option needed).
Handles are cheap, immutable and picklable: pass them to other deployments freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from streamwise import codec as codecs
from streamwise.actors._methods import MethodKind
from streamwise.config import HandleOptions
from streamwise.exceptions import RequestTimeoutError, UnknownMethodError
from streamwise.objectstore.calls import CallerWire
from streamwise.proto import replica_pb2
from streamwise.routing.response import DeploymentResponse, DeploymentResponseGenerator
from streamwise.routing.router import RouterKey, router_for
from streamwise.routing.transport import FrameStream
from streamwise.streaming import _wire
from streamwise.streaming.context import current_deadline
from streamwise.tracing import spans


class DeploymentHandle:
    """A reference to a running deployment, usable from any process and any loop."""

    __slots__ = ("_app", "_deployment", "_methods", "_options", "_by_method")

    def __init__(
        self,
        deployment: str,
        app: str = "default",
        methods: Mapping[str, MethodKind] | None = None,
        options: HandleOptions | None = None,
    ) -> None:
        self._app = app
        self._deployment = deployment
        self._methods = dict(methods or {})
        self._options = options or HandleOptions()
        self._by_method: dict[str, DeploymentHandle] = {}

    @property
    def deployment_name(self) -> str:
        return self._deployment

    @property
    def app_name(self) -> str:
        return self._app

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment={self._deployment!r}, app={self._app!r}, method={self._options.method_name!r})"

    def __reduce__(self):
        return (DeploymentHandle, (self._deployment, self._app, self._methods, self._options))

    def options(self, **changes: Any) -> DeploymentHandle:
        """A new handle with some options replaced (see :class:`HandleOptions`)."""
        options = dataclasses.replace(self._options, **changes)
        if "method_name" in changes:
            self._check_method(options.method_name)
        return DeploymentHandle(self._deployment, self._app, self._methods, options)

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        handle = self._by_method.get(name)
        if handle is None:
            handle = self._by_method[name] = self.options(method_name=name)
        return handle

    def _check_method(self, name: str) -> MethodKind:
        try:
            return self._methods[name]
        except KeyError:
            raise UnknownMethodError(self._deployment, name, tuple(sorted(self._methods))) from None

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        """Start a call of the selected method; see the module docstring."""
        options = self._options
        kind = self._check_method(options.method_name)
        stream = kind.is_stream if options.stream is None else options.stream
        request_codec = codecs.get_codec(options.request_serialization)
        response_codec = codecs.get_codec(options.response_serialization)
        request = replica_pb2.CallRequest(
            method=options.method_name,
            codec=request_codec.name,
            response_codec=response_codec.name,
        )
        request.metadata[_wire.REQUEST_ID] = _wire.new_request_id()
        deadline = _deadline(options.request_timeout_s)
        if deadline is not None:
            request.metadata[_wire.DEADLINE] = repr(deadline)
        if options.multiplexed_model_id:
            request.metadata[_wire.MODEL_ID] = options.multiplexed_model_id
        if options.session_id:
            request.metadata[_wire.SESSION_ID] = options.session_id
        inputs = None
        if args and hasattr(args[0], "__aiter__"):
            # An async iterable first argument streams to the replica as it is produced.
            inputs, args = args[0].__aiter__(), args[1:]
        # By reference or by value: how arguments and results travel (objectstore/calls.py).
        wire = CallerWire(options, request_codec, response_codec)
        pending = _has_pending(args, kwargs)
        if not pending:
            # Encode here so a value the codec cannot take raises at the call site.
            request.args = wire.encode_args(args, kwargs)
        key: RouterKey = (self._app, self._deployment)
        deployment, method = self._deployment, options.method_name
        parent = spans.capture()

        def error(err: replica_pb2.RemoteError) -> Exception:
            return _wire.error_from_proto(err, deployment, method)

        async def begin() -> None:
            wire.begin(request.metadata)
            if pending:
                request.args = await wire.encode_pending(args, kwargs)

        def frames() -> DeploymentResponseGenerator:
            return open_frames(
                key, request, decode=wire.decode_items, error=error,
                inputs=inputs, encode_inputs=wire.encode_input, before=begin,
                # Whether every frame was read is not known here: clear what may be left.
                after=lambda: wire.end(complete=False), parent=parent, deadline=deadline,
                prefer_local=options.prefer_local_node,
            )

        if stream:
            return frames()

        if inputs is not None:

            async def call() -> Any:
                items = [item async for item in frames()]
                if len(items) != 1:
                    raise error(replica_pb2.RemoteError(type_name="ProtocolError", message=f"{len(items)} results"))
                return items[0]

        else:

            async def call() -> Any:
                complete = False
                try:
                    async with _timeout(deadline, deployment, method):
                        await begin()
                        reply = await router_for(key).unary(
                            request, parent=parent, prefer_local=options.prefer_local_node
                        )
                    if reply.HasField("error"):
                        complete = True
                        raise error(reply.error)
                    result = wire.receive(reply.value)
                    complete = True  # the reply carried all of the call's results
                    return result
                finally:
                    wire.end(complete)

        return DeploymentResponse(call(), wire.by_reference)


def open_frames(
    key: RouterKey,
    request: replica_pb2.CallRequest,
    *,
    decode: Callable[[bytes], list[Any]],
    error: Callable[[replica_pb2.RemoteError], Exception],
    inputs: AsyncIterator[Any] | None = None,
    encode_inputs: Callable[[list[Any]], bytes] | None = None,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[], None] | None = None,
    wait_s: float | None = None,
    parent: Any = None,
    deadline: float | None = None,
    prefer_local: bool = True,
    avoid: str = "",
) -> DeploymentResponseGenerator:
    """Start a streaming call of an encoded ``request`` on deployment ``key``.

    ``before`` runs first (e.g. to finish encoding the request) and ``after`` once the
    call is over, whether or not it opened; ``wait_s`` bounds the wait for a live
    replica; ``parent`` is the caller's trace context; past ``deadline`` (seconds since
    the epoch) reading fails with RequestTimeoutError; ``avoid`` is a replica to
    choose only when no other has room. Items come from
    ``decode(frame.items)``, errors from ``error(remote_error)``.
    """

    async def open_stream() -> FrameStream:
        try:
            if before is not None:
                await before()
            return await router_for(key).open_stream(
                request, inputs, encode_inputs, wait_s=wait_s, parent=parent, prefer_local=prefer_local,
                avoid=avoid,
            )
        except BaseException:
            if after is not None:
                after()
            raise

    def release(stream: FrameStream) -> None:
        router = router_for(key)
        router.release(stream.target)
        if stream.died:
            router.mark_dead(stream.target)
        if after is not None:
            after()

    return DeploymentResponseGenerator(
        open_stream(), decode, error, release,
        None if deadline is None else functools.partial(_timeout, deadline, key[1], request.method),
    )


def _deadline(timeout_s: float | None) -> float | None:
    """The call's deadline: its own timeout from now, or the one of the request being
    served, whichever comes first (a downstream call never outlives its caller's)."""
    inherited = current_deadline()
    own = time.time() + timeout_s if timeout_s is not None else None
    if own is None:
        return inherited
    return own if inherited is None else min(own, inherited)


@contextlib.asynccontextmanager
async def _timeout(deadline: float | None, deployment: str, method: str) -> AsyncIterator[None]:
    """Bound the block by ``deadline``; past it the block is cancelled and
    RequestTimeoutError raised."""
    if deadline is None:
        yield
        return
    try:
        async with asyncio.timeout(max(0.0, deadline - time.time())):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"call of {deployment}.{method} passed its deadline") from None


def _has_pending(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for value in args:
        if isinstance(value, DeploymentResponse):
            return True
    for value in kwargs.values():
        if isinstance(value, DeploymentResponse):
            return True
    return False
