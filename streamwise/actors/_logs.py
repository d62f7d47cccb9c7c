"""Replica output: to the operator with the replica's name, and to a file per replica.

A replica's stdout and stderr (its ``print``s, its ``logging`` output, tracebacks)
are pipes the driver reads. Each line is written to the driver's own stdout or
stderr behind ``(Model#3 pid=1234)`` and appended to ``logs/<app>.<replica>.log``
in the run directory (mode 0600), which ``streamwise logs`` reads.

A replica on another machine (a Ray cluster) keeps its output in an
:class:`OutputBuffer` of its host there, from which the driver takes it in batches
(``forward_batches``): the same lines, prefixes and log files as a local replica's.

Writing is done by a thread of its own, through a bounded queue: the driver's event
loop never waits on a terminal or a pipe nobody reads. Lines that find the queue
full are dropped, never held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import queue
import re
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO, TextIO

LOG_DIR = "logs"
LINE_LIMIT = 1 << 20  # a longer line is passed on in pieces of this length
DRAIN_S = 1.0  # after a replica exits, how long its remaining output may take
_QUEUE = 10_000  # lines waiting to be written, at most
_CHUNK = 1 << 16
_UNSAFE = re.compile(r"[^A-Za-z0-9_.#@+=-]")


def log_path(run_dir: str, app: str, replica_id: str) -> str:
    """Where the output of ``replica_id`` of ``app`` is kept."""
    directory = os.path.join(run_dir, LOG_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(directory, f"{_UNSAFE.sub('_', app)}.{_UNSAFE.sub('_', replica_id)}.log")


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines; a line longer than LINE_LIMIT comes in pieces of that size."""
    pending = b""
    while chunk := await stream.read(_CHUNK):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
        while len(pending) >= LINE_LIMIT:
            piece, pending = pending[:LINE_LIMIT], pending[LINE_LIMIT:]
            yield piece
    if pending:
        yield pending


class _Writer:
    """The thread that writes replica output, fed through a bounded queue."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[BinaryIO, TextIO, bytes, str] | None] = queue.Queue()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="streamwise-logs", daemon=True)
        self._thread.start()

    def close_later(self, log: BinaryIO) -> None:
        """Close ``log`` once the lines queued before are written."""
        self._queue.put((log, sys.stderr, b"", ""))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def put(self, log: BinaryIO, out: TextIO, line: bytes, prefix: str) -> None:
        if self._queue.qsize() >= _QUEUE:
            self.dropped += 1
        else:
            self._queue.put_nowait((log, out, line, prefix))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            log, out, line, prefix = item
            if not line:
                log.close()
                continue
            with contextlib.suppress(OSError, ValueError):  # disk full, or a file closed meanwhile
                log.write(line)
                log.flush()
            text = line.decode(errors="replace")
            with contextlib.suppress(OSError, ValueError):  # the driver's own stream is gone
                out.write(prefix + (text if text.endswith("\n") else text + "\n"))
                out.flush()


_writer: _Writer | None = None
_writer_lock = threading.Lock()


def stop_writer() -> None:
    """Write what is queued and end the writer thread (a later replica starts another)."""
    global _writer
    with _writer_lock:
        writer, _writer = _writer, None
    if writer is not None:
        writer.stop()


def _the_writer() -> _Writer:
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = _Writer()
        return _writer


class Tail:
    """The last lines a replica wrote to stderr: what it said before it exited, for
    the error of a replica that died before it was ready (a traceback, say)."""

    LINES = 40

    def __init__(self) -> None:
        self._lines: collections.deque[bytes] = collections.deque(maxlen=self.LINES)

    def add(self, line: bytes) -> None:
        self._lines.append(line[:_TAIL_LINE_BYTES])

    def text(self) -> str:
        return b"".join(self._lines).decode(errors="replace")


_TAIL_LINE_BYTES = 4096  # of each line kept in a Tail


async def _forward(
    stream: asyncio.StreamReader, out: TextIO, prefix: str, log: BinaryIO, tail: Tail | None = None
) -> None:
    writer = _the_writer()
    async for line in _lines(stream):
        writer.put(log, out, line, prefix)
        if tail is not None:
            tail.add(line)


def _open_log(path: str) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


async def forward(process: asyncio.subprocess.Process, replica_id: str, path: str, tail: Tail) -> None:
    """Pass the process's stdout and stderr on until both close (it exited); the
    last lines of stderr stay in ``tail`` too."""
    prefix = f"({replica_id} pid={process.pid}) "
    log = _open_log(path)
    streams = [(process.stdout, sys.stdout, None), (process.stderr, sys.stderr, tail)]
    try:
        await asyncio.gather(*(_forward(s, out, prefix, log, keep) for s, out, keep in streams if s is not None))
    finally:
        _the_writer().close_later(log)  # after the lines queued for it


STDOUT, STDERR = 1, 2


async def forward_batches(
    batches: AsyncIterator[list[tuple[int, bytes]]], replica_id: str, pid: int, path: str, tail: Tail
) -> None:
    """Pass on the output of a replica on another machine: batches of (STDOUT or
    STDERR, line), until ``batches`` ends; the last lines of stderr stay in ``tail``
    too. Cancelling stops at once; what was queued is still written."""
    prefix = f"({replica_id} pid={pid}) "
    log = _open_log(path)
    writer = _the_writer()
    try:
        async for batch in batches:
            for stream, line in batch:
                if stream == STDERR:
                    writer.put(log, sys.stderr, line, prefix)
                    tail.add(line)
                else:
                    writer.put(log, sys.stdout, line, prefix)
    finally:
        writer.close_later(log)


class OutputBuffer:
    """The output of ``process`` kept where it runs, until the driver takes it (``take``).

    Bounded: past ``limit`` bytes waiting, the oldest lines go, and a line saying how
    many were lost takes their place, so a driver that stops reading never holds up
    the replica nor grows this process without end.
    """

    def __init__(self, process: asyncio.subprocess.Process, limit: int = 8 << 20) -> None:
        self._lines: collections.deque[tuple[int, bytes]] = collections.deque()
        self._size = 0
        self._limit = limit
        self._lost = 0
        self._changed = asyncio.Event()
        streams = [(s, which) for s, which in ((process.stdout, STDOUT), (process.stderr, STDERR)) if s is not None]
        self._open = len(streams)
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._read(s, which)) for s, which in streams]

    async def _read(self, stream: asyncio.StreamReader, which: int) -> None:
        try:
            async for line in _lines(stream):
                self._lines.append((which, line))
                self._size += len(line)
                while self._size > self._limit and len(self._lines) > 1:
                    self._size -= len(self._lines.popleft()[1])
                    self._lost += 1
                self._changed.set()
        finally:
            self._open -= 1
            self._changed.set()

    async def take(self) -> list[tuple[int, bytes]] | None:
        """The lines kept so far, waiting for one if there is none; None once the
        process closed its output and all was taken. Cancelling leaves the lines kept."""
        while not self._lines and self._open:
            self._changed.clear()
            await self._changed.wait()
        if not self._lines:
            return None
        batch = list(self._lines)
        if self._lost:
            note = f"[streamwise: {self._lost} lines of output were dropped: nobody took them in time]\n"
            batch.insert(0, (STDERR, note.encode()))
            self._lost = 0
        self._lines.clear()
        self._size = 0
        return batch


def read(run_dir: str, app: str, deployment: str | None = None) -> Iterator[tuple[str, str]]:
    """(replica id, its output so far) of every replica of ``app`` (of ``deployment``)
    whose log is in ``run_dir``, oldest replica first."""
    directory = os.path.join(run_dir, LOG_DIR)
    head = f"{_UNSAFE.sub('_', app)}."
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    found = []
    for name in names:
        if not (name.startswith(head) and name.endswith(".log")):
            continue
        replica = name[len(head) : -len(".log")]
        if deployment is not None and replica.rsplit("#", 1)[0] != _UNSAFE.sub("_", deployment):
            continue
        found.append((replica, name))
    for replica, name in sorted(found, key=lambda f: _order(f[0])):
        with open(os.path.join(directory, name), errors="replace") as f:
            yield replica, f.read()


def _order(replica: str) -> tuple[str, int]:
    name, _, number = replica.rpartition("#")
    return (name, int(number)) if number.isdigit() else (replica, 0)
