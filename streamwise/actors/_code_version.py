"""A deployment's code version: whether a replica left running runs what a driver would start now.

The app's next driver takes a dead driver's replicas back, instead of replacing
them, only when each runs the code it would start itself (``controller``). Pickled
specs cannot tell: cloudpickle gives every class defined in ``__main__`` a new random
id in each process. So the version is a digest of what the replica is built from:

- the files of the user's modules loaded in the driver (those outside the standard
  library and the installed packages), whatever their kind; for a ``__main__`` held
  by no file (``python -c``, a notebook), the source of each class and function in it;
- Python's version, streamwise's own source, and the name and version of each
  installed distribution these modules use (a module, class or function of it is
  among their names);
- the deployment's class or function, by module and name;
- its spec: config, bound arguments (a handle by the deployment it names), gRPC
  servicer functions, tracing and public port; except what a running replica takes
  as it is: ``num_replicas``, ``autoscaling_config``, and ``user_config`` (only
  whether there is one counts: a replica cannot be told to drop its own).

There is no version (the replicas are always replaced, never taken back) when that
cannot be read the same way in another process: a value pickle cannot write by
reference or by value (a lambda, a class made at run time), a source that cannot be
read, or a user file changed since this process started (what runs may not be what
the file says now). A change the driver cannot see (a module only replicas import)
is not noticed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import pathlib
import pickle
import sys
import sysconfig
import time
from collections.abc import Mapping
from typing import Any

import streamwise
from streamwise.actors.spec import ReplicaSpec
from streamwise.routing.handle import DeploymentHandle

log = logging.getLogger("streamwise.controller")

_STARTED = time.time()  # about when this process started: streamwise is imported early
_STREAMWISE = pathlib.Path(streamwise.__file__).resolve().parent


class _Unversioned(Exception):
    """Something cannot be written down the same way in another process."""


def code_version(spec: ReplicaSpec) -> str:
    """The code version of ``spec`` (hex digest); "" when it has none."""
    digest = hashlib.sha256()
    try:
        used: set[str] = set()
        digest.update(_user_sources(used))
        digest.update(_environment(used))
        config = dataclasses.replace(
            spec.config, num_replicas=None, autoscaling_config=None, user_config=spec.config.user_config is not None
        )
        _write(digest, dataclasses.replace(spec, config=config))
    except _Unversioned as exc:
        log.info("deployment %r has no code version (%s): it is never taken back", spec.config.name, exc)
        return ""
    except Exception:  # never fail a start for it: such replicas are replaced
        log.exception("deployment %r has no code version: it is never taken back", spec.config.name)
        return ""
    return digest.hexdigest()


def _outside() -> tuple[str, ...]:
    """Where the standard library and installed packages live."""
    paths = sysconfig.get_paths()
    return tuple(
        os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths
    )


@functools.cache
def _streamwise_sources() -> bytes:
    digest = hashlib.sha256()
    for path in sorted(_STREAMWISE.rglob("*.py")):
        digest.update(str(path.relative_to(_STREAMWISE)).encode())
        digest.update(path.read_bytes())
    return digest.digest()


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Installed distributions by the top-level modules they provide."""
    return importlib.metadata.packages_distributions()


def _environment(used: set[str]) -> bytes:
    """Python's version, streamwise's source, and the installed distributions of the
    top-level modules ``used``."""
    digest = hashlib.sha256(sys.version.encode())
    digest.update(_streamwise_sources())
    names = {dist for top in used for dist in _distributions().get(top, ())}
    for name in sorted(names):
        try:
            digest.update(f"\0{name}=={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"\0{name}".encode())
    return digest.digest()


def _user_sources(used: set[str]) -> bytes:
    """A digest of every user module loaded in this process; adds to ``used`` the
    top-level modules whose modules, classes or functions they hold."""
    outside = _outside()
    digest = hashlib.sha256()
    for name, module in sorted(list(sys.modules.items())):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            if name == "__main__":  # no file holds it: what it defines, from its source
                _write_main(digest, module)
                used.update(_uses(module))
            continue
        real = os.path.realpath(path)
        if real.startswith(outside) or real.startswith(str(_STREAMWISE) + os.sep):
            continue
        used.update(_uses(module))
        try:
            if os.stat(real).st_mtime > _STARTED:
                raise _Unversioned(f"{path} changed since this process started")
            with open(real, "rb") as source:
                digest.update(f"\0{name}\0".encode())
                digest.update(source.read())
        except OSError as exc:
            raise _Unversioned(f"cannot read {path}") from exc
    return digest.digest()


def _uses(module: Any) -> set[str]:
    """The top-level modules of what ``module``'s names hold."""
    found = set()
    for value in list(vars(module).values()):
        source = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(source, str):
            found.add(source.partition(".")[0])
    return found


def _write_main(digest: Any, module: Any) -> None:
    for name, value in sorted(vars(module).items()):
        if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == "__main__":
            try:
                digest.update(f"\0__main__.{name}\0{inspect.getsource(value)}".encode())
            except (OSError, TypeError) as exc:
                raise _Unversioned(f"no source for __main__.{name}") from exc


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
    elif inspect.ismethod(value):
        digest.update(f"\0method:{value.__name__}".encode())
        _write(digest, value.__self__)
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
            raise _Unversioned(f"cannot pickle {type(value).__qualname__}") from exc


def _write_named(digest: Any, value: Any) -> None:
    """A class or function, by where it is found: its code is in the sources' digest,
    or, defined where no file holds it (``python -c``, a notebook), its own source."""
    module = getattr(value, "__module__", None)
    qualname = value.__qualname__
    if not isinstance(module, str) or "<lambda>" in qualname or "<locals>" in qualname:
        raise _Unversioned(f"{qualname} is not found by name")
    digest.update(f"\0named:{module}.{qualname}".encode())
    if module not in sys.builtin_module_names and not isinstance(getattr(sys.modules.get(module), "__file__", None), str):
        try:
            digest.update(inspect.getsource(value).encode())
        except (OSError, TypeError) as exc:
            raise _Unversioned(f"no source for {module}.{qualname}") from exc
