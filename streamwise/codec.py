"""Serializers used on the internal wire: cloudpickle (default), pickle, msgpack, orjson.

A codec turns one Python value into bytes and back. cloudpickle and pickle carry any
picklable value (cloudpickle also functions and classes defined in ``__main__``);
msgpack and orjson carry only plain data (None, bool, int, float, str, lists, dicts;
msgpack also bytes) but are faster and never execute code on load. Every codec raises
:class:`~streamwise.exceptions.SerializationError` naming itself when it cannot handle
a value.

Code pickled by value (functions and classes of ``__main__``, of test modules, or
defined inside functions) keeps its file name: :class:`CloudPickler` carries each code
object as ``marshal`` writes it, so a replica's traceback names the user's file and
line and shows the source line. cloudpickle 3.1.3 and later write ``<dynamic-code>``
there instead, which is deterministic but leaves remote tracebacks unreadable.
"""

from __future__ import annotations

import io
import marshal
import pickle
import types
from collections import ChainMap
from typing import Any, Protocol

import cloudpickle
import msgpack
import orjson

from streamwise.exceptions import SerializationError, UsageError

__all__ = ["Codec", "CODECS", "CloudPickler", "cloudpickle_dumps", "get_codec"]

_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    # marshal keeps every field of a code object (co_filename included) and is what
    # CPython itself stores code with; the reading process runs the same interpreter,
    # as cloudpickle's own reduction already requires. A code object marshal cannot
    # write (one built by hand with odd constants) goes cloudpickle's way.
    try:
        return marshal.loads, (marshal.dumps(code),)
    except ValueError:
        return _cloudpickle_code_reduce(code)


class CloudPickler(cloudpickle.Pickler):
    """cloudpickle's pickler, keeping the file name of every code object it carries."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def cloudpickle_dumps(value: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """``cloudpickle.dumps`` through :class:`CloudPickler`."""
    with io.BytesIO() as file:
        CloudPickler(file, protocol=protocol).dump(value)
        return file.getvalue()


class Codec(Protocol):
    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class _CloudpickleCodec:
    name = "cloudpickle"

    def dumps(self, value: Any) -> bytes:
        try:
            return cloudpickle_dumps(value)
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
