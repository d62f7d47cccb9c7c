"""The controller: turns desired state into running replicas and keeps it that way.

It starts every replica of an app in parallel, waits until each is attached (ready)
or its constructor has failed ``max_constructor_attempts`` times, restarts replicas
that die or fail health checks, and pushes every change of a deployment's replica set
to all routers watching it. It runs as a gRPC service on a Unix socket in the app's
run directory, so replicas and routers in any process reach it the same way; only
callers holding the app's secret are served (``streamwise._auth``), and only the
process launched for a replica may fetch its spec or attach as it.

On a cluster, a driver started for an app whose previous driver died takes that
driver's replicas back (``_succession``): it starts with the dead driver's
credentials and listens where its controller did, so those replicas, reconnecting
all along, attach to it. An ``Attach`` from one of them waits until the app is
deployed: each replica whose code version matches what would be started now is
taken back as it runs; the others drain once the new replicas serve
(``retire_orphans``), or once ``controller_grace_s`` has passed without their app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Callable

import grpc

from streamwise import _auth as auth, codec, objectstore
from streamwise.actors import _logs
from streamwise.actors._code_version import code_version
from streamwise.actors._deployment_state import ReplicaState, _Deployment, _Replica, _Slot
from streamwise.actors._succession import Estate, InheritedReplica, Legacy, Succession
from streamwise.actors.launcher import Launcher, LocalProcessLauncher, Placement
from streamwise.actors.spec import AppPlan
from streamwise.autoscaling.autoscaler import Autoscaler
from streamwise.config import COME_BACK_BACKOFF_S, AutoscalingConfig
from streamwise.exceptions import DeploymentNotFoundError, DeploymentStartupError, StreamwiseError
from streamwise.proto import controller_pb2, controller_pb2_grpc, replica_pb2, replica_pb2_grpc
from streamwise.streaming import _wire

log = logging.getLogger("streamwise.controller")

_RESTART_BACKOFF_S = COME_BACK_BACKOFF_S
_KILL_GRACE_S = 2.0  # after graceful_shutdown_timeout_s, before SIGKILL
# How long a new app's replicas may wait to be placed beside those a dead driver left
# serving, before these are asked to make room.
_ROOM_FOR_BOTH_S = 5.0
# How long a dead driver's replica that is taken back has to attach (it reconnects
# every 2 s at most) before a new one replaces it.
_COME_BACK_S = 15.0


class Controller(controller_pb2_grpc.ControllerServicer):
    """Owns the replica processes of every app run by this driver."""

    def __init__(self, launcher: Launcher | None = None, succeed: str = "") -> None:
        """``succeed``: the first app this driver runs; on a cluster, the replicas a
        dead driver of it left are taken back (``_succession``)."""
        self._launcher = launcher or LocalProcessLauncher()
        self._succeed = succeed
        self.succession = Succession()  # what it took over from a dead driver, if anything
        self._apps: dict[str, dict[str, _Deployment]] = {}
        self._replicas: dict[str, tuple[_Deployment, _Replica]] = {}
        self._ids = itertools.count(1)
        self._roots: dict[str, str] = {}  # app -> its root deployment
        self._server: grpc.aio.Server | None = None
        self.address = ""  # for processes on this machine
        self.replica_address = ""  # what replicas are told: on TCP when they may be elsewhere
        self.credentials: auth.Credentials | None = None
        self._owned_run_dir: auth.Credentials | None = None  # until aclose() removed it
        # Called on the controller's loop at each change of a deployment's replicas
        # (`streamwise run` prints progress lines from it); cheap, and never blocking.
        self.observers: list[Callable[[_Deployment], None]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        """Make the app's credentials and start the control service; returns its address.

        On a cluster, with the replicas a dead driver of the app left running, take
        its credentials and its controller's address instead (``_succession``); if
        that address cannot be had, start afresh and have them replaced.
        """
        estate = None
        if self._succeed and self._launcher.spans_machines:  # (never on one machine)
            try:
                estate = await self._launcher.inheritance(self._succeed)
            except Exception:  # best effort: they are replaced then
                log.exception("could not look for the replicas a dead driver of %r left", self._succeed)
        if estate is not None:
            try:
                return await self._start(estate)
            except RuntimeError as exc:
                log.warning(
                    "cannot listen where the dead driver of %r did (%s): its replicas are replaced", self._succeed, exc
                )
        return await self._start(None)

    async def _start(self, estate: Estate | None) -> str:
        kept = auth.keep_run_dirs(estate.credentials.run_dirs) if estate is not None else []  # before the sweep
        try:
            credentials = self.credentials = self._owned_run_dir = auth.new_credentials(
                spans_machines=self._launcher.spans_machines, inherited=estate.credentials if estate else None
            )
        except BaseException:
            auth.release_kept(kept)
            raise
        try:
            pings = _wire.CONTROL_PINGS_ALLOWED if self._launcher.spans_machines else ()
            # Without SO_REUSEPORT (GRPC_OPTIONS): taking a dead driver's port fails
            # rather than sharing it, should that driver live after all.
            server = auth.internal_server(credentials, (*_wire.GRPC_OPTIONS, *pings))
            controller_pb2_grpc.add_ControllerServicer_to_server(self, server)
            address = auth.bind_unix(server, credentials.socket("controller"))
            if self._launcher.spans_machines:  # replicas on other nodes reach it here
                port = estate.controller_port if estate is not None else 0
                self.replica_address = auth.bind_tcp(server, credentials, self._launcher.host, port)
            else:
                self.replica_address = address
            await server.start()
        except BaseException:
            self._owned_run_dir = None
            auth.remove_run_dir(credentials)
            auth.release_kept(kept)
            raise
        self._server = server
        self.address = address
        if estate is not None:
            # Deploys take the dead driver's replicas back; those of apps not deployed
            # within the grace they had anyway are let go then.
            self.succession.take(estate, kept, self._launcher.controller_grace_s, self.retire_orphans)
            self._ids = itertools.count(self.succession.first_own_id)
            log.warning(
                "found %d replica(s) of %s left running by a dead driver: taking back those that run the same code",
                len(estate.replicas), ", ".join(sorted({repr(r.legacy.app) for r in estate.replicas})),
            )
        return self.address

    async def aclose(self) -> None:
        """Stop every app (gracefully, then by force), then the control service, and
        remove the run directory (also when stopping is cancelled or fails)."""
        try:
            for name in list(self._apps):
                await self.delete_app(name)
            await self.succession.aclose()
            for app in self.succession.apps():
                await self.retire_orphans(app)
            if self._server is not None:
                await self._server.stop(0.5)
                self._server = None
        finally:
            self.succession.remove_kept()
            await self._launcher.aclose()
            _logs.stop_writer()  # every replica has exited: its output is all queued
            credentials, self._owned_run_dir = self._owned_run_dir, None
            if credentials is not None:
                auth.remove_run_dir(credentials)

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def launcher_host(self) -> str:
        """The driver's address for processes on other machines ("" on one machine)."""
        return self._launcher.host if self._launcher.spans_machines else ""

    # -- apps ------------------------------------------------------------------------

    def app_names(self) -> list[str]:
        return sorted(self._apps)

    async def deploy(self, plan: AppPlan) -> None:
        """Start all replicas of ``plan`` in parallel and wait until each is running.

        Raises DeploymentStartupError (and stops the app) if a deployment's
        constructor keeps failing. Cancelling stops whatever was started.
        """
        if plan.name in self._apps:
            await self.delete_app(plan.name)
        deployments = {spec.config.name: _Deployment(spec, self.observers) for spec in plan.specs}
        if self._launcher.spans_machines:  # for the app's next driver, and to take replicas back
            for dep in deployments.values():
                dep.code_version = await asyncio.to_thread(code_version, dep.spec)
        self._apps[plan.name] = deployments
        self._roots[plan.name] = plan.root.config.name
        first_ready = []
        for dep in deployments.values():
            claimed = self._claim(dep)
            first_ready += [self._add_slot(dep, replica) for replica in claimed]
            first_ready += [self._add_slot(dep) for _ in range(dep.config.start_replicas - len(claimed))]
        self.succession.notify()
        try:
            ready = asyncio.gather(*first_ready)
            ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, should we not await it
            await asyncio.wait({ready}, timeout=_ROOM_FOR_BOTH_S)
            if not ready.done() and any(s.replica is None for dep in deployments.values() for s in dep.slots):
                # Not placed yet: the replicas a dead driver left serving may hold what
                # these need, so they make room first (see retire_orphans).
                await self.retire_orphans(plan.name)
            await ready
        except BaseException:
            await self.delete_app(plan.name)
            raise
        for dep in deployments.values():
            self._follow_autoscaling(dep)

    async def retire_orphans(self, app: str) -> None:
        """Have the replicas of ``app`` that a dead driver left serving drain and go
        (on a cluster, ``_outage``), but those taken back. Called once this driver's
        own serve the app (and its public port), so that clients move over without a
        gap; earlier when those could not be placed beside them."""
        unclaimed = self.succession.unclaimed(app)
        root = self._roots.get(app) or next((r.legacy.root for r in unclaimed if r.legacy.root), "")
        with self.succession.retiring(app):
            try:
                await self._launcher.retire_orphans(app, root, unclaimed)
            except Exception:  # best effort: they end after their grace anyway
                log.exception("could not stop the replicas of %r a dead driver left", app)

    def _claim(self, dep: _Deployment) -> list[_Replica]:
        """Take back the dead driver's replicas of ``dep`` that run its code version
        now, as many as it may run (their Attach, waiting or to come, proceeds)."""
        autoscaling = dep.config.autoscaling_config
        room = autoscaling.max_replicas if autoscaling is not None else dep.config.start_replicas
        with self.succession.claim(dep.spec.app, dep.config.name, dep.code_version, room) as claimed:
            if claimed:
                log.warning("taking back %d replica(s) of %r", len(claimed), dep.config.name)
            return [self._adopt(dep, inherited) for inherited in claimed]

    async def _deployment_soon(self, app: str, name: str) -> _Deployment | None:
        """The deployment ``name`` of ``app``, None if there is none; while a dead
        driver's replicas of ``app`` wait to be claimed, once it is deployed, and
        its replicas being taken back have attached (or failed to). While those it
        replaces serve, once one of its own runs: so their routers (asking here)
        never trade the replicas they know for none."""
        while True:
            changed = self.succession.changed
            dep = self._apps.get(app, {}).get(name)
            if dep is None and not self.succession.holds(app):
                return None  # (routers of those retiring keep what they know while they drain)
            if dep is not None and not dep.adopting() and (dep.running() or not self.succession.replaces(app, name)):
                return dep
            await changed.wait()

    def _add_slot(self, dep: _Deployment, adopted: _Replica | None = None) -> asyncio.Future[None]:
        """Start supervising one more replica of ``dep`` (first, the dead driver's
        replica ``adopted``); the future is set once it runs (or set to the error that
        made its constructor fail for good)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        slot = _Slot(replica=adopted)
        slot.task = loop.create_task(self._supervise(dep, slot, ready))
        dep.slots.append(slot)
        return ready

    def deployment(self, app: str, name: str) -> _Deployment:
        """The deployment ``name`` of ``app``; DeploymentNotFoundError naming what runs."""
        dep = self._apps.get(app, {}).get(name)
        if dep is None:
            running = ", ".join(f"{a}/{d}" for a, deps in self._apps.items() for d in deps) or "none"
            raise DeploymentNotFoundError(f"{app}/{name}", f"running: {running}")
        return dep

    def deployments(self, app: str) -> dict[str, _Deployment]:
        return dict(self._apps.get(app, {}))

    def all_deployments(self) -> dict[str, dict[str, _Deployment]]:
        """Every app's deployments, by app and name (a copy)."""
        return {app: dict(deps) for app, deps in self._apps.items()}

    def root(self, app: str) -> str:
        return self._roots.get(app, "")

    async def scale(self, app: str, name: str, num_replicas: int) -> None:
        """Run ``num_replicas`` replicas of the deployment from now on (autoscaling off).

        New replicas start at once (returns once they run); replicas beyond the
        number drain, so no call in flight is dropped: routers stop choosing them
        first, then each finishes its calls (within its graceful_shutdown_timeout_s).
        """
        dep = self.deployment(app, name)
        dep.reconfigure(dataclasses.replace(dep.config, num_replicas=num_replicas, autoscaling_config=None))
        self._follow_autoscaling(dep)
        await self._resize(dep, num_replicas)

    async def autoscale(
        self, app: str, name: str, min_replicas: int | None = None, max_replicas: int | None = None
    ) -> None:
        """Autoscale the deployment within new bounds (each None: keep it, or for a
        deployment not autoscaled yet, its replica count now); returns once the count
        is within them."""
        dep = self.deployment(app, name)
        old = dep.config.autoscaling_config
        current = dep.target
        lo = min_replicas if min_replicas is not None else (old.min_replicas if old else min(current, max_replicas or current))
        hi = max_replicas if max_replicas is not None else (old.max_replicas if old else max(current, lo, 1))
        base = old or AutoscalingConfig()
        autoscaling = dataclasses.replace(base, min_replicas=lo, max_replicas=hi, initial_replicas=None)
        num_replicas = dep.config.num_replicas if dep.config.num_replicas == "auto" else None
        dep.reconfigure(dataclasses.replace(dep.config, num_replicas=num_replicas, autoscaling_config=autoscaling))
        self._follow_autoscaling(dep)
        if autoscaling.clamp(current) != current:
            await self._resize(dep, autoscaling.clamp(current))

    async def _resize(self, dep: _Deployment, num_replicas: int) -> None:
        """Start or retire slots so that ``num_replicas`` remain; returns once the new
        replicas run and the retired ones have drained."""
        live = [slot for slot in dep.slots if not slot.retired]
        if num_replicas > len(live):
            ready = [self._add_slot(dep) for _ in range(num_replicas - len(live))]
            try:
                await asyncio.gather(*ready)
            finally:  # a slot whose replica could not start is given up
                dep.slots = [s for s in dep.slots if s.task is None or not s.task.done()]
            return
        # Retire those not running yet first, then the youngest.
        order = sorted(
            live,
            key=lambda s: (s.replica is not None and s.replica.state is ReplicaState.RUNNING,
                           -(s.replica.started_at if s.replica else 0.0)),
        )
        retired = order[: len(live) - num_replicas]
        for slot in retired:
            slot.retired = True
        await asyncio.gather(*(self._retire(dep, slot) for slot in retired))

    async def _retire(self, dep: _Deployment, slot: _Slot) -> None:
        if slot.replica is not None and slot.replica.state is not ReplicaState.STOPPED:
            await self._stop_replica(dep, slot.replica)
        if slot.task is not None:
            await asyncio.gather(slot.task, return_exceptions=True)
        if slot in dep.slots:
            dep.slots.remove(slot)

    def reconfigure(self, app: str, name: str, user_config: object) -> None:
        """Deliver ``user_config`` to ``reconfigure()`` of every live replica of the
        deployment, and build later replicas with it."""
        dep = self.deployment(app, name)
        dep.reconfigure(dataclasses.replace(dep.config, user_config=user_config))
        message = controller_pb2.ControlMessage(user_config=codec.cloudpickle_dumps(user_config))
        for replica in dep.replicas.values():
            # Starting ones too: they may have read the old spec; the queue waits for them.
            if not replica.released.is_set():
                replica.control.put_nowait(message)

    # -- autoscaling -----------------------------------------------------------------

    def _follow_autoscaling(self, dep: _Deployment) -> None:
        """Start or stop autoscaling ``dep`` as its config now says, and tell its
        replicas (on their control stream) and routers (in the replica set) how often
        to report their load."""
        if dep.autoscaler is None and dep.config.autoscaling_config is not None:
            dep.autoscaler = Autoscaler(
                dep.spec.app,
                dep.config.name,
                dep.load,
                lambda: dep.target,
                dep.running,
                lambda n: self._resize(dep, n),
            )
        if dep.autoscaler is not None:
            dep.autoscaler.follow(dep.config.autoscaling_config)
        message = dep.reporting_message()
        for replica in dep.replicas.values():
            if not replica.released.is_set():
                replica.control.put_nowait(message)
        dep.publish()

    async def delete_app(self, name: str) -> None:
        deployments = self._apps.pop(name, None)
        self._roots.pop(name, None)
        if not deployments:
            return
        self.succession.notify()
        await asyncio.gather(*(self._stop_deployment(dep) for dep in deployments.values()))

    async def _stop_deployment(self, dep: _Deployment) -> None:
        dep.stopping = True
        dep.deleted = True
        dep.publish()
        if dep.autoscaler is not None:
            await dep.autoscaler.aclose()
        await asyncio.gather(*(self._stop_replica(dep, r) for r in list(dep.replicas.values())))
        tasks = [slot.task for slot in dep.slots if slot.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_replica(self, dep: _Deployment, replica: _Replica) -> None:
        replica.state = ReplicaState.DRAINING
        dep.publish()  # routers stop choosing it before it starts refusing calls
        replica.process.terminate()
        try:
            await asyncio.wait_for(
                asyncio.shield(replica.process.wait()),
                dep.config.graceful_shutdown_timeout_s + _KILL_GRACE_S,
            )
        except TimeoutError:
            replica.process.kill()
            await replica.process.wait()
        replica.state = ReplicaState.STOPPED
        replica.release()
        dep.notify()  # routers learnt of it when it began draining; observers count it stopped

    # -- supervision -----------------------------------------------------------------

    async def _supervise(self, dep: _Deployment, slot: _Slot, first_ready: asyncio.Future[None]) -> None:
        """Keep ``slot`` of ``dep`` filled until the deployment stops or the slot retires."""
        try:
            await self._keep_filled(dep, slot, first_ready)
        finally:
            if not first_ready.done():  # retired or stopped before its replica ran: nothing to wait for
                first_ready.set_result(None)

    async def _keep_filled(self, dep: _Deployment, slot: _Slot, first_ready: asyncio.Future[None]) -> None:
        """Fill ``slot``: first with the replica taken back it holds, if any."""
        failures = 0
        last_error: replica_pb2.RemoteError | None = None
        last_output = ""  # of the last replica that exited without reporting an error
        backoff = iter(_RESTART_BACKOFF_S)
        while not dep.stopping and not slot.retired:
            adopted = slot.replica is not None and slot.replica.adopted and slot.replica.state is ReplicaState.STARTING
            if adopted:
                assert slot.replica is not None
                replica = slot.replica
            else:
                try:
                    replica = slot.replica = await self._spawn(dep)
                except StreamwiseError as exc:  # the launcher could not start it (nowhere to place it)
                    if not first_ready.done():
                        first_ready.set_exception(
                            DeploymentStartupError(type(exc).__name__, str(exc), "", dep.config.name)
                        )
                        return
                    log.error("could not start a replica of %r: %s", dep.config.name, exc)
                    await asyncio.sleep(next(backoff, _RESTART_BACKOFF_S[-1]))
                    continue
            try:
                if slot.retired:  # retired while its process was being started
                    await self._reap(replica)
                    return
                error = await self._wait_attached(replica, _COME_BACK_S if adopted else None)
                if adopted and (error is not None or replica.address == ""):
                    log.warning("replica %s of %r did not come back; starting a new one", replica.replica_id, dep.config.name)
                    await self._stop_replica(dep, replica)  # it may still serve: drain it
                    continue
                if error is not None or replica.address == "":
                    failures += 1
                    last_error = error or last_error
                    await self._reap(replica)
                    if error is None:
                        last_output = replica.process.last_output()
                    if not first_ready.done() and failures >= dep.config.max_constructor_attempts:
                        first_ready.set_exception(self._startup_error(dep, last_error, last_output))
                        return
                    if first_ready.done():
                        await asyncio.sleep(next(backoff, _RESTART_BACKOFF_S[-1]))
                    continue
                failures = 0
                backoff = iter(_RESTART_BACKOFF_S)
                replica.state = ReplicaState.RUNNING
                dep.publish()
                self.succession.notify()  # for routers waiting for a replica of it (_deployment_soon)
                if not first_ready.done():
                    first_ready.set_result(None)
                await self._monitor(dep, replica)
            finally:
                if dep.stopping:
                    replica.process.kill()  # started while the deployment was stopping
                self._forget(dep, replica)
            if not dep.stopping and not slot.retired:
                dep.restarts += 1
                log.warning("replica %s of %r stopped; starting a new one", replica.replica_id, dep.config.name)

    def _startup_error(
        self, dep: _Deployment, error: replica_pb2.RemoteError | None, last_output: str = ""
    ) -> DeploymentStartupError:
        """The error ``run()`` raises: the constructor's, or, for a replica that exited
        before it could say (a failure outside user code), what it last wrote to stderr
        in place of a traceback."""
        attempts = dep.config.max_constructor_attempts
        if error is None:
            return DeploymentStartupError(
                "ProcessExited", f"replica process exited before it was ready ({attempts} attempts)",
                last_output, dep.config.name,
            )
        return DeploymentStartupError(
            error.type_name, f"{error.message} ({attempts} attempts)", error.traceback, dep.config.name
        )

    async def _spawn(self, dep: _Deployment) -> _Replica:
        replica_id = f"{dep.config.name}#{next(self._ids)}"
        assert self.credentials is not None
        token = auth.new_token()
        config = dep.config
        legacy = None
        if self._launcher.spans_machines:  # for the app's next driver, should this one die
            legacy = Legacy(
                app=dep.spec.app, deployment=config.name, root=self._roots.get(dep.spec.app, ""),
                controller=self.replica_address,
                table=dep.spec.front.table_address if dep.spec.front is not None else "",
                code_version=dep.code_version,
            )
        process = await self._launcher.start(
            replica_id,
            self.replica_address,
            auth.write_handoff(self.credentials, token),
            _logs.log_path(self.credentials.run_dir, dep.spec.app, replica_id),
            Placement(
                app=dep.spec.app,
                deployment=config.name,
                ray_actor_options=config.ray_actor_options,
                max_replicas_per_node=config.max_replicas_per_node,
            ),
            legacy,
        )
        return self._track(dep, _Replica(replica_id, process, token))

    def _adopt(self, dep: _Deployment, inherited: InheritedReplica) -> _Replica:
        """Supervise a dead driver's replica of ``dep`` (just claimed) from now on. It
        gets this deploy's ``user_config`` (its ``reconfigure()`` runs again), as a new
        replica would."""
        assert self.credentials is not None
        log_path = _logs.log_path(self.credentials.run_dir, dep.spec.app, inherited.replica_id)
        process = self._launcher.adopt(inherited, log_path)
        replica = self._track(dep, _Replica(inherited.replica_id, process, inherited.token, adopted=True))
        if dep.config.user_config is not None:
            replica.control.put_nowait(
                controller_pb2.ControlMessage(user_config=codec.cloudpickle_dumps(dep.config.user_config))
            )
        return replica

    def _track(self, dep: _Deployment, replica: _Replica) -> _Replica:
        if dep.report_interval_s > 0:  # read once it attaches
            replica.control.put_nowait(dep.reporting_message())
        dep.replicas[replica.replica_id] = replica
        self._replicas[replica.replica_id] = (dep, replica)
        return replica

    async def _wait_attached(self, replica: _Replica, timeout_s: float | None = None) -> replica_pb2.RemoteError | None:
        """The constructor's error, or None once attached (address set), exited, or
        ``timeout_s`` passed."""
        exited = asyncio.ensure_future(replica.process.wait())
        try:
            await asyncio.wait({exited, replica.attached}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if replica.attached.done():
            return replica.attached.result()
        return None

    async def _monitor(self, dep: _Deployment, replica: _Replica) -> None:
        """Return when the replica's process has exited; kill it if health checks fail."""
        exited = asyncio.ensure_future(replica.process.wait())
        channel = auth.channel(replica.address, _wire.GRPC_OPTIONS)
        stub = replica_pb2_grpc.ReplicaStub(channel)
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=dep.config.health_check_period_s)
                if done or dep.stopping or replica.state is ReplicaState.DRAINING:  # it is going anyway
                    await exited
                    return
                if not await self._healthy(stub, dep, replica):
                    # Stop it gracefully first: its in-flight calls and spans get to finish.
                    await self._stop_replica(dep, replica)
                    return
        finally:
            exited.cancel()
            await channel.close()

    async def _healthy(self, stub: replica_pb2_grpc.ReplicaStub, dep: _Deployment, replica: _Replica) -> bool:
        try:
            reply = await stub.CheckHealth(
                replica_pb2.HealthRequest(), timeout=dep.config.health_check_timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if dep.stopping or replica.state is not ReplicaState.RUNNING:
                return True  # it is going anyway: a refused check says nothing
            log.warning("health check of %s failed: %s", replica.replica_id, exc.code().name)
            return False
        if reply.HasField("error"):
            log.warning(
                "health check of %s failed: %s: %s", replica.replica_id, reply.error.type_name, reply.error.message
            )
            return False
        return True

    async def _reap(self, replica: _Replica) -> None:
        replica.process.kill()
        await replica.process.wait()

    def _forget(self, dep: _Deployment, replica: _Replica) -> None:
        replica.state = ReplicaState.STOPPED
        replica.release()
        # The process has exited: free the shared memory only it still held, before a
        # replacement starts (so its readiness also means the memory is back).
        objectstore.reclaim()
        if self.credentials is not None:  # its sockets, should it have died without removing them
            auth.remove_sockets(self.credentials, replica.process.pid)
        if dep.replicas.pop(replica.replica_id, None) is not None:
            dep.publish()
        self._replicas.pop(replica.replica_id, None)
        self.succession.notify()  # it may have been one being taken back (_deployment_soon)

    # -- gRPC service ----------------------------------------------------------------

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        assert self.credentials is not None
        return self.credentials.metadata

    async def _launched(self, replica_id: str, context: grpc.aio.ServicerContext) -> tuple[_Deployment, _Replica]:
        """The replica ``replica_id``, if the caller is the process launched for it.
        A dead driver's replica waits until it is taken back (or, let go, until it
        has drained and exited)."""
        found = self._replicas.get(replica_id)
        token = auth.presented(context.invocation_metadata(), auth.REPLICA_TOKEN_KEY)
        if found is None and await self.succession.wait_claimed(replica_id, token):
            found = self._replicas.get(replica_id)
        elif found is None and self.succession.theirs(replica_id):
            # A dead driver's replica this driver did not find (or let go): it rides
            # out as before, until it is stopped or its grace ends.
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"replica {replica_id!r} is not among those this driver took over"
            )
        if found is None or token is None or not auth.same(token, found[1].token):
            log.warning("refused a replica's call for %r: not the process launched for it", replica_id)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"not the process launched for replica {replica_id!r}"
            )
        return found

    async def GetReplicaSpec(self, request: controller_pb2.SpecRequest, context: grpc.aio.ServicerContext) -> controller_pb2.SpecReply:
        dep, _ = await self._launched(request.replica_id, context)
        return controller_pb2.SpecReply(sys_path=[p for p in sys.path if p], spec=dep.spec_bytes)

    async def Attach(
        self, request: controller_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[controller_pb2.ControlMessage]:
        dep, replica = await self._launched(request.replica_id, context)
        if request.HasField("error"):
            if not replica.attached.done():
                replica.attached.set_result(request.error)
            return
        replica.address = request.address
        replica.local_address = request.local_address
        replica.node = request.node
        replica.model_capacity = request.model_capacity
        replica.store_session = request.store_session
        # A replica on another node attaches again after losing its stream (``_outage``):
        # the new stream takes over, and the old one, if not yet noticed dead, takes
        # no command away from it.
        previous, replica.stream = replica.stream, asyncio.current_task()
        if previous is not None and previous is not replica.stream:
            previous.cancel()
        await context.send_initial_metadata(())  # tells the replica it is attached
        if not replica.attached.done():
            replica.attached.set_result(None)
        if previous is not None:
            # Attached again: what was sent meanwhile may have gone down the dead
            # stream, so the replica gets the current settings once more.
            if dep.report_interval_s > 0:
                yield dep.reporting_message()
            if dep.config.user_config is not None:
                yield controller_pb2.ControlMessage(user_config=codec.cloudpickle_dumps(dep.config.user_config))
        # The open stream tells the replica we are alive, and carries its commands.
        while (message := await replica.control.get()) is not None:
            yield message

    async def WatchReplicas(self, request: controller_pb2.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[controller_pb2.ReplicaSet]:
        dep = await self._deployment_soon(request.app, request.deployment)
        if dep is None:
            running = ", ".join(f"{a}/{d}" for a, deps in self._apps.items() for d in deps) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no deployment {request.deployment!r} in app {request.app!r} (running: {running})",
            )
        seen = -1
        while True:
            changed = dep.changed
            if dep.version != seen:
                seen = dep.version
                yield dep.snapshot()
                if dep.deleted:
                    return
            await changed.wait()

    async def ReportModels(
        self, request: controller_pb2.ModelsReport, context: grpc.aio.ServicerContext
    ) -> controller_pb2.LoadReportAck:
        """A replica's multiplexed models changed: tell every router of its deployment."""
        dep, replica = await self._launched(request.replica_id, context)
        replica.model_ids = tuple(request.model_ids)
        replica.model_capacity = request.model_capacity
        if replica.state is ReplicaState.RUNNING:
            dep.publish()
        return controller_pb2.LoadReportAck()

    async def ReportLoad(
        self, request_iterator: AsyncIterator[controller_pb2.LoadReport], context: grpc.aio.ServicerContext
    ) -> controller_pb2.LoadReportAck:
        """Record one source's load reports until its stream ends, then forget it."""
        source = object()
        dep: _Deployment | None = None
        try:
            async for report in request_iterator:
                if dep is None:
                    dep = await self._deployment_soon(report.app, report.deployment)
                    if dep is None:
                        await context.abort(
                            grpc.StatusCode.NOT_FOUND, f"no deployment {report.deployment!r} in app {report.app!r}"
                        )
                dep.load.record(source, report)
        finally:
            if dep is not None:
                dep.load.forget(source)
        return controller_pb2.LoadReportAck()
