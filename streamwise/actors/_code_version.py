"""A deployment's code version: whether a replica left running runs what a driver would start now.

The app's next driver takes a dead driver's replicas back, instead of replacing
them, only when each runs the code it would start itself (``controller``). Pickled
specs cannot tell: cloudpickle gives every class defined in ``__main__`` a new random
id in each process. So the version is a digest of what the replica is built from:

- the source of the user's modules loaded in the driver (those outside the standard
  library, the installed packages and streamwise), and streamwise's version;
- the deployment's class or function, by module and name;
- its spec: config, bound arguments (a handle by the deployment it names), gRPC
  servicer functions, tracing and public port; except what a running replica takes
  without a restart (``num_replicas``, ``autoscaling_config``, ``user_config``).

A spec with a value that pickle cannot write by reference or by value (a lambda, a
class made at run time) has no version, and its replicas are always replaced. A
change the driver cannot see (in a module only replicas import) is not noticed.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib.metadata
import os
import pickle
import sys
import sysconfig
from collections.abc import Mapping
from typing import Any

import streamwise
from streamwise.actors.spec import ReplicaSpec
from streamwise.routing.handle import DeploymentHandle

class _Unversioned(Exception):
    """A value of the spec cannot be written down the same way in another process."""


def code_version(spec: ReplicaSpec) -> str:
    """The code version of ``spec`` (hex digest); "" when it has none."""
    digest = hashlib.sha256()
    digest.update(_user_sources())
    try:
        # Without the config a running replica takes as it is (the controller applies it).
        config = dataclasses.replace(spec.config, num_replicas=None, autoscaling_config=None, user_config=None)
        _write(digest, dataclasses.replace(spec, config=config))
    except _Unversioned:
        return ""
    return digest.hexdigest()


def _user_sources() -> bytes:
    """A digest of the source of every user module loaded in this process."""
    paths = sysconfig.get_paths()
    outside = {
        os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths
    }
    outside.add(os.path.realpath(os.path.dirname(streamwise.__file__)))
    digest = hashlib.sha256(f"streamwise {_streamwise_version()}".encode())
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py"):
            continue
        real = os.path.realpath(path)
        if any(real.startswith(root + os.sep) for root in outside):
            continue
        try:
            with open(real, "rb") as source:
                digest.update(f"\0{name}\0".encode())
                digest.update(source.read())
        except OSError:
            digest.update(f"\0{name}\0unreadable".encode())
    return digest.digest()


def _streamwise_version() -> str:
    try:
        return importlib.metadata.version("streamwise")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _write(digest: Any, value: Any) -> None:
    """Feed ``value`` to ``digest`` so that equal values give equal bytes in any process."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"\0{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, DeploymentHandle):
        digest.update(f"\0handle:{value.app_name}/{value.deployment_name}".encode())
    elif isinstance(value, (list, tuple)):
        digest.update(f"\0{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _write(digest, item)
    elif isinstance(value, Mapping):
        digest.update(f"\0dict[{len(value)}]".encode())
        for key in sorted(value, key=repr):
            _write(digest, key)
            _write(digest, value[key])
    elif isinstance(value, enum.Enum):
        digest.update(f"\0enum:{type(value).__module__}.{type(value).__qualname__}.{value.name}".encode())
    elif isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        _write_named(digest, value)
    elif dataclasses.is_dataclass(value):
        digest.update(f"\0dataclass:{type(value).__module__}.{type(value).__qualname__}".encode())
        for field in dataclasses.fields(value):
            digest.update(f"\0{field.name}=".encode())
            _write(digest, getattr(value, field.name))
    else:
        try:  # by value: plain pickle is the same in every process for ordinary data
            digest.update(pickle.dumps(value, protocol=5))
        except Exception as exc:
            raise _Unversioned(repr(value)) from exc


def _write_named(digest: Any, value: Any) -> None:
    """A class or function, by where it is found: its code is in the sources' digest."""
    module = getattr(value, "__module__", None)
    qualname = value.__qualname__
    if not isinstance(module, str) or "<lambda>" in qualname or "<locals>" in qualname:
        raise _Unversioned(repr(value))
    digest.update(f"\0named:{module}.{qualname}".encode())
