"""One process's view of its store session: holds, mappings and new segments.

A process *holds* a segment while anything in it needs the segment: an ObjectRef or
an in-flight call (counted in ``Held.refs``) or a zero-copy view of its bytes (a live
read-only mapping). The hold is one shared ``flock`` on a descriptor of its own (flock
locks belong to the open file description, and ``mmap`` keeps a duplicate of the
descriptor it maps, so mappings are made from separate descriptions); when both
counts drop to zero it is closed and the segment freed if that was the last hold
anywhere (see ``_session``). Views therefore keep a segment alive for as
long as they exist, and a freed segment's file can safely be reused for new data.

Writing is where tmpfs is slow: allocating its pages costs about ten times a memcpy.
Freed segments go to a pool with their pages, and each process keeps the writable
mappings it made, so a steady stream of large values costs one memcpy each.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import itertools
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Sequence

from streamwise.exceptions import ObjectLostError, ObjectStoreFullError
from streamwise.objectstore import _session
from streamwise.objectstore._session import PAGE, SESSION_BYTE, Session

_MAX_WRITER_MAPS = 32
# How long a replica whose driver died waits to become the session's last process.
_LAST_PROCESS_WAIT_S = 10.0
_ANCHOR_MASK = (1 << 40) - 1  # pids fit in 22 bits, so anchors stay below 2**62
# Calls that share one anchor: a lock and an unlock per call would cost more, on a
# small call, than everything else the object store adds to it.
_CALLS_PER_ANCHOR = 64


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None


def buffer_address(obj: object) -> int:
    """Address of the first byte of a contiguous buffer (read-only buffers too,
    which ``ctypes.c_char.from_buffer`` refuses)."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


class Held:
    """This process's hold on one segment."""

    __slots__ = ("segid", "size", "fd", "refs", "mapping", "generation", "base")

    def __init__(self, segid: str, size: int, fd: int) -> None:
        self.segid = segid
        self.size = size
        self.fd = fd
        self.refs = 0
        self.mapping: weakref.ref[mmap.mmap] | None = None
        self.generation = 0
        self.base = 0  # address of the live read mapping, 0 when unmapped


class _Anchor:
    __slots__ = ("byte", "calls", "active")

    def __init__(self, byte: int) -> None:
        self.byte = byte
        self.calls = 0  # calls started under it (numbers them)
        self.active = 0  # calls not yet ended


class _WriterMap:
    __slots__ = ("mm", "fd")

    def __init__(self, mm: mmap.mmap, fd: int) -> None:
        self.mm = mm
        self.fd = fd  # our own descriptor, to see whether the file still has a name


class Adoption:
    """A segment of another node's session being written into this one."""

    __slots__ = ("segid", "size", "held", "path", "fd", "write_fd", "target")

    def __init__(self, segid: str, size: int, *, held: Held | None = None, path: str = "", fd: int = -1) -> None:
        self.segid = segid
        self.size = size
        self.held = held  # the session had it already: nothing to write
        self.path = path
        self.fd = fd  # read-only, share-locked: becomes the hold once published
        self.write_fd = -1
        self.target: memoryview | None = None

    @property
    def needed(self) -> bool:
        return self.held is None

    def write(self, offset: int, data: memoryview | bytes) -> None:
        if self.target is not None:
            self.target[offset : offset + len(data)] = data

    def close_writer(self) -> None:
        if self.target is not None:
            self.target.release()
            self.target = None
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1


class Store:
    """The store session as seen from this process (thread-safe)."""

    def __init__(self, session: Session, lock_fd: int, *, owner: bool) -> None:
        self.session = session
        self.owner = owner
        self._lock_fd = lock_fd  # holds the session byte and this process's anchors
        # A separate open file description sees this process's own locks as others'.
        self._probe_fd = os.open(session.lock_path, os.O_RDWR | os.O_CLOEXEC)
        self._mutex = threading.RLock()
        self._held: dict[str, Held] = {}
        self._writers: collections.OrderedDict[tuple[int, int], _WriterMap] = collections.OrderedDict()
        self._anchors = itertools.count(secrets.randbits(39) | 1)  # never 0: byte 0 is the session's
        self._anchor_base = os.getpid() << 40  # (getpid is a system call: once)
        self._anchor: _Anchor | None = None  # the one new calls join
        self._open_anchors: dict[int, _Anchor] = {}
        self.closed = False

    # -- holds -------------------------------------------------------------------

    def hold(self, segid: str, size: int) -> Held:
        """Count one more use of a segment in this process (ObjectLostError if gone)."""
        with self._mutex:
            held = self._held.get(segid)
            if held is None:
                held = self._held[segid] = self._open(segid, size)
            held.refs += 1
            return held

    def _open(self, segid: str, size: int) -> Held:
        path = self.session.segment(segid, size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectLostError(segid, "its segment is gone (freed, or the session ended)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while someone checks it is unused
            # Freed (recycled under another name) between our open and our lock?
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
        except FileNotFoundError:
            os.close(fd)
            raise ObjectLostError(segid, "its segment was freed") from None
        except BaseException:
            os.close(fd)
            raise
        return Held(segid, size, fd)

    def add_ref(self, held: Held) -> None:
        with self._mutex:
            held.refs += 1

    def release(self, held: Held) -> None:
        with self._mutex:
            held.refs -= 1
            self._maybe_drop(held)

    def _maybe_drop(self, held: Held) -> None:
        if held.refs > 0 or held.mapping is not None:
            return
        if self._held.get(held.segid) is held:
            del self._held[held.segid]
        os.close(held.fd)
        held.fd = -1
        if not self.closed:  # after close() the session's files are gone
            self.session.free_if_unused(held.segid, held.size)

    def view(self, held: Held) -> memoryview:
        """A read-only view of the whole segment; it keeps the hold while it lives."""
        with self._mutex:
            mm = held.mapping() if held.mapping is not None else None
            if mm is None:
                # A new description of the held file (never the locked one, which the
                # mapping would keep): works after the name is gone, e.g. after shutdown().
                fd = os.open(f"/proc/self/fd/{held.fd}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    mm = mmap.mmap(fd, held.size, access=mmap.ACCESS_READ)
                finally:
                    os.close(fd)
                held.generation += 1
                held.mapping = weakref.ref(mm)
                held.base = buffer_address(mm)
                # Not at interpreter exit: the process's locks vanish with it anyway.
                weakref.finalize(mm, self._unmapped, held, held.generation).atexit = False
            return memoryview(mm)

    def _unmapped(self, held: Held, generation: int) -> None:
        with self._mutex:
            if held.generation == generation:
                held.mapping = None
                held.base = 0
                self._maybe_drop(held)

    def locate(self, buffer: memoryview) -> tuple[Held, int] | None:
        """The held segment whose read mapping contains ``buffer``, and its offset."""
        address = buffer_address(buffer)
        end = address + buffer.nbytes
        with self._mutex:
            for held in list(self._held.values()):  # finalizers may change the dict
                if held.base and held.base <= address and end <= held.base + held.size:
                    held.refs += 1
                    return held, address - held.base
        return None

    # -- writing -----------------------------------------------------------------

    def create(self, chunks: Sequence[memoryview]) -> Held:
        """A new segment holding ``chunks`` (1-D unsigned-byte views) back to back,
        held once by the caller."""
        length = sum(c.nbytes for c in chunks)
        path, write_fd, size = self._claim(length)
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            mm = self._writer_map(write_fd, size)
            offset = 0
            with memoryview(mm) as target:
                for chunk in chunks:
                    target[offset : offset + chunk.nbytes] = chunk
                    offset += chunk.nbytes
            segid = secrets.token_hex(16)
            os.rename(path, self.session.segment(segid, size))  # published complete
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        finally:
            os.close(write_fd)
        held = Held(segid, size, fd)
        held.refs = 1
        with self._mutex:
            self._held[segid] = held
        return held

    def begin_adopt(self, segid: str, size: int) -> Adoption:
        """Start adopting segment ``segid`` (of ``size`` bytes) of another node's
        session into this one: its bytes are written into a file of this session
        under a temporary name, unless the session already has it (``Adoption.needed``
        is then False and writes are ignored). Segment ids are unique everywhere, so
        refs inside a value name the adopted segment as they named the original.
        End with :meth:`end_adopt` (held once by the caller), or :meth:`cancel_adopt`
        (which removes the file)."""
        with contextlib.suppress(ObjectLostError):
            return Adoption(segid, size, held=self.hold(segid, size))
        path, write_fd, _ = self._claim(size, exact=True)
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            mm = self._writer_map(write_fd, size)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.close(write_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        adoption = Adoption(segid, size, path=path, fd=fd)
        adoption.target = memoryview(mm)
        adoption.write_fd = write_fd
        return adoption

    def end_adopt(self, adoption: Adoption) -> Held:
        """Publish an adopted segment whole; it is held once by the caller."""
        if adoption.held is not None:
            held, adoption.held = adoption.held, None
            return held
        fd, adoption.fd = adoption.fd, -1
        try:
            adoption.close_writer()
            try:
                os.link(adoption.path, self.session.segment(adoption.segid, adoption.size))  # never over another
            except FileExistsError:  # adopted by another process meanwhile: use theirs
                os.close(fd)
                fd = -1
                return self.hold(adoption.segid, adoption.size)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(adoption.path)
        held = Held(adoption.segid, adoption.size, fd)
        held.refs = 1
        with self._mutex:
            self._held[adoption.segid] = held
        return held

    def cancel_adopt(self, adoption: Adoption) -> None:
        """Give up an adoption: its partly written file is removed (or its hold dropped)."""
        if adoption.held is not None:
            held, adoption.held = adoption.held, None
            self.release(held)
            return
        adoption.close_writer()
        if adoption.fd >= 0:
            os.close(adoption.fd)
            adoption.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(adoption.path)

    def _claim(self, length: int, *, exact: bool = False) -> tuple[str, int, int]:
        """A file of at least ``length`` bytes (``exact``: of exactly that many, a
        multiple of the page size) under a temporary name: pooled if one fits, else
        new. Raises ObjectStoreFullError past the session's capacity.

        An exact claim takes a pooled file of up to twice the length too, and cuts
        it to size: its pages stay allocated (segments adopted from another node
        come in the sizes that node's pool happened to give, rarely one pooled here).
        """
        session = self.session
        used, pool = session.usage()
        most = max(2 * length, length + (1 << 20))
        fits = sorted(p for p in pool if length <= p[0] <= most)
        for size, pooled in fits:
            tmp = session.tmp(length if exact else size)
            try:
                os.rename(pooled, tmp)  # atomic: one claimer wins
            except FileNotFoundError:
                continue
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
            if exact and size != length:
                try:
                    os.ftruncate(fd, length)
                except BaseException:
                    os.close(fd)
                    os.unlink(tmp)
                    raise
                size = length
            return tmp, fd, size
        size = max(PAGE, -(-length // PAGE) * PAGE)
        if used + size > session.capacity:
            for pooled_size, pooled in sorted(pool, reverse=True):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pooled)
                    used -= pooled_size
                if used + size <= session.capacity:
                    break
        if used + size > session.capacity:
            raise ObjectStoreFullError(length, used, session.capacity)
        tmp = session.tmp(size)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Allocate every page now: a full /dev/shm then fails here, cleanly, instead
            # of killing the process with SIGBUS when a write touches a missing page.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(tmp)
            if _session.is_no_space(exc):
                raise ObjectStoreFullError(length, used, session.capacity, "/dev/shm is full") from None
            raise
        return tmp, fd, size

    def _writer_map(self, fd: int, size: int) -> mmap.mmap:
        """A writable mapping of the file behind ``fd``, reused when this process has
        written to the same file before (its page tables are then already filled)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._mutex:
            cached = self._writers.get(key)
            if cached is not None and len(cached.mm) == size:
                self._writers.move_to_end(key)
                return cached.mm
            self._evict_writers()  # on a miss only: it costs a system call per mapping
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            if cached is not None:
                self._close_writer(self._writers.pop(key))
            self._writers[key] = _WriterMap(mm, os.dup(fd))
            while len(self._writers) > _MAX_WRITER_MAPS:
                self._close_writer(self._writers.popitem(last=False)[1])
            return mm

    def _evict_writers(self) -> None:
        """Drop mappings of deleted files: they would pin freed memory."""
        for key, cached in list(self._writers.items()):
            if os.fstat(cached.fd).st_nlink == 0:
                self._close_writer(self._writers.pop(key))

    @staticmethod
    def _close_writer(cached: _WriterMap) -> None:
        with contextlib.suppress(BufferError):  # still being written: unmapped when dropped
            cached.mm.close()
        os.close(cached.fd)

    # -- anchors and pins ----------------------------------------------------------

    def open_call(self) -> tuple[int, int]:
        """(anchor, call number) for a new call; read-locked until the call ends.

        Up to _CALLS_PER_ANCHOR calls share an anchor, which stays locked until the
        last of them ends. Anchors are unique among live processes: the pid in the
        high bits, a counter below (started at random, so a reused pid does not meet
        its predecessor's pins).
        """
        with self._mutex:
            anchor = self._anchor
            if anchor is None or anchor.calls >= _CALLS_PER_ANCHOR:
                byte = self._anchor_base | (next(self._anchors) & _ANCHOR_MASK)
                _session.lock_byte(self._lock_fd, byte)
                if anchor is not None and anchor.active == 0:
                    self._retire(anchor)
                anchor = self._anchor = self._open_anchors[byte] = _Anchor(byte)
            anchor.calls += 1
            anchor.active += 1
            return anchor.byte, anchor.calls

    def close_call(self, byte: int, call: int, complete: bool) -> None:
        """The call is over; ``complete``: its caller decoded every result it sent."""
        with self._mutex:
            if self.closed:  # ended by shutdown(): the session's files and locks are gone
                return
            if not complete:
                self.session.clear_pins(byte, call)
            anchor = self._open_anchors[byte]
            anchor.active -= 1
            if anchor.active == 0 and anchor is not self._anchor:
                self._retire(anchor)

    def _retire(self, anchor: _Anchor) -> None:
        """Unlock a finished anchor, then remove pins a callee made after its caller
        gave up (such a callee, seeing the anchor locked, left them)."""
        del self._open_anchors[anchor.byte]
        _session.unlock_byte(self._lock_fd, anchor.byte)
        self.session.clear_pins(anchor.byte)

    def anchor_alive(self, anchor: int) -> bool:
        return not _session.byte_is_free(self._probe_fd, anchor)

    def pin(self, held: Held, anchor: int, call: int, seq: int) -> None:
        """Link the (held) segment under a call so it outlives our hold in transit."""
        session = self.session
        os.link(session.segment(held.segid, held.size), session.pin(anchor, call, seq, held.segid, held.size))

    # -- session -------------------------------------------------------------------

    def reclaim(self) -> None:
        """Free what dead processes of this session left behind (see Session.reclaim)."""
        if not self.closed:
            self.session.reclaim(self._probe_fd)

    def close(self, driver_gone: bool = False) -> None:
        """Leave the session. The owner (driver) deletes every file of the session; a
        replica does so only when it is the last live process of the session.

        ``driver_gone``: the driver is dying (a replica learns it from its parent-death
        signal, which the kernel may send a little before the driver's descriptors,
        and so its session lock, are released). The replica then waits, bounded, until
        every other process of the session has let go, and the last one cleans up.
        """
        with self._mutex:
            if self.closed:
                return
            self.closed = True
            for cached in self._writers.values():
                self._close_writer(cached)
            self._writers.clear()
            if self.owner:
                self.session.remove_all()
            else:
                _session.unlock_byte(self._lock_fd, SESSION_BYTE)
                if driver_gone:
                    last = _session.lock_byte_exclusive(self._lock_fd, SESSION_BYTE, _LAST_PROCESS_WAIT_S)
                else:
                    last = _session.byte_is_free(self._probe_fd, SESSION_BYTE)
                if last:
                    self.session.remove_all()
            os.close(self._probe_fd)
            os.close(self._lock_fd)
