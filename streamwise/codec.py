"""Serializers used on the internal wire: cloudpickle (default), pickle, msgpack, orjson.

A codec turns one Python value into bytes and back. cloudpickle and pickle carry any
picklable value (cloudpickle also functions and classes defined in ``__main__``);
msgpack and orjson carry only plain data (None, bool, int, float, str, lists, dicts;
msgpack also bytes) but are faster and never execute code on load. Every codec raises
:class:`~streamwise.exceptions.SerializationError` naming itself when it cannot handle
a value.
"""

from __future__ import annotations

import pickle
from typing import Any, Protocol

import cloudpickle
import msgpack
import orjson

from streamwise.exceptions import SerializationError, UsageError

__all__ = ["Codec", "CODECS", "get_codec"]


class Codec(Protocol):
    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class _CloudpickleCodec:
    name = "cloudpickle"

    def dumps(self, value: Any) -> bytes:
        try:
            return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc


class _PickleCodec(_CloudpickleCodec):
    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc


class _MsgpackCodec:
    name = "msgpack"

    def dumps(self, value: Any) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc


class _OrjsonCodec:
    name = "orjson"

    def dumps(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except Exception as exc:
            raise SerializationError(self.name, f"{type(exc).__name__}: {exc}") from exc


CODECS: dict[str, Codec] = {
    c.name: c for c in (_CloudpickleCodec(), _PickleCodec(), _MsgpackCodec(), _OrjsonCodec())
}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``; UsageError listing the known names otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None
