"""The replica process: one user object, one event loop, one gRPC server.

Started by a launcher as ``python -m streamwise.actors.replica``, with its app's
credentials and its own token on a socket only it holds (``streamwise._auth``). It fetches its
spec from the controller, builds the user object, serves it on Unix sockets in the
app's run directory (gRPC, and the same-node socket; the addresses are reported back
through ``Attach``), and keeps the ``Attach`` stream open for its whole life: when the
controller ends that stream the replica drains and exits, and so it does when the
stream breaks: at once on one machine; on a cluster once the controller stayed out
of reach past its grace (``_outage``). SIGTERM also drains: new calls are refused, running ones get
``graceful_shutdown_timeout_s`` to finish, then the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import grpc

from streamwise import _auth as auth, _event_loop as event_loop, objectstore
from streamwise.actors import _outage, multiplex
from streamwise.actors._runtime import RUNTIME
from streamwise.actors.spec import ReplicaSpec
from streamwise.autoscaling.load import LoadReporter
from streamwise.batching.stats import BatchStatsLog
from streamwise.config import env_local_transport
from streamwise.exceptions import ObjectLostError
from streamwise.metrics import recorders
from streamwise.metrics.recorders import ReplicaRecorder
from streamwise.proto import controller_pb2, controller_pb2_grpc
from streamwise.streaming import _local_wire, _wire
from streamwise.streaming._chunks import add_replica_servicer
from streamwise.streaming.direct import DirectFront
from streamwise.streaming.local_server import LocalServer
from streamwise.streaming.schema import rpc_table
from streamwise.streaming.servicer import ReplicaServicer
from streamwise.tracing import setup as tracing

_PR_SET_PDEATHSIG = 1
# Sent by the kernel when the driver dies; distinct from SIGTERM (the controller's
# stop) so the replica knows its driver is gone and may clean its object store.
_DRIVER_DIED = signal.SIGHUP
_driver_gone = False


def _parent_death_signal(sig: int) -> bool:
    """Set the signal the kernel sends when the parent thread dies (0: none); Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return False
    return True


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to signal this process when the driver dies."""
    if _parent_death_signal(_DRIVER_DIED) and os.getppid() != parent_pid:
        os.kill(os.getpid(), _DRIVER_DIED)  # the parent died before prctl took effect


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


async def _follow_controller(
    open_attach: Callable[[], grpc.aio.UnaryStreamCall], user_object: object, reporter: LoadReporter,
    stop: asyncio.Event,
) -> None:
    """Apply controller messages while attached; then ask to stop.

    The replica stops once the controller ends the stream, refuses it, or (on
    another node of a cluster) stays out of reach past ``RUNTIME.controller_grace_s``:
    until then the stream is reopened with a backoff (``_outage``) while the replica
    serves on. Cancelling cancels the stream.
    """
    global _driver_gone
    reconnect = _outage.Reconnect("the controller")
    lost_since: float | None = None
    try:
        while True:
            attach = open_attach()
            try:
                await attach.initial_metadata()
                if not attach.done():  # the controller has taken this replica (again)
                    reconnect.connected()
                    lost_since = None
                async for message in attach:
                    await _apply_control(message, user_object, reporter)
                return  # the controller ended the stream: stop
            except grpc.aio.AioRpcError as exc:
                if not _outage.rides_out(exc):
                    return
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                if now - lost_since >= RUNTIME.controller_grace_s:
                    logging.getLogger("streamwise.replica").error(
                        "the controller stayed out of reach for %.0fs: stopping", RUNTIME.controller_grace_s
                    )
                    _driver_gone = True  # the last of its store session frees it
                    return
                await reconnect.wait(exc)
            finally:
                attach.cancel()
    finally:
        stop.set()


async def _apply_control(message: controller_pb2.ControlMessage, user_object: object, reporter: LoadReporter) -> None:
    if message.HasField("load_reporting"):
        reporter.start(message.load_reporting.interval_s)
    if message.user_config:
        reconfigure = getattr(user_object, "reconfigure", None)
        if reconfigure is None:
            return
        try:
            await _maybe_await(reconfigure(cloudpickle.loads(message.user_config)))
        except Exception:  # the replica keeps serving with what it had
            logging.getLogger("streamwise.replica").exception("reconfigure() failed; keeping the old config")


async def _report_models(
    stub: controller_pb2_grpc.ControllerStub, replica_id: str, metadata: tuple[tuple[str, str], ...],
    capacity: int, changed: asyncio.Event,
) -> None:
    """Tell the controller the multiplexed models held, each time they change (only
    the latest, should they change faster than it is told); ends with the controller
    (or, while the replica rides out losing it, tries again)."""
    reconnect = _outage.Reconnect("the controller's model reports")
    while True:
        await changed.wait()
        changed.clear()
        report = controller_pb2.ModelsReport(replica_id=replica_id, model_ids=multiplex.held(), model_capacity=capacity)
        try:
            await stub.ReportModels(report, metadata=metadata, timeout=10)
            reconnect.connected()
        except grpc.aio.AioRpcError as exc:
            if not _outage.rides_out(exc):
                return
            changed.set()  # the report is still to be made
            await reconnect.wait(exc)


def _recorder(spec: ReplicaSpec, replica_id: str, user_object: object) -> ReplicaRecorder | None:
    """This replica's metrics recorder, listening to its @batch methods; None when off."""
    if not recorders.ENABLED:
        return None
    recorder = ReplicaRecorder(spec.app, spec.config.name, replica_id)
    recorders.REGISTRY.register(recorder)
    for name in spec.methods:
        stats = getattr(getattr(user_object, name, None), "stats", None)
        if isinstance(stats, BatchStatsLog):
            stats.add_listener(recorder.batch_listener(name))
    return recorder


async def serve(
    controller_address: str, replica_id: str, credentials: auth.Credentials, token: str, listen_host: str = "",
    controller_grace_s: float = 0.0,
) -> int:
    """Run the replica until told to stop; the exit code says whether it started."""
    loop = asyncio.get_running_loop()
    RUNTIME.set_controller(controller_address, credentials)
    RUNTIME.controller_grace_s = controller_grace_s
    RUNTIME.core_loop = loop
    RUNTIME.replica_id = replica_id
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def driver_died() -> None:
        global _driver_gone
        _driver_gone = True
        # The kernel signals again each time this process is handed to another of the
        # dying driver's threads; once is enough (later ones would find no handler).
        _parent_death_signal(0)
        stop.set()

    loop.add_signal_handler(_DRIVER_DIED, driver_died)

    # Only a replica that rides out a lost controller needs to find out a silent one.
    keepalive = _wire.CONTROL_KEEPALIVE if controller_grace_s > 0 else ()
    channel = auth.channel(controller_address, (*_wire.GRPC_OPTIONS, *keepalive))
    stub = controller_pb2_grpc.ControllerStub(channel)
    as_launched = (*credentials.metadata, (auth.REPLICA_TOKEN_KEY, token))
    try:
        reply = await stub.GetReplicaSpec(controller_pb2.SpecRequest(replica_id=replica_id), metadata=as_launched)
        for entry in reversed(reply.sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        spec: ReplicaSpec = cloudpickle.loads(reply.spec)
        config = spec.config
        tracing.configure(
            spec.tracing,
            config.name,
            replica=True,
            **{"streamwise.deployment": config.name, "streamwise.replica_id": replica_id},
        )
        executor = ThreadPoolExecutor(
            max_workers=max(4, config.max_ongoing_requests), thread_name_prefix=f"{config.name}-worker"
        )
        try:
            user_object = spec.instantiate()
            if config.user_config is not None and hasattr(user_object, "reconfigure"):
                await _maybe_await(user_object.reconfigure(config.user_config))
            rpcs = None
            if spec.servicer_functions is not None:
                rpcs = rpc_table(spec.servicer_functions, spec.methods)
        except Exception as exc:
            # Report the failure and wait for the controller to close the stream.
            failed = stub.Attach(
                controller_pb2.AttachRequest(replica_id=replica_id, error=_wire.error_to_proto(exc)), metadata=as_launched
            )
            async for _ in failed:
                pass
            return 1

        server = auth.internal_server(credentials, _wire.GRPC_OPTIONS)
        recorder = _recorder(spec, replica_id, user_object)
        servicer = ReplicaServicer(
            user_object,
            spec.methods,
            deployment=config.name,
            replica_id=replica_id,
            max_ongoing_requests=config.max_ongoing_requests,
            coalesce=config.coalesce,
            executor=executor,
            rpcs=rpcs,
            recorder=recorder,
        )
        if recorder is not None:
            recorder.watch_ongoing(lambda: servicer.ongoing)
        reporter = LoadReporter(
            (spec.app, config.name), controller_address, credentials, lambda: servicer.ongoing, lambda: 0
        )
        add_replica_servicer(servicer, server)  # chunk messages serialized by hand
        grpc_path, local_path = auth.replica_sockets(credentials, os.getpid())
        local = LocalServer(servicer, credentials) if env_local_transport() else None
        follower: asyncio.Task[None] | None = None
        front: DirectFront | None = None  # this replica's listener on the app's public port
        models_changed = asyncio.Event()
        multiplex.set_listener(lambda: loop.call_soon_threadsafe(models_changed.set))
        model_capacity = multiplex.capacity_of(user_object)
        models = loop.create_task(_report_models(stub, replica_id, as_launched, model_capacity, models_changed))
        try:
            address = auth.bind_unix(server, grpc_path)
            if listen_host:  # callers on other nodes: TCP, with the app's TLS and secret
                address = auth.bind_tcp(server, credentials, listen_host)
            await server.start()
            if spec.front is not None:
                front = DirectFront(
                    spec.front, servicer, app=spec.app, deployment=config.name, methods=spec.methods,
                    replica_id=replica_id, credentials=credentials,
                )
                await front.start()
            attached = controller_pb2.AttachRequest(
                replica_id=replica_id,
                address=address,
                local_address=await local.start(local_path) if local is not None else "",
                node=_local_wire.node_id(),
                model_capacity=model_capacity,
                store_session=objectstore.session_name(),
            )
            follower = loop.create_task(
                _follow_controller(
                    functools.partial(stub.Attach, attached, metadata=as_launched), user_object, reporter, stop
                )
            )
            await stop.wait()
            grace = config.graceful_shutdown_timeout_s
            # The public listener first: new clients go to the port's other listeners.
            await asyncio.gather(servicer.drain(grace), *([front.aclose(grace)] if front is not None else []))
        finally:
            if front is not None:
                await front.aclose(0)
            multiplex.set_listener(None)
            models.cancel()
            await reporter.aclose()
            if follower is not None:
                follower.cancel()
            if local is not None:
                await local.aclose()
            await server.stop(0)
            auth.remove_sockets(credentials, os.getpid())
            await asyncio.gather(models, *([follower] if follower is not None else []), return_exceptions=True)
            await RUNTIME.close_routing()
            executor.shutdown(wait=False, cancel_futures=True)
        return 0
    finally:
        tracing.shutdown()  # flush this replica's spans
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamwise.actors.replica")
    parser.add_argument("--controller", required=True)
    parser.add_argument("--replica-id", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--store-session", required=True)
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--listen-host", default="", help="also serve callers on other nodes, on this address")
    parser.add_argument(
        "--controller-grace-s", type=float, default=0.0, help="serve on this long while the controller is out of reach"
    )
    args = parser.parse_args(argv)
    credentials, token = auth.read_handoff(args.handoff_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _die_with_parent(args.parent_pid)
    try:
        objectstore.join_session(args.store_session)
    except ObjectLostError:
        if not credentials.node_dir:
            raise
        # Not the driver's machine: this process keeps a store session of its own.
    code = 1
    try:
        code = event_loop.run(serve(
            args.controller, args.replica_id, credentials, token, args.listen_host, args.controller_grace_s
        ))
        return code
    finally:
        if credentials.node_dir:
            auth.remove_run_dir(credentials)
        # The last process of a dead driver's session deletes its shared memory.
        objectstore.close_session(driver_gone=_driver_gone)
        if _driver_gone:
            # Nobody is left to stop this process: a thread stuck in user code must not
            # keep it (and what it holds, a GPU's memory say) alive at interpreter exit.
            if sys.exc_info()[0] is not None:
                traceback.print_exc()  # os._exit would swallow it
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
