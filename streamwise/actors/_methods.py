"""What kind of call each method of a deployment is, decided once at decoration time."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from streamwise.config import CoalesceConfig

# Set by @streamwise.coalesce on a generator function: the frames policy of its streams.
COALESCE_ATTR = "__streamwise_coalesce__"


class MethodKind(enum.Enum):
    ASYNC = "async"  # async def -> awaited on the replica loop
    SYNC = "sync"  # def -> run in the replica's thread pool
    ASYNC_GEN = "async_gen"  # async def ... yield -> stream
    SYNC_GEN = "sync_gen"  # def ... yield -> stream, each step in the thread pool

    @property
    def is_stream(self) -> bool:
        return self in (MethodKind.ASYNC_GEN, MethodKind.SYNC_GEN)


def kind_of(fn: Callable[..., Any]) -> MethodKind:
    target = fn.__func__ if inspect.ismethod(fn) else fn
    # functools.wraps-style decorators (e.g. @batch) keep the kind of what they wrap
    # unless they declare their own.
    declared = getattr(target, "__streamwise_kind__", None)
    if declared is not None:
        return MethodKind(declared)
    if inspect.isasyncgenfunction(target):
        return MethodKind.ASYNC_GEN
    if inspect.iscoroutinefunction(target):
        return MethodKind.ASYNC
    if inspect.isgeneratorfunction(target):
        return MethodKind.SYNC_GEN
    return MethodKind.SYNC


def methods_of(target: type | Callable[..., Any]) -> Mapping[str, MethodKind]:
    """Public methods of a deployment class (or ``__call__`` of a function deployment)."""
    if not isinstance(target, type):
        return {"__call__": kind_of(target)}
    found: dict[str, MethodKind] = {}
    for name, member in inspect.getmembers(target):
        if name.startswith("_") and name != "__call__":
            continue
        if name in ("reconfigure", "check_health"):
            continue
        if inspect.isfunction(member) or inspect.ismethod(member):
            found[name] = kind_of(member)
    return found


def coalesce_of(fn: Callable[..., Any], default: CoalesceConfig) -> CoalesceConfig:
    """The frames policy of a (bound) method: its ``@coalesce`` if any, else ``default``."""
    return getattr(fn, COALESCE_ATTR, None) or default
