"""The actors streamwise places on Ray nodes: a replica's host, and a node's store agent.

A ``_ReplicaHost`` holds one replica's resources on the node Ray placed it on and
runs the replica as its child process (see ``ray_launcher``); a ``_NodeStore`` keeps
the object store session that the replicas of one node (other than the driver's)
join. Both run in Ray worker processes; the driver reaches them through the
handles ``RayLauncher`` keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading

from streamwise import _auth
from streamwise.actors import _logs
from streamwise.actors._succession import Legacy
from streamwise.streaming import _local_wire

# A host that Ray cannot place (no node has what it asks for) fails its start after this.
PLACEMENT_TIMEOUT_S = 60.0
# A host outlives its replica this long, for its driver to take the last output and the
# exit code (and then end it); with no driver left, it ends itself then.
_LINGER_S = 5.0


class _ReplicaHost:
    """The Ray actor holding one replica's resources; its child process is the replica."""

    def __init__(
        self, legacy: Legacy, replica_id: str, handoff: bytes, package_root: str,
        controller_grace_s: float, settings: dict[str, str],
    ) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self._args = (replica_id, legacy.controller, handoff, package_root, controller_grace_s)
        self._settings = settings
        self._legacy = legacy
        self._store_session = ""
        self._process: asyncio.subprocess.Process | None = None
        self._output: _logs.OutputBuffer | None = None
        self._ending: asyncio.Task[None] | None = None
        # A driver that dies while Ray places this actor never starts its replica: the
        # actor then ends itself (it is detached, so Ray would not). From a timer
        # thread, as this constructor may run before the actor's event loop does.
        unstarted = threading.Timer(PLACEMENT_TIMEOUT_S, self._end_unless_started)
        unstarted.daemon = True
        unstarted.start()

    def where(self) -> tuple[str, str]:
        """(Ray node id, node address): answered once Ray has placed this actor."""
        return self.node_id, self.node_ip

    def _end_unless_started(self) -> None:
        if self._process is None:
            self._end()

    async def start(self, store_session: str) -> int:
        """Start the replica, joining this node's object store session; its pid."""
        replica_id, controller, handoff, package_root, controller_grace_s = self._args
        self._store_session = store_session
        env = dict(os.environ)
        env.update(self._settings)  # the driver's, as a replica on its own machine has them
        env[_local_wire.NODE_ID_ENV] = self.node_id
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        ours, theirs = _auth.handoff_pair()
        try:
            # Started from Ray's long-lived event loop thread: the child's parent-death
            # signal fires when this actor's process goes, not before.
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamwise.actors.replica",
                "--controller", controller,
                "--replica-id", replica_id,
                "--parent-pid", str(os.getpid()),
                "--store-session", store_session,
                "--handoff-fd", str(theirs.fileno()),
                "--listen-host", self.node_ip,
                "--controller-grace-s", repr(controller_grace_s),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
            self._output = _logs.OutputBuffer(self._process)
            self._ending = asyncio.get_running_loop().create_task(self._end_after_replica())
            theirs.close()
            with contextlib.suppress(OSError):
                ours.sendall(handoff)
        finally:
            theirs.close()
            ours.close()
        return self._process.pid

    async def orphaned(self, app: str) -> bool:
        """Whether this is a replica of ``app`` whose driver is dead: its controller
        refuses connections, seen from this node, as the replica sees it."""
        return app == self._legacy.app and not await _answers(self._legacy.controller)

    async def bequest(self) -> tuple[Legacy, bytes, int, str, str] | None:
        """(legacy, hand-off, pid, node id, store session) of a running replica whose driver is dead,
        for the app's next driver to take it back; None otherwise. The hand-off holds
        the app's credentials, which reached this actor as arguments: whoever may use
        the Ray cluster could read them already."""
        if self._process is None or self._process.returncode is not None or await _answers(self._legacy.controller):
            return None
        return self._legacy, self._args[2], self._process.pid, self.node_id, self._store_session

    async def _end_after_replica(self) -> None:
        """The actor is detached, so that its replica outlives a dead driver for its
        grace (``_outage``); it ends itself once that replica has exited."""
        assert self._process is not None
        await self._process.wait()
        await asyncio.sleep(_LINGER_S)
        self._end()

    @staticmethod
    def _end() -> None:
        import ray

        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception:  # nothing else would end a detached actor
            os._exit(0)

    async def output(self) -> list[tuple[int, bytes]] | None:
        """The replica's output lines since the last call, once there are some (see
        ``_logs.OutputBuffer.take``); None when it has closed its output."""
        assert self._output is not None
        return await self._output.take()

    async def run(self) -> int:
        """The replica's exit code, once it exited."""
        assert self._process is not None
        return await self._process.wait()

    def stop(self, sig: int) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)


class _NodeStore:
    """The object store session of one node other than the driver's: replicas there
    join it, so values stay zero-copy within the node (the driver's node uses the
    driver's own session). Values cross nodes with their calls (``_payload.carry``)."""

    def __init__(self, left: str = "") -> None:
        """``left``: the session a dead driver's agent made here, which its replicas,
        taken back, are still in: joined if it is still there (it is freed by the
        last of its processes to go)."""
        from streamwise import objectstore
        from streamwise.exceptions import ObjectLostError

        if left:
            with contextlib.suppress(ObjectLostError):
                objectstore.join_session(left)
        self.name = objectstore.session_name()

    def session(self) -> str:
        return self.name

    def close(self) -> None:
        """End or leave the session (its replicas are gone): its shared memory is
        freed, by this process if it is the last one in it."""
        from streamwise import objectstore

        objectstore.close_session()


async def _answers(address: str) -> bool:
    """Whether something accepts connections at ``address`` ("host:port"); a driver
    that cannot be told dead for sure counts as alive."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 5)
    except (ConnectionRefusedError, ValueError):
        return False
    except (OSError, TimeoutError):
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
