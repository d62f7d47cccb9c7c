"""Which external RPCs the ingress serves, and how each maps onto a deployment method.

Both ends use this table: the ingress (to know each RPC's cardinality, without ever
decoding a message) and the ingress deployment's replicas (to decode requests and
encode responses with the user's generated message classes). The table is read off
the generated ``add_XServicer_to_server`` functions by letting them register with a
recording stand-in for a server.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from streamwise.exceptions import UsageError
from streamwise.proto import predict_pb2, predict_pb2_grpc
from streamwise.streaming._services import Recorder

BUILTIN_SERVICE = "streamwise.PredictAPIsService"


@dataclasses.dataclass(frozen=True, slots=True)
class RpcMethod:
    """One external RPC and the deployment method that serves it."""

    path: str  # "/package.Service/Method"
    service: str
    target: str  # method name on the ingress deployment
    client_streaming: bool
    server_streaming: bool
    decode: Callable[[bytes], Any]  # request bytes -> what the method receives
    encode: Callable[[Any], bytes]  # what the method returns/yields -> response bytes


class _AnyServicer:
    """Stands in for a servicer: every attribute is some callable."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def resolve_servicer_function(fn: Any) -> Callable[..., Any]:
    """An add_XServicer_to_server callable, importing ``"module:function"`` strings."""
    if callable(fn):
        return fn
    module_name, _, attr = str(fn).partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load servicer function {fn!r}: {exc}") from exc


def _builtin(methods: Mapping[str, Any]) -> dict[str, RpcMethod]:
    def decode(raw: bytes) -> dict[str, bytes]:
        return dict(predict_pb2.PredictRequest.FromString(raw).input)

    def encode(value: Any) -> bytes:
        return predict_pb2.PredictResponse(prediction=bytes(value)).SerializeToString()

    stream_target = "predict_stream" if "predict_stream" in methods else "__call__"
    return {
        f"/{BUILTIN_SERVICE}/Predict": RpcMethod(
            f"/{BUILTIN_SERVICE}/Predict", BUILTIN_SERVICE, "__call__", False, False, decode, encode
        ),
        f"/{BUILTIN_SERVICE}/PredictStream": RpcMethod(
            f"/{BUILTIN_SERVICE}/PredictStream", BUILTIN_SERVICE, stream_target, False, True, decode, encode
        ),
    }


def rpc_table(servicer_functions: Iterable[Any], methods: Mapping[str, Any] = {}) -> dict[str, RpcMethod]:
    """Every RPC served: the built-in Predict service plus the given services.

    ``methods`` are the ingress deployment's methods (they decide which method serves
    PredictStream); pass none where only the RPCs' shapes matter.
    """
    table = _builtin(methods)
    recorder = Recorder()
    for fn in servicer_functions:
        resolve_servicer_function(fn)(_AnyServicer(), recorder)
    for service, handlers in recorder.services.items():
        for name, handler in handlers.items():
            path = f"/{service}/{name}"
            table[path] = RpcMethod(
                path,
                service,
                name,
                bool(handler.request_streaming),
                bool(handler.response_streaming),
                handler.request_deserializer,
                handler.response_serializer,
            )
    return table


def service_names(table: Mapping[str, RpcMethod]) -> list[str]:
    return sorted({m.service for m in table.values()})


# Imported for its side effect too: the built-in service's descriptors enter the
# default pool, where server reflection finds them.
_ = predict_pb2_grpc
