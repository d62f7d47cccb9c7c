"""This process's place in a store session: created by the driver, joined by replicas.

The driver creates the session lazily (first ``put()``, first by-reference call or
first replica start) and deletes all of its files at ``shutdown()``. A replica joins
the session its driver names on the command line and leaves when it exits; the last
process to leave a session whose driver was killed deletes its files.
"""

from __future__ import annotations

import os
import threading

from streamwise.config import env_transport_config
from streamwise.exceptions import ObjectLostError
from streamwise.objectstore import _session
from streamwise.objectstore._session import SESSION_BYTE, Session
from streamwise.objectstore._store import Store

_lock = threading.Lock()
_store: Store | None = None


def default_capacity() -> int:
    """30% of physical memory, at most the size of /dev/shm (where values live)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shm = os.statvfs(_session.SHM_DIR)
    return max(1, min(int(memory * 0.3), shm.f_blocks * shm.f_frsize))


def _capacity() -> int:
    configured = env_transport_config().object_store_memory
    return configured if configured is not None else default_capacity()


def current_store() -> Store:
    """This process's store; in a driver, creates the session on first use."""
    global _store
    store = _store
    if store is not None:
        return store
    with _lock:
        if _store is None:
            # A killed driver's session is found and removed by the next start.
            _session.cleanup_stale()
            _store = _new_store()
        return _store


def _new_store() -> Store:
    """A new session of this driver's; another name if one is taken or swept meanwhile."""
    for attempt in range(5):
        session = Session(Session.new_name(), _capacity())
        try:
            return Store(session, _session.create_lock(session), owner=True)
        except (FileExistsError, FileNotFoundError):
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def usage() -> tuple[int, int] | None:
    """(bytes used, capacity) of this process's session; None before it has one."""
    store = _store
    if store is None:
        return None
    return store.session.usage()[0], store.session.capacity


def session_name() -> str:
    """The name replicas started by this driver join (creates the session if needed)."""
    return current_store().session.name


def join_session(name: str) -> None:
    """Join the driver's session ``name`` (in a replica, before serving)."""
    global _store
    session = Session(name, _capacity())
    try:
        session.check_private()
        fd = os.open(session.lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ObjectLostError(name, "the driver's object store session is gone") from None
    except PermissionError as exc:
        raise ObjectLostError(name, f"the object store session is not this user's own: {exc}") from None
    _session.lock_byte(fd, SESSION_BYTE)
    with _lock:
        _store = Store(session, fd, owner=False)


def close_session(driver_gone: bool = False) -> None:
    """Leave (replica) or end (driver) this process's session; idempotent.

    ``driver_gone`` (replicas): the driver is dying; see ``Store.close``.

    Values still referenced in this process stay readable (their mappings and
    descriptors live on) but can no longer be sent to other processes.
    """
    global _store
    with _lock:
        store, _store = _store, None
    if store is not None:
        store.close(driver_gone)


def reclaim() -> None:
    """Free what exited processes of this session left behind (called by the
    controller whenever a replica process exits, before a replacement starts)."""
    store = _store
    if store is not None:
        store.reclaim()
