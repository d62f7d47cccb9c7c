"""How streamwise's busy servers take their gRPC services: all in one generic handler.

grpc.aio's server keeps one pending request per *registered* method, plus one for
every other method, and each time a call arrives it waits on all of them again
(``asyncio.wait``): every registered method costs every call the server takes. A
replica's public listener registered eleven (the user's RPCs, Predict, health,
reflection, the ServeAPI), which made that wait a third of the Python work of a
small unary call outside the user's method. A generic handler instead costs one
dict lookup by the call's path. So these servers register no method: each service,
as its generated ``add_XServicer_to_server`` would add it, goes into one
:class:`Methods` handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc


class Recorder:
    """Stands in for a grpc server to record what an ``add_XServicer_to_server`` adds."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        # Generated code adds the same methods as a generic handler keyed by full path
        # too (older code only that): taken where no registered one is.
        for handler in handlers:
            for path, method in getattr(handler, "_method_handlers", {}).items():
                service, _, name = path.lstrip("/").rpartition("/")
                self.services.setdefault(service, {}).setdefault(name, method)


class Methods(grpc.GenericRpcHandler):
    """Every method of one server, by full path; ``fallback(path)`` answers the others
    (None: gRPC's UNIMPLEMENTED)."""

    def __init__(self, fallback: Callable[[str], grpc.RpcMethodHandler | None] | None = None) -> None:
        self._by_path: dict[str, grpc.RpcMethodHandler] = {}
        self._fallback = fallback

    def add(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._by_path[f"/{service}/{name}"] = handler

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """The methods ``add_to_server(servicer, server)`` would add to a server."""
        recorder = Recorder()
        add_to_server(servicer, recorder)
        for service, handlers in recorder.services.items():
            self.add(service, handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        found = self._by_path.get(path)
        if found is None and self._fallback is not None:
            return self._fallback(path)
        return found
