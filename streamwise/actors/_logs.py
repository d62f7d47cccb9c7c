"""Replica output: to the operator with the replica's name, and to a file per replica.

A replica's stdout and stderr (its ``print``s, its ``logging`` output, tracebacks)
are pipes the driver reads. Each line is written to the driver's own stdout or
stderr behind ``(Model#3 pid=1234)`` and appended to ``logs/<app>.<replica>.log``
in the run directory (mode 0600), which ``streamwise logs`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO, TextIO

LOG_DIR = "logs"
LINE_LIMIT = 1 << 20  # longer lines are passed on in pieces
_CHUNK = 1 << 16
_UNSAFE = re.compile(r"[^A-Za-z0-9_.#@+=-]")


def log_path(run_dir: str, app: str, replica_id: str) -> str:
    """Where the output of ``replica_id`` of ``app`` is kept."""
    directory = os.path.join(run_dir, LOG_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(directory, f"{_UNSAFE.sub('_', app)}.{_UNSAFE.sub('_', replica_id)}.log")


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line longer than the reader's limit: take it in chunks
            line = await stream.read(_CHUNK)
        if not line:
            return
        yield line


async def _forward(stream: asyncio.StreamReader, out: TextIO, prefix: str, log: BinaryIO) -> None:
    async for line in _lines(stream):
        log.write(line)
        log.flush()
        text = line.decode(errors="replace")
        with contextlib.suppress(OSError, ValueError):  # the driver's own stream is gone
            out.write(prefix + (text if text.endswith("\n") else text + "\n"))
            out.flush()


async def forward(process: asyncio.subprocess.Process, replica_id: str, path: str) -> None:
    """Copy the process's stdout and stderr until both close (it exited)."""
    prefix = f"({replica_id} pid={process.pid}) "
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "ab") as log:
        streams = [(process.stdout, sys.stdout), (process.stderr, sys.stderr)]
        await asyncio.gather(*(_forward(s, out, prefix, log) for s, out in streams if s is not None))


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
