"""Launchers start replica processes. The local launcher runs them on this machine.

A launcher only starts processes; the controller supervises them. A cluster engine
plugs in with the same small interface: ``ray_launcher.RayLauncher`` places each
replica with Ray's actor scheduler. A launcher whose ``spans_machines`` is true
makes the controller and replicas listen on TCP too (with the app's TLS), for
processes on other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import sys
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import streamwise
from streamwise import _auth, objectstore
from streamwise.actors import _logs
from streamwise.actors._succession import Estate, InheritedReplica, Legacy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """What a replica asks of the node it runs on (a cluster launcher's business)."""

    app: str
    deployment: str
    ray_actor_options: Mapping[str, Any] | None = None
    max_replicas_per_node: int | None = None


class ReplicaProcess(Protocol):
    pid: int

    async def wait(self) -> int: ...

    def last_output(self) -> str:
        """The last lines it wrote to stderr (complete once ``wait()`` returned)."""
        ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    spans_machines: bool
    host: str  # the driver's address, for a controller listening on TCP
    controller_grace_s: float  # how long its replicas serve on without their driver

    async def start(
        self, replica_id: str, controller_address: str, handoff: bytes, log_path: str, placement: Placement,
        legacy: Legacy | None = None,
    ) -> ReplicaProcess:
        """Start the process of ``replica_id``; ``handoff`` (its credentials) must
        reach it through a channel only it can read; its output goes to the
        operator, prefixed with its id, and to ``log_path``. ``legacy`` is kept for
        the app's next driver, should this one die while the replica lives on."""
        ...

    async def inheritance(self, app: str) -> Estate | None:
        """The replicas a dead driver of ``app`` left running, which this driver can
        take back (``_succession``); None if there are none."""
        ...

    def adopt(self, replica: InheritedReplica, log_path: str) -> ReplicaProcess:
        """Supervise ``replica`` (from ``inheritance``) as if this launcher started it."""
        ...

    async def retire_orphans(self, app: str, root: str = "", inherited: Sequence[InheritedReplica] = ()) -> int:
        """Stop the replicas of ``app`` a dead driver left serving (on a cluster,
        ``_outage``), and the ``inherited`` ones not taken back, those of deployment
        ``root`` first; how many."""
        ...

    async def aclose(self) -> None: ...


class _LocalProcess:
    def __init__(self, process: asyncio.subprocess.Process, replica_id: str, log_path: str) -> None:
        self._process = process
        self.pid = process.pid
        self._tail = _logs.Tail()
        self._output = asyncio.get_running_loop().create_task(
            _logs.forward(process, replica_id, log_path, self._tail)
        )

    def last_output(self) -> str:
        return self._tail.text()

    async def wait(self) -> int:
        """Its exit code, once it exited and what it printed was passed on (a child it
        left holding its output is not waited for beyond a moment)."""
        code = await self._process.wait()
        if not self._output.done():
            done, _ = await asyncio.wait({self._output}, timeout=_logs.DRAIN_S)
            if not done:
                self._output.cancel()
        return code

    def _signal(self, sig: int) -> None:
        if self._process.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class LocalProcessLauncher:
    """Starts each replica as a child process running ``python -m streamwise.actors.replica``.

    The credentials go through a socket pair whose other end only the child holds.
    """

    spans_machines = False
    host = ""
    controller_grace_s = 0.0

    def __init__(self) -> None:
        package_root = str(pathlib.Path(streamwise.__file__).resolve().parent.parent)
        env = dict(os.environ)
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")
        # gRPC core logs routine connection events (GOAWAY on a peer's shutdown) at
        # INFO; replicas keep to errors unless the user asked for more.
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        self._env = env

    async def retire_orphans(self, app: str, root: str = "", inherited: Sequence[InheritedReplica] = ()) -> int:
        return 0  # a replica here dies with its driver (its parent-death signal)

    async def inheritance(self, app: str) -> Estate | None:
        return None  # nothing outlives a driver here

    def adopt(self, replica: InheritedReplica, log_path: str) -> ReplicaProcess:
        raise NotImplementedError("replicas on one machine die with their driver: none to take back")

    async def start(
        self, replica_id: str, controller_address: str, handoff: bytes, log_path: str, placement: Placement,
        legacy: Legacy | None = None,
    ) -> ReplicaProcess:
        ours, theirs = _auth.handoff_pair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "streamwise.actors.replica",
                "--controller",
                controller_address,
                "--replica-id",
                replica_id,
                "--parent-pid",
                str(os.getpid()),
                "--store-session",
                objectstore.session_name(),  # the replica's object store is the driver's
                "--handoff-fd",
                str(theirs.fileno()),
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
            theirs.close()
            # A few hundred bytes: the socket's buffer takes them without waiting.
            with contextlib.suppress(OSError):  # it died at once: the controller sees it exit
                ours.sendall(handoff)
        finally:
            theirs.close()
            ours.close()
        return _LocalProcess(process, replica_id, log_path)

    async def aclose(self) -> None:
        pass
