"""The files of one store session in /dev/shm, and the rules that free them.

A *session* is the store of one driver and its replicas. Its files live in a
directory of their own, ``/dev/shm/streamwise-<driver pid>-<token>/``, made with mode
0700 (files 0600): no other user can read, plant or remove anything in it, so what
the session lists and opens there is always its own. A later start, or ``streamwise
cleanup``, finds what a killed driver left behind by these names, and looks only at
directories of this user::

    lock                          session lock: each live process of the session holds a
                                  read lock on byte 0; an *anchor* is a read lock on
                                  another byte, held by a caller while its calls run
    lock-init                     the lock of a session being created, until it is held
    o-<segment>-<size>            a segment: one stored part of a value
    n-<anchor>-<call>-<seq>-<segment>-<size>
                                  a pin: a hard link to a segment that keeps it alive while
                                  a result naming it travels to call <call> of <anchor>
    p-<size>-<tag>                a pooled file: a freed segment kept, pages allocated, for
                                  reuse (allocating tmpfs pages costs ~10x a memcpy)
    t-<pid>-<tag>-<size>          a segment being written by process <pid>

Lifetime rule: a segment is alive while some process holds a shared ``flock`` on it
(a *hold*) or a pin links it. Whoever drops the last hold or pin frees it: it takes
an exclusive flock without waiting; if it gets one and the segment has no other link,
no process can still be using it. Kernel locks vanish with their process, so a
killed process never keeps a segment alive; its names are swept by :func:`reclaim`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import struct
import threading
from collections.abc import Iterator

SHM_DIR = "/dev/shm"
NAME_PREFIX = "streamwise-"
PAGE = os.sysconf("SC_PAGE_SIZE")

# struct flock for F_OFD_* commands (Linux, 64-bit off_t): type, whence, start, len, pid.
_FLOCK = struct.Struct("hhqqi4x")
SESSION_BYTE = 0  # read-locked by every live process of the session


def _ofd(fd: int, command: int, kind: int, start: int) -> bytes:
    return fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))


def lock_byte(fd: int, start: int) -> None:
    """Read-lock one byte through ``fd``'s open file description (never blocks long)."""
    _ofd(fd, fcntl.F_OFD_SETLKW, fcntl.F_RDLCK, start)


def unlock_byte(fd: int, start: int) -> None:
    _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start)


def lock_byte_exclusive(fd: int, start: int, timeout_s: float) -> bool:
    """Write-lock one byte, waiting up to ``timeout_s`` for other holders to let go.

    The wait is a blocking ``fcntl`` on a daemon thread, so it ends the moment the
    last other holder's process releases the byte (or exits); on timeout the thread
    is left blocked and dies with the process.
    """
    taken = threading.Event()

    def take() -> None:
        _ofd(fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, start)
        taken.set()

    threading.Thread(target=take, name="streamwise-store-last", daemon=True).start()
    return taken.wait(timeout_s)


def byte_is_free(fd: int, start: int) -> bool:
    """True when no open file description other than ``fd``'s holds a lock on the byte."""
    kind = _FLOCK.unpack(_ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start))[0]
    return kind == fcntl.F_UNLCK


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Session:
    """Names of one session's files, and the file operations its processes share."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.dir = os.path.join(SHM_DIR, name)
        self.prefix = self.dir + "/"
        self.lock_path = self.prefix + "lock"
        self.starting_lock_path = self.prefix + "lock-init"
        self.capacity = capacity
        # Freed segments kept warm for reuse, at most this many bytes in all.
        self.pool_limit = capacity // 4

    @staticmethod
    def new_name() -> str:
        return f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"

    def segment(self, segid: str, size: int) -> str:
        return f"{self.prefix}o-{segid}-{size}"

    def pin(self, anchor: int, call: int, seq: int, segid: str, size: int) -> str:
        return f"{self.prefix}n-{anchor}-{call}-{seq}-{segid}-{size}"

    def tmp(self, size: int) -> str:
        return f"{self.prefix}t-{os.getpid()}-{secrets.token_hex(6)}-{size}"

    def pool(self, size: int) -> str:
        return f"{self.prefix}p-{size}-{secrets.token_hex(6)}"

    # -- listing -----------------------------------------------------------------

    def entries(self) -> Iterator[tuple[str, list[str]]]:
        """(path, fields) of every file of this session except the lock."""
        prefix = self.prefix
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(self.dir):
                if entry not in ("lock", "lock-init"):
                    yield prefix + entry, entry.split("-")

    def usage(self) -> tuple[int, list[tuple[int, str]]]:
        """Bytes held by segments, pooled and partly written files; and the pool."""
        used = 0
        pool: list[tuple[int, str]] = []
        for path, fields in self.entries():
            kind = fields[0]
            if kind in ("o", "t") and fields[-1].isdigit():
                used += int(fields[-1])
            elif kind == "p" and len(fields) == 3 and fields[1].isdigit():
                used += int(fields[1])
                pool.append((int(fields[1]), path))
        return used, pool

    # -- freeing -----------------------------------------------------------------

    def free_if_unused(self, segid: str, size: int) -> None:
        """Free the segment unless a process holds it or a pin links it."""
        path = self.segment(segid, size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # held: its last holder frees it
            if os.fstat(fd).st_nlink != 1:
                return  # pinned (or freed meanwhile): the pin's remover frees it
            self._recycle(path, size)
        finally:
            os.close(fd)

    def _recycle(self, path: str, size: int) -> None:
        """Move a freed segment to the pool (pages stay allocated) or delete it."""
        with contextlib.suppress(FileNotFoundError):
            if size <= self.pool_limit:
                _, pool = self.usage()
                if sum(s for s, _ in pool) + size <= self.pool_limit:
                    os.rename(path, self.pool(size))
                    return
            os.unlink(path)

    def unpin(self, anchor: int, call: int, seq: int, segid: str, size: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pin(anchor, call, seq, segid, size))

    def clear_pins(self, anchor: int, call: int | None = None) -> None:
        """Remove the pins of one call of ``anchor`` (or of all its calls) that their
        caller will not read, freeing what they alone kept."""
        key, call_key = str(anchor), str(call)
        for path, fields in list(self.entries()):
            if fields[0] == "n" and len(fields) == 6 and fields[1] == key and (call is None or fields[2] == call_key):
                self._drop_pin(path, fields)

    def _drop_pin(self, path: str, fields: list[str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if fields[5].isdigit():
            self.free_if_unused(fields[4], int(fields[5]))

    def reclaim(self, probe_fd: int) -> None:
        """Free what dead processes left: pins of finished calls, unheld segments,
        partly written files of dead writers. Safe while the session runs."""
        for path, fields in list(self.entries()):
            kind = fields[0]
            if kind == "n" and len(fields) == 6 and fields[1].isdigit():
                if byte_is_free(probe_fd, int(fields[1])):
                    self._drop_pin(path, fields)
            elif kind == "t" and fields[1].isdigit() and not _pid_alive(int(fields[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for _, fields in list(self.entries()):
            if fields[0] == "o" and len(fields) == 3 and fields[2].isdigit():
                self.free_if_unused(fields[1], int(fields[2]))

    def remove_all(self) -> None:
        """Delete every file of the session, the lock last, then its directory."""
        for path, _ in list(self.entries()):
            with contextlib.suppress(OSError):  # gone already, or not a file we made
                os.unlink(path)
        for lock in (self.lock_path, self.starting_lock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        with contextlib.suppress(OSError):  # not empty: a process still writing; a later sweep
            os.rmdir(self.dir)

    def check_private(self) -> None:
        """Refuse a session directory that is not this user's own, private one."""
        try:
            info = os.lstat(self.dir)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "object store session is gone", self.dir) from None
        if not _is_private_dir(info):
            raise PermissionError(errno.EPERM, "not a private directory of this user", self.dir)


def _is_private_dir(info: os.stat_result) -> bool:
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def create_lock(session: Session) -> int:
    """Create the session's directory and its lock file, read-locked.

    The lock is made as ``lock-init`` and renamed to ``lock`` once held: a concurrent
    cleanup takes a session whose ``lock-init`` is held for a live one (and one with
    neither file for a stale one, which makes this raise FileNotFoundError). Only
    names inside the private directory are renamed, so nobody can get in the way.
    """
    os.mkdir(session.dir, 0o700)
    fd = -1
    try:
        os.chmod(session.dir, 0o700)  # whatever the umask
        fd = os.open(session.starting_lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        lock_byte(fd, SESSION_BYTE)
        os.rename(session.starting_lock_path, session.lock_path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        session.remove_all()
        raise
    return fd


def cleanup_stale(keep: str | None = None) -> list[str]:
    """Remove the files of every session no live process belongs to; their names.

    A session is stale when no process read-locks byte 0 of its lock file (locks
    vanish with their process, so a SIGKILLed driver and replicas count as gone), nor
    of ``lock-init`` (the lock of a session being created); a missing file counts as
    unlocked (the lock is removed last at shutdown).
    Only this user's private session directories are looked at: anything else in
    /dev/shm that looks like a session, another user's or planted, is left alone
    without being opened, so it can neither be removed by mistake nor make this hang.
    """
    names = []
    with contextlib.suppress(FileNotFoundError), os.scandir(SHM_DIR) as entries:
        for entry in entries:
            parts = entry.name.split("-")
            if not entry.name.startswith(NAME_PREFIX) or len(parts) != 3 or not parts[1].isdigit():
                continue
            try:
                private = _is_private_dir(entry.stat(follow_symlinks=False))
            except OSError:
                continue
            if private and entry.name != keep:
                names.append(entry.name)
    removed = []
    for name in sorted(names):
        session = Session(name, capacity=0)
        # lock-init first: a creator renames it to lock, never back, so a session that
        # looks free under both names, checked in this order, is not being created.
        if _lock_is_free(session.starting_lock_path) and _lock_is_free(session.lock_path):
            session.remove_all()
            removed.append(name)
    return removed


def _lock_is_free(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # not a lock file we can judge
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and byte_is_free(fd, SESSION_BYTE)
    finally:
        os.close(fd)


def is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
