"""Replicas as Ray actors: Ray's scheduler places them across a Ray cluster.

With ``_ray_host`` (the actors themselves), the only module that imports ray. Each
replica gets a small async actor, its *host*, which reserves what the deployment asks for (``ray_actor_options``; per-node limits
through ``max_replicas_per_node``) and, once Ray has placed it, starts the usual
``python -m streamwise.actors.replica`` as its child, on its node, with the
driver's ``STREAMWISE_*`` settings on top of the node's environment. From there the
replica runs exactly as on one machine (its own event loop, signals, its parent's
death signal), with three differences: its node is the Ray node
(``STREAMWISE_NODE_ID``), it also listens on the node's address, with the app's TLS, for callers on other
nodes, and it rides out losing the driver for ``RayCluster.controller_grace_s``
(``_outage``). Its output is kept by its host, from which the driver takes it: the
operator sees it behind the replica's id, and ``streamwise logs`` reads it, as for a
local one. Ray places, and tells when a host or its node dies; supervision, restarts
and routing stay the controller's.

Hosts are *detached* actors, so that Ray does not end them (and their replicas) with
a driver that dies: the replicas serve on for their grace. A host ends itself once
its replica has exited (the driver, while it lives, ends it sooner), or when no
replica was started in it. Each is named ``<app>/<replica id>/<driver token>`` in
the cluster's namespace: the app's next driver finds those of a dead driver (its
controller no longer answers) and takes back those that run its code
(:meth:`RayLauncher.inheritance`, ``_succession``), and has the others drain once
its own serve the app (:meth:`RayLauncher.retire_orphans`).

The app's credentials reach a host as actor arguments, which anyone allowed to use
the Ray cluster can read (they can run code on its nodes anyway): the Ray cluster is
the trust boundary, as it is for Ray Serve. The host hands them to its child through
a socket pair, as the local launcher does, and, once the driver is dead, to the
app's next driver (``bequest``), which takes the replica back with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import secrets
import signal
import threading
from collections.abc import Sequence
from typing import Any

import streamwise
from streamwise import _auth
from streamwise.actors import _logs
from streamwise.actors._ray_host import PLACEMENT_TIMEOUT_S, _NodeStore, _ReplicaHost
from streamwise.actors._succession import Estate, InheritedReplica, Legacy
from streamwise.actors.launcher import Placement
from streamwise.config import RayCluster
from streamwise.exceptions import UsageError
from streamwise.streaming import _local_wire

log = logging.getLogger("streamwise.ray")

_STOPPED = -int(signal.SIGKILL)  # what wait() returns when Ray reports the host dead
# How long a new driver waits for a dead driver's replicas to drain before killing them.
_ORPHAN_DRAIN_S = 30.0


def _settings() -> dict[str, str]:
    """The driver's ``STREAMWISE_*`` variables, for its replicas on every node (a
    replica the local launcher starts inherits the driver's whole environment; one on
    a Ray node gets that node's Ray worker's, with these on top). Not the node id,
    which is each node's own."""
    return {
        key: value for key, value in os.environ.items()
        if key.startswith("STREAMWISE_") and key != _local_wire.NODE_ID_ENV
    }


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("running on a Ray cluster needs Ray: pip install 'streamwise[ray]'") from None
    return ray


class _RayProcess:
    """The controller's view of one replica on Ray (the ReplicaProcess protocol)."""

    def __init__(self, ray: Any, host: Any, pid: int, node_id: str, replica_id: str, log_path: str) -> None:
        self._ray = ray
        self._host = host
        self.pid = pid
        self.node_id = node_id
        self._run = asyncio.wrap_future(host.run.remote().future())
        self._code: int | None = None
        self._tail = _logs.Tail()
        self._output = asyncio.get_running_loop().create_task(
            _logs.forward_batches(self._batches(), replica_id, pid, log_path, self._tail)
        )

    def last_output(self) -> str:
        return self._tail.text()

    async def _batches(self) -> Any:
        """The replica's output, taken from its host until it ends (or the host is gone)."""
        while True:
            try:
                batch = await asyncio.wrap_future(self._host.output.remote().future())
            except self._ray.exceptions.RayError:
                return
            if batch is None:
                return
            yield batch

    async def wait(self) -> int:
        """The replica's exit code, once what it printed was passed on (for a moment at
        most); if its host or node died, a SIGKILL's code."""
        if self._code is None:
            try:
                self._code = await asyncio.shield(self._run)
            except self._ray.exceptions.RayError:
                self._code = _STOPPED
        if not self._output.done():
            done, _ = await asyncio.wait({self._output}, timeout=_logs.DRAIN_S)
            if not done:
                self._output.cancel()
        with contextlib.suppress(Exception):
            self._ray.kill(self._host, no_restart=True)  # a detached actor: it holds resources until then
        return self._code

    def terminate(self) -> None:
        """Drain and stop the replica (SIGTERM to it, on its node)."""
        with contextlib.suppress(Exception):
            self._host.stop.remote(int(signal.SIGTERM))

    def kill(self) -> None:
        """Stop it now: its host actor goes, and the replica with it."""
        with contextlib.suppress(Exception):
            self._ray.kill(self._host, no_restart=True)


class RayLauncher:
    """Starts each replica in a Ray actor placed by Ray's scheduler."""

    spans_machines = True

    def __init__(self, cluster: RayCluster) -> None:
        ray = _import_ray()
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # ray.init() puts handlers of its own on SIGINT and SIGTERM (exit at
            # once); the process's own are kept (`streamwise run` drains on them).
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            ray.init(address=cluster.address, namespace=cluster.namespace, log_to_driver=True)
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        self._namespace = cluster.namespace
        self.controller_grace_s = cluster.controller_grace_s
        self._driver_token = secrets.token_hex(4)  # in its hosts' names: which are this driver's
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address()
        # The driver's routers tell same-node replicas by the Ray node id too.
        os.environ[_local_wire.NODE_ID_ENV] = self.node_id
        _local_wire.node_id.cache_clear()
        self._host_class = ray.remote(_ReplicaHost)
        self._store_class = ray.remote(_NodeStore)
        self._stores: dict[str, tuple[Any, asyncio.Future[str]]] = {}  # node id -> (agent, its session)
        self._package_root = str(pathlib.Path(streamwise.__file__).resolve().parent.parent)
        self._settings = _settings()
        self._sessions_left: dict[str, str] = {}  # node id -> the store session a dead driver's agent made there

    def _options(self, placement: Placement) -> dict[str, Any]:
        wanted = dict(placement.ray_actor_options or {})
        resources = dict(wanted.pop("resources", None) or {})
        if placement.max_replicas_per_node is not None:
            # Every node has 1.0 of this implicit resource (Ray Serve's way).
            prefix = getattr(self._ray._raylet, "IMPLICIT_RESOURCE_PREFIX", "node:__internal_implicit_resource_")
            implicit = f"{prefix}{placement.app}:{placement.deployment}"
            resources[implicit] = 1.0 / placement.max_replicas_per_node
        options: dict[str, Any] = {
            "num_cpus": wanted.pop("num_cpus", 1),  # Ray Serve's default
            "max_restarts": 0,  # the controller replaces replicas itself
            "max_task_retries": 0,
            "namespace": self._namespace,
            "scheduling_strategy": "SPREAD",
            **wanted,
            # Outlives the driver's job, for the replica's grace (it ends itself after).
            "lifetime": "detached",
        }
        if resources:
            options["resources"] = resources
        return options

    async def start(
        self, replica_id: str, controller_address: str, handoff: bytes, log_path: str, placement: Placement,
        legacy: Legacy | None = None,
    ) -> _RayProcess:
        """Ask Ray to place the replica's host and start it there; returns once it runs
        (UsageError if Ray could not place it within a minute). ``legacy``: what the
        app's next driver needs to take the replica back, should this one die."""
        # Named, so that the app's next driver finds it should this one die.
        name = f"{placement.app}/{replica_id}/{self._driver_token}"
        if legacy is None:
            legacy = Legacy(app=placement.app, deployment=placement.deployment, controller=controller_address)
        host = self._host_class.options(name=name, **self._options(placement)).remote(
            legacy, replica_id, handoff, self._package_root, self.controller_grace_s, self._settings,
        )
        try:
            where = asyncio.wrap_future(host.where.remote().future())
            try:
                node_id, _ = await asyncio.wait_for(where, PLACEMENT_TIMEOUT_S)
            except TimeoutError:
                raise UsageError(
                    f"Ray placed no node for replica {replica_id} within {PLACEMENT_TIMEOUT_S:.0f}s: no node has "
                    f"what it asks for ({self._options(placement)})"
                ) from None
            session = await self._session_of(node_id)
            pid = await asyncio.wrap_future(host.start.remote(session).future())
        except self._ray.exceptions.RayError as exc:
            self._ray.kill(host, no_restart=True)
            raise UsageError(f"Ray could not start replica {replica_id}: {exc}") from None
        except BaseException:
            self._ray.kill(host, no_restart=True)
            raise
        return _RayProcess(self._ray, host, pid, node_id, replica_id, log_path)

    async def inheritance(self, app: str) -> Estate | None:
        """What a dead driver of ``app`` left running that this driver can take back:
        the replicas (of every app it ran) whose controller listened on this machine
        and refuses connections now, seen from each replica's node. None if there are
        none; with several dead drivers, the one with the most replicas."""
        ray = self._ray
        names = [
            entry["name"]
            for entry in await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
            if entry["namespace"] == self._namespace and entry["name"].count("/") >= 2
        ]

        async def bequest(name: str) -> tuple[str, InheritedReplica, _auth.Credentials] | None:
            """(host name, the replica, its app's credentials) if its driver is dead."""
            try:
                host = await asyncio.to_thread(ray.get_actor, name, namespace=self._namespace)
                found = await asyncio.wait_for(asyncio.wrap_future(host.bequest.remote().future()), 10)
                if found is None:
                    return None
                legacy, handoff, pid, node_id, session = found
                credentials, token = _auth.parse_handoff(handoff)
            except Exception:  # not a replica's host (another actor of the namespace), or gone
                return None
            if legacy.controller.rpartition(":")[0] != self.host or not name.startswith(f"{legacy.app}/"):
                return None  # its controller listened on another machine: not for this driver to be
            replica_id = name[len(legacy.app) + 1 :].rsplit("/", 1)[0]
            replica = InheritedReplica(
                replica_id=replica_id, legacy=legacy, token=token, pid=pid, node_id=node_id, store_session=session,
                host=host,
            )
            return name, replica, credentials

        by_driver: dict[str, list[tuple[str, InheritedReplica, _auth.Credentials]]] = {}
        for found in await asyncio.gather(*map(bequest, names)):
            if found is not None:
                by_driver.setdefault(found[1].legacy.controller, []).append(found)
        candidates = [group for group in by_driver.values() if any(r.legacy.app == app for _, r, _ in group)]
        if not candidates:
            return None
        group = max(candidates, key=len)
        credentials = group[0][2]
        assert credentials.tls is not None
        replicas = tuple(replica for _, replica, _ in group)
        # New replicas on those nodes join the sessions the taken back ones are in.
        self._sessions_left = {r.node_id: r.store_session for r in replicas if r.node_id != self.node_id}
        return Estate(
            credentials=_auth.Inherited(
                secret=credentials.secret, tls=credentials.tls,
                run_dirs=tuple(sorted({c.run_dir for _, _, c in group})),
            ),
            controller=replicas[0].legacy.controller,
            table=next((r.legacy.table for r in replicas if r.legacy.table), ""),
            replicas=replicas,
        )

    def adopt(self, replica: InheritedReplica, log_path: str) -> _RayProcess:
        """Supervise a replica a dead driver started (``inheritance``)."""
        return _RayProcess(self._ray, replica.host, replica.pid, replica.node_id, replica.replica_id, log_path)

    async def retire_orphans(self, app: str, root: str = "", inherited: Sequence[InheritedReplica] = ()) -> int:
        """Stop the replicas of ``app`` that a dead driver left serving in this
        namespace (riding out its loss, ``_outage``), and those ``inherited`` from
        one but not taken back (their controller is this driver's now): SIGTERM, so
        they drain, then their actors go; whatever still runs after
        ``_ORPHAN_DRAIN_S`` is killed. Those of deployment ``root`` go first, and the others once these have
        exited: calls their clients still make then reach the others while these
        serve (a draining replica takes no new call, and the callers' routers, whose
        driver died, know no other). Replicas of a driver still alive (its
        controller answers their node) are left alone, whatever this driver can reach."""
        ray = self._ray
        names = [
            entry["name"]
            for entry in await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
            if entry["namespace"] == self._namespace and entry["name"].startswith(f"{app}/")
            and not entry["name"].endswith(f"/{self._driver_token}")
        ]

        async def orphan(name: str) -> tuple[str, Any] | None:
            """(deployment, host ``name``) if its driver is dead; None if alive or if
            it cannot tell within seconds (not placed yet: it ends itself later)."""
            try:
                host = await asyncio.to_thread(ray.get_actor, name, namespace=self._namespace)
                gone = await asyncio.wait_for(asyncio.wrap_future(host.orphaned.remote(app).future()), 10)
            except (ValueError, TimeoutError, ray.exceptions.RayError):
                return None
            replica_id = name[len(app) + 1 :].rsplit("/", 1)[0]
            return (replica_id.rsplit("#", 1)[0], host) if gone else None

        orphans = [found for found in await asyncio.gather(*map(orphan, names)) if found is not None]
        orphans += [(replica.legacy.deployment, replica.host) for replica in inherited]  # not taken back
        if orphans:
            log.warning("stopping %d replica(s) of %r left by a driver that died", len(orphans), app)
        for group in ([h for d, h in orphans if d == root], [h for d, h in orphans if d != root]):
            deadline = asyncio.get_running_loop().time() + _ORPHAN_DRAIN_S
            for host in group:
                with contextlib.suppress(Exception):
                    host.stop.remote(int(signal.SIGTERM))
            for host in group:
                left = max(0.1, deadline - asyncio.get_running_loop().time())
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(host.run.remote().future()), left)
                with contextlib.suppress(Exception):
                    ray.kill(host, no_restart=True)
        return len(orphans)

    async def _session_of(self, node_id: str) -> str:
        """The object store session replicas on ``node_id`` join (made on first use)."""
        from streamwise import objectstore

        if node_id == self.node_id:
            return objectstore.session_name()
        found = self._stores.get(node_id)
        if found is None or (found[1].done() and found[1].exception() is not None):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            agent = self._store_class.options(
                num_cpus=0, namespace=self._namespace, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._sessions_left.pop(node_id, ""))
            found = self._stores[node_id] = (agent, asyncio.wrap_future(agent.session.remote().future()))
        return await asyncio.shield(found[1])

    async def aclose(self) -> None:
        """Leave the Ray cluster if this launcher joined it; this process is no longer
        on a Ray node as far as routing goes."""
        if os.environ.get(_local_wire.NODE_ID_ENV) == self.node_id:
            del os.environ[_local_wire.NODE_ID_ENV]
            _local_wire.node_id.cache_clear()
        stores, self._stores = self._stores, {}
        for agent, _ in stores.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(agent.close.remote().future()), 10)
            with contextlib.suppress(Exception):
                self._ray.kill(agent, no_restart=True)
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
