"""What ``handle.method.remote(...)`` returns: a response, or a generator of items.

A call starts as soon as ``remote()`` returns, as a task on the process's core loop
(where all gRPC work happens). Code running on the core loop (user code in a
replica) awaits that task directly; code on any other event loop awaits it through a
thread-safe future, and sync code blocks on it with ``.result()`` / plain ``for``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from streamwise.actors._runtime import RUNTIME
from streamwise.exceptions import RequestTimeoutError, UsageError
from streamwise.objectstore import calls
from streamwise.objectstore.ref import ObjectRef
from streamwise.routing.transport import FrameStream

T = TypeVar("T")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _core_loop() -> asyncio.AbstractEventLoop:
    loop = RUNTIME.core_loop
    if loop is None or loop.is_closed():
        raise UsageError("streamwise is not running; call streamwise.run() first")
    return loop


class _Started(Generic[T]):
    """A coroutine started on some loop, awaitable from any loop or thread."""

    __slots__ = ("loop", "task", "future")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        try:
            self.loop = _core_loop()
        except BaseException:
            coro.close()
            raise
        if _running_loop() is self.loop:
            self.task: asyncio.Task[T] | None = self.loop.create_task(coro)
            self.future: concurrent.futures.Future[T] | None = None
        else:
            # Started from another thread or loop: the task is made on the core loop and
            # kept (so a cancel on that loop can see whether it already finished), and its
            # outcome is copied to a thread-safe future.
            self.task = None
            self.future = concurrent.futures.Future()
            self.loop.call_soon_threadsafe(self._start, coro)

    def _start(self, coro: Coroutine[Any, Any, T]) -> None:
        future = self.future
        assert future is not None
        if future.cancelled():
            coro.close()
            return
        task = self.task = self.loop.create_task(coro)
        # Callbacks that do not reference self: no cycle keeps a result alive.
        task.add_done_callback(functools.partial(_settle, future))
        future.add_done_callback(functools.partial(_cancel_task, self.loop, task))

    async def wait(self) -> T:
        loop = asyncio.get_running_loop()
        if self.task is not None and loop is self.loop:
            return await self.task
        if self.task is not None:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_await(self.task), self.loop))
        assert self.future is not None
        return await asyncio.wrap_future(self.future)

    def block(self, timeout_s: float | None) -> T:
        if _running_loop() is not None:
            raise UsageError(
                "result() would block the event loop it is called on; use `await response` instead"
            )
        future = self.future
        if future is None:
            assert self.task is not None
            future = asyncio.run_coroutine_threadsafe(_await(self.task), self.loop)
        try:
            return future.result(timeout_s)
        except RequestTimeoutError:
            raise  # the call's own deadline passed (request_timeout_s)
        except concurrent.futures.TimeoutError:
            raise RequestTimeoutError(f"no result within {timeout_s}s") from None

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()
        elif self.task is not None:
            if _running_loop() is self.loop:
                self.task.cancel()
            else:
                self.loop.call_soon_threadsafe(self.task.cancel)

    def done(self) -> bool:
        return (self.future or self.task).done()  # type: ignore[union-attr]


def _settle(future: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    """Copy ``task``'s outcome to ``future`` (unless it was cancelled meanwhile)."""
    try:
        if task.cancelled():
            future.cancel()
        elif (error := task.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(task.result())
    except concurrent.futures.InvalidStateError:
        pass


def _cancel_task(loop: asyncio.AbstractEventLoop, task: asyncio.Task[T], future: concurrent.futures.Future[T]) -> None:
    if future.cancelled() and not task.done():
        loop.call_soon_threadsafe(task.cancel)


async def _await(task: asyncio.Task[T]) -> T:
    """Await ``task`` from a helper task; cancelling the helper cancels ``task`` too."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        raise


_UNSET: Any = object()


class DeploymentResponse(Generic[T]):
    """The pending result of a unary call.

    ``await response`` in async code, ``response.result()`` in sync code. Cancelling
    the awaiting task, or calling :meth:`cancel`, cancels the call on the replica.
    A by-reference call's result is decoded where it is awaited, not before: passed
    to another handle call, it travels on as a ref without being decoded here.
    """

    __slots__ = ("_started", "_by_reference", "_value")

    def __init__(self, coro: Coroutine[Any, Any, Any], by_reference: bool = False) -> None:
        self._started = _Started(coro)
        self._by_reference = by_reference
        self._value: Any = _UNSET

    def _decoded(self, raw: Any) -> T:
        if self._value is _UNSET:
            self._value = calls.decode_result(raw) if self._by_reference else raw
        return self._value

    async def _raw(self) -> Any:
        """The call's result as received (a by-reference call's undecoded envelope)."""
        return await self._started.wait()

    async def _wait(self) -> T:
        return self._decoded(await self._started.wait())

    def __await__(self):
        return self._wait().__await__()

    def result(self, timeout_s: float | None = None) -> T:
        """Block until the result is in. Raises RequestTimeoutError after ``timeout_s``
        (the call keeps running; cancel it with :meth:`cancel`)."""
        return self._decoded(self._started.block(timeout_s))

    def _to_object_ref(self) -> Awaitable[ObjectRef]:
        """``await response._to_object_ref()``: the ObjectRef of the result, without
        decoding it. By-reference handles only. Cancelling this await does what
        cancelling ``await response`` does."""
        self._require_by_reference()
        return self._object_ref()

    def _to_object_ref_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """:meth:`_to_object_ref` for sync code; RequestTimeoutError after ``timeout_s``."""
        self._require_by_reference()
        return calls.object_ref_of(self._started.block(timeout_s))

    async def _object_ref(self) -> ObjectRef:
        return calls.object_ref_of(await self._started.wait())

    def _require_by_reference(self) -> None:
        if not self._by_reference:
            raise UsageError(
                "_to_object_ref() needs a by-reference handle; this call was made by value "
                "(by_reference=False or STREAMWISE_USE_GRPC_BY_DEFAULT=1): use "
                "handle.options(by_reference=True)"
            )

    def cancel(self) -> None:
        """Cancel the call; awaiting it afterwards raises ``asyncio.CancelledError``."""
        self._started.cancel()

    def done(self) -> bool:
        return self._started.done()


class DeploymentResponseGenerator(Generic[T]):
    """The items a streaming call yields, delivered as they are produced.

    Iterate with ``async for`` in async code or ``for`` in sync code. Stopping early
    cancels the remote generator (its ``finally`` runs): leave an ``async with`` /
    ``with`` block, call :meth:`aclose` / :meth:`close` or :meth:`cancel`, or drop the
    last reference to the generator.
    """

    def __init__(
        self,
        open_coro: Coroutine[Any, Any, FrameStream],
        decode: Callable[[bytes], list[Any]],
        error: Callable[[Any], Exception],
        release: Callable[[FrameStream], None],
        bounded: Callable[[], Any] | None = None,
    ) -> None:
        self._bounded = bounded  # makes the async context that bounds each read by the deadline
        self._items: deque[Any] = deque()
        self._decode = decode
        self._error = error
        self._release = release
        self._stream: FrameStream | None = None
        self._finished = False
        self._pending_error: Exception | None = None
        self._opening = _Started(open_coro)

    # -- reading frames (always on the loop that owns the call) ------------------------

    async def _fill(self) -> bool:
        """Read frames until some items are buffered; False at the end of the stream."""
        if self._bounded is None:
            return await self._fill_now()
        async with self._bounded():
            return await self._fill_now()

    async def _fill_now(self) -> bool:
        if self._finished:
            return False
        try:
            if self._stream is None:
                self._stream = await self._opening.wait()
            while not self._items:
                frame = await self._stream.read()
                if frame is None:
                    self._finish()
                    return False
                if frame.count:
                    self._items.extend(self._decode(frame.items))
                if frame.HasField("error"):
                    self._stream.cancel()  # an error frame is the last: end the call now
                    self._finish()
                    if self._items:
                        # deliver items sent before the error, then the error
                        self._pending_error = self._error(frame.error)
                        return True
                    raise self._error(frame.error)
            return True
        except BaseException:
            self._cancel_here()
            raise

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._stream is not None:
                self._release(self._stream)

    def _cancel_here(self) -> None:
        """Cancel the call; must run on the owning loop's thread."""
        if self._finished:
            return
        stream = self._stream
        task = self._opening.task
        if stream is None and task is not None and task.done():
            if not task.cancelled() and task.exception() is None:
                stream = self._stream = task.result()
        if stream is not None:
            stream.cancel()
            self._finish()
            return
        self._finished = True
        if task is None:
            self._opening.cancel()  # not started yet: it never will be
        else:
            task.cancel()
            # It may still finish opening in this loop iteration: close what it opened.
            task.add_done_callback(self._close_late)

    def _close_late(self, task: asyncio.Task[FrameStream]) -> None:
        if not task.cancelled() and task.exception() is None:
            stream = task.result()
            stream.cancel()
            self._release(stream)

    def _take(self) -> T:
        if not self._items:
            error, self._pending_error = self._pending_error, None
            if error is not None:
                raise error
        return self._items.popleft()

    def _take_chunk(self) -> list[T]:
        # _fill stops at the first frame with items, so what is buffered is one frame
        # (or what per-item iteration left of one).
        if not self._items:
            self._take()  # raises the pending error
        chunk = list(self._items)
        self._items.clear()
        return chunk

    def chunks(self) -> _Chunks[T]:
        """The stream as lists of items, one list per wire frame (never empty).

        ``async for chunk in response.chunks()`` (or plain ``for``) trades per-item
        handling for throughput; how items are grouped follows the method's
        ``@coalesce`` policy. Stopping early cancels the remote generator, as with
        per-item iteration.
        """
        return _Chunks(self)

    # -- async iteration -----------------------------------------------------------

    def __aiter__(self) -> DeploymentResponseGenerator[T]:
        return self

    async def __anext__(self) -> T:
        if not self._items:
            if self._pending_error is not None:
                return self._take()
            if not await self._on_owner(self._fill()):
                raise StopAsyncIteration
        return self._take()

    async def _on_owner(self, coro: Coroutine[Any, Any, bool]) -> bool:
        loop = self._opening.loop
        if asyncio.get_running_loop() is loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def aclose(self) -> None:
        """Stop the stream and cancel the remote generator."""
        self.cancel()

    async def __aenter__(self) -> DeploymentResponseGenerator[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    # -- sync iteration --------------------------------------------------------------

    def __iter__(self) -> DeploymentResponseGenerator[T]:
        return self

    def __next__(self) -> T:
        if not self._items and self._pending_error is None:
            loop = self._opening.loop
            if _running_loop() is not None:
                raise UsageError("a plain `for` would block this event loop; use `async for` instead")
            if not asyncio.run_coroutine_threadsafe(self._fill(), loop).result():
                raise StopIteration
        return self._take()

    def close(self) -> None:
        """Stop the stream and cancel the remote generator."""
        self.cancel()

    def __enter__(self) -> DeploymentResponseGenerator[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    # -- cancellation ----------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel the remote generator, from any thread. Idempotent."""
        if self._finished:
            return
        loop = self._opening.loop
        if _running_loop() is loop:
            self._cancel_here()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_here)

    def __del__(self) -> None:
        try:
            if not self._finished:
                self.cancel()
        except Exception:  # interpreter shutdown: the loop may be gone
            pass


class _Chunks(Generic[T]):
    """Iterator over the frames of a :class:`DeploymentResponseGenerator`."""

    __slots__ = ("_gen",)

    def __init__(self, gen: DeploymentResponseGenerator[T]) -> None:
        self._gen = gen

    def __aiter__(self) -> _Chunks[T]:
        return self

    async def __anext__(self) -> list[T]:
        gen = self._gen
        if not gen._items and gen._pending_error is None:
            if not await gen._on_owner(gen._fill()):
                raise StopAsyncIteration
        return gen._take_chunk()

    def __iter__(self) -> _Chunks[T]:
        return self

    def __next__(self) -> list[T]:
        gen = self._gen
        if not gen._items and gen._pending_error is None:
            if _running_loop() is not None:
                raise UsageError("a plain `for` would block this event loop; use `async for` instead")
            if not asyncio.run_coroutine_threadsafe(gen._fill(), gen._opening.loop).result():
                raise StopIteration
        return gen._take_chunk()

    async def aclose(self) -> None:
        """Stop the stream and cancel the remote generator."""
        self._gen.cancel()

    def close(self) -> None:
        """Stop the stream and cancel the remote generator."""
        self._gen.cancel()
