"""Model multiplexing: many models served by a few replicas, each holding some of them.

``@streamwise.multiplexed(max_num_models_per_replica=3)`` on an async method that
loads one model by id makes it a per-replica LRU cache: ``await self.get_model(id)``
returns the loaded model, loading it on a miss (callers of the same id share one
load) and evicting the least recently used beyond the limit, whose ``unload()`` is
then called (awaited if async) if it has one. Calls carry their model id in the
``multiplexed_model_id`` metadata (``handle.options(multiplexed_model_id=...)``, or
an ingress client's metadata); ``streamwise.get_multiplexed_model_id()`` reads it.

Each replica reports the ids it holds to the controller whenever they change, and
the controller pushes them to every router, which sends a call to a replica holding
its model first, then to one with a free model slot, then to any (``routing.router``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from streamwise.exceptions import UsageError
from streamwise.streaming.context import get_request_context

log = logging.getLogger("streamwise.multiplex")

DEFAULT_MAX_NUM_MODELS_PER_REPLICA = 3

# Every cache of this process, and who to tell when what they hold changes.
_caches: weakref.WeakSet[_ModelCache] = weakref.WeakSet()
_listener: Callable[[], None] | None = None


def get_multiplexed_model_id() -> str:
    """The model id of the call being served ("" when the caller gave none)."""
    return get_request_context().multiplexed_model_id


def set_listener(listener: Callable[[], None] | None) -> None:
    """Call ``listener()`` (on the replica's loop) whenever a cache's models change."""
    global _listener
    _listener = listener


def held() -> list[str]:
    """Ids of the models this process holds, most recently used last."""
    return [model_id for cache in list(_caches) for model_id in cache.model_ids]


def capacity_of(user_object: object) -> int:
    """Model slots of ``user_object``: the sum over its @multiplexed methods (0: none)."""
    return sum(
        getattr(member, "__streamwise_multiplexed__", 0) for member in vars(type(user_object)).values()
    )


async def _unload(model_id: str, model: Any) -> None:
    unload = getattr(model, "unload", None)
    if not callable(unload):
        return
    try:
        result = unload()
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("unload() of model %r raised", model_id)


class _ModelCache:
    """The models one replica holds for one multiplexed method, least recently used first."""

    def __init__(self, load: Callable[[str], Awaitable[Any]], capacity: int) -> None:
        self._load = load
        self.capacity = capacity
        self._models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future[Any]] = {}
        _caches.add(self)

    @property
    def model_ids(self) -> list[str]:
        return list(self._models)

    async def get(self, model_id: str) -> Any:
        """The model ``model_id``, loaded if need be. Cancelling a caller leaves the
        load running: other callers share it, and later calls find the model."""
        if model_id in self._models:
            self._models.move_to_end(model_id)
            return self._models[model_id]
        loading = self._loading.get(model_id)
        if loading is None:
            loading = self._loading[model_id] = asyncio.ensure_future(self._load_one(model_id))
        return await asyncio.shield(loading)

    async def _load_one(self, model_id: str) -> Any:
        try:
            model = await self._load(model_id)
        finally:
            self._loading.pop(model_id, None)
        self._models[model_id] = model
        evicted = []
        while len(self._models) > self.capacity:
            evicted.append(self._models.popitem(last=False))
        if _listener is not None:
            _listener()
        for old_id, old in evicted:
            await _unload(old_id, old)
        return model


def multiplexed(
    func: Callable[..., Awaitable[Any]] | None = None, *, max_num_models_per_replica: int = DEFAULT_MAX_NUM_MODELS_PER_REPLICA
) -> Any:
    """Make an async ``load(self, model_id)`` method a per-replica LRU cache of models.

    ``await self.load(model_id)`` (or ``await self.load()``: the current call's
    model id) returns the model. See the module's docstring.
    """
    if not (isinstance(max_num_models_per_replica, int) and not isinstance(max_num_models_per_replica, bool)
            and max_num_models_per_replica >= 1):
        raise UsageError(f"max_num_models_per_replica must be an int >= 1, got {max_num_models_per_replica!r}")

    def wrap(load: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        if not inspect.iscoroutinefunction(load):
            raise UsageError(f"@multiplexed needs an async def method loading one model, got {load!r}")
        params = list(inspect.signature(load).parameters)
        if len(params) != 2:
            raise UsageError(
                f"@multiplexed method {load.__qualname__} must take (self, model_id), takes ({', '.join(params)})"
            )
        attribute = f"_streamwise_models_{load.__name__}"

        @functools.wraps(load)
        async def get(self: Any, model_id: str | None = None) -> Any:
            if model_id is None:
                model_id = get_multiplexed_model_id()
            if not isinstance(model_id, str) or not model_id:
                raise UsageError(
                    f"{load.__qualname__} needs a model id: pass one, or call it while serving a call made "
                    "with handle.options(multiplexed_model_id=...) or the multiplexed_model_id metadata"
                )
            cache = self.__dict__.get(attribute)
            if cache is None:
                cache = self.__dict__[attribute] = _ModelCache(
                    functools.partial(load, self), max_num_models_per_replica
                )
            return await cache.get(model_id)

        get.__streamwise_multiplexed__ = max_num_models_per_replica  # type: ignore[attr-defined]
        return get

    if func is not None:
        return wrap(func)
    return wrap
