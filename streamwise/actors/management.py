"""The management API of a running driver: status, scaling, user_config, delete, shutdown.

It is a gRPC service (``proto/management.proto``) on its own Unix socket in the
driver's run directory, beside a ``management.token`` file (mode 0600) that every
call must carry: the ``streamwise`` CLI, or any program of the same user, reads both
to manage the apps. ``driver.json`` there says which process it is.

With ``ManagementOptions`` the same service is also served on a TCP port, for
operators on other machines, with TLS only. Who may connect there: anyone who can
reach the port may open a TLS connection (or, with ``ssl_client_ca``, only a client
presenting a certificate signed by that CA, checked in the TLS handshake); every call
must then carry the management token, compared in constant time before its request
is read (``UNAUTHENTICATED`` otherwise), exactly as on the Unix socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from streamwise import _auth as auth
from streamwise.config import AutoscalingConfig, ManagementOptions, read_pem_file
from streamwise.exceptions import DeploymentNotFoundError, StreamwiseError, UsageError
from streamwise.proto import management_pb2, management_pb2_grpc, replica_pb2
from streamwise.streaming import _wire

if TYPE_CHECKING:
    from streamwise.actors._deployment_state import _Deployment
    from streamwise.actors.controller import Controller

SOCKET = "management"
TOKEN_FILE = "management.token"
DRIVER_FILE = "driver.json"
_STATS_TIMEOUT_S = 1.0
# The TCP listener serves callers before they prove anything: keep what each may cost small.
_TCP_OPTIONS = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
    ("grpc.max_allowed_incoming_connections", 64),
    ("grpc.server_handshake_timeout_ms", 10_000),
)


def _config_json(dep: _Deployment) -> str:
    fields = dataclasses.asdict(dep.config) if dataclasses.is_dataclass(dep.config) else {}
    return json.dumps(fields, default=repr, sort_keys=True)


async def _ongoing(address: str, metadata: tuple[tuple[str, str], ...]) -> int:
    """The replica's calls in flight, or -1 if it does not answer in time."""
    reply = await _wire.ask_replica(address, metadata, "Stats", replica_pb2.StatsRequest(), _STATS_TIMEOUT_S)
    return -1 if reply is None else reply.ongoing_requests


async def deployment_status(controller: Controller, dep: _Deployment, *, replicas: bool = True) -> management_pb2.DeploymentStatus:
    """What an operator sees of one deployment (asking each running replica its load)."""
    from streamwise.actors._deployment_state import ReplicaState

    now = time.monotonic()
    live = list(dep.replicas.values())
    running = sum(r.state is ReplicaState.RUNNING for r in live)
    status = management_pb2.DeploymentStatus(
        name=dep.config.name,
        target_replicas=dep.target,
        running_replicas=running,
        restarts=dep.restarts,
        config_json=_config_json(dep),
        status="HEALTHY" if running == dep.target == len(live) else "UPDATING",
    )
    autoscaling = dep.config.autoscaling_config
    if autoscaling is not None:
        status.autoscaling.CopyFrom(
            management_pb2.AutoscalingStatus(
                min_replicas=autoscaling.min_replicas,
                max_replicas=autoscaling.max_replicas,
                target_ongoing_requests=autoscaling.target_ongoing_requests,
                ongoing_requests=dep.seen_load[0],
                queued_requests=dep.seen_load[1],
            )
        )
    if replicas:
        metadata = controller.credentials.metadata if controller.credentials is not None else ()
        loads = await asyncio.gather(
            *(_ongoing(r.address, metadata) if r.state is ReplicaState.RUNNING else _none() for r in live)
        )
        for replica, load in zip(live, loads, strict=True):
            status.replicas.append(
                management_pb2.ReplicaStatus(
                    replica_id=replica.replica_id,
                    state=replica.state.name,
                    node=replica.node,
                    pid=replica.process.pid,
                    address=replica.address,
                    uptime_s=now - replica.started_at,
                    ongoing_requests=load,
                    model_ids=replica.model_ids,
                )
            )
    return status


async def _none() -> int:
    return -1


async def application_status(controller: Controller, app: str, *, replicas: bool = True) -> management_pb2.ApplicationStatus:
    deployments = controller.deployments(app)
    if not deployments:
        raise DeploymentNotFoundError(app, f"no application {app!r}; running: {', '.join(controller.app_names()) or 'none'}")
    statuses = [await deployment_status(controller, dep, replicas=replicas) for dep in deployments.values()]
    return management_pb2.ApplicationStatus(
        name=app,
        status="RUNNING" if all(s.status == "HEALTHY" for s in statuses) else "DEPLOYING",
        root_deployment=controller.root(app),
        deployments=statuses,
        uptime_s=time.monotonic() - min(dep.created_at for dep in deployments.values()),
    )


class ManagementService(management_pb2_grpc.ManagementServicer):
    """The Management RPCs, on the driver's controller.

    ``delete_app`` removes an app from the ingress and the controller (draining it);
    ``on_shutdown`` is awaited when an operator asks the driver to shut down: True if
    someone will now stop the whole driver, else the apps are deleted here.
    """

    def __init__(
        self,
        controller: Controller,
        delete_app: Callable[[str], Awaitable[None]],
        on_shutdown: Callable[[], Awaitable[bool]],
        deploy: Callable[[str, str], Awaitable[list[str]]] | None = None,
        ingress: Callable[[], str] = lambda: "",
    ) -> None:
        self._controller = controller
        self._ingress = ingress
        self._deploy = deploy
        self._delete_app = delete_app
        self._on_shutdown = on_shutdown
        self._background: set[asyncio.Future[None]] = set()

    async def _fail(self, context: grpc.aio.ServicerContext, exc: StreamwiseError) -> None:
        code = grpc.StatusCode.NOT_FOUND if isinstance(exc, DeploymentNotFoundError) else grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(code, str(exc))

    async def ListApplications(self, request: Any, context: grpc.aio.ServicerContext) -> management_pb2.ListApplicationsReply:
        apps = [await application_status(self._controller, app, replicas=False) for app in self._controller.app_names()]
        return management_pb2.ListApplicationsReply(applications=apps, driver_pid=os.getpid(), ingress=self._ingress())

    async def DescribeApplication(self, request: Any, context: grpc.aio.ServicerContext) -> management_pb2.ApplicationStatus:
        try:
            return await application_status(self._controller, request.application)
        except StreamwiseError as exc:
            await self._fail(context, exc)
            raise

    async def ScaleDeployment(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[management_pb2.DeploymentStatus]:
        controller = self._controller
        try:
            dep = controller.deployment(request.application, request.deployment)
        except StreamwiseError as exc:
            await self._fail(context, exc)
            raise
        # Scaling goes on to the end should the caller stop watching (a half-done
        # scale-down would leave replicas draining).
        bounds = request.HasField("min_replicas") or request.HasField("max_replicas")
        if bounds:
            try:
                dataclasses.replace(
                    dep.config.autoscaling_config or AutoscalingConfig(max_replicas=max(1, dep.target)),
                    **{f: getattr(request, f) for f in ("min_replicas", "max_replicas") if request.HasField(f)},
                )
            except StreamwiseError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            scaling = asyncio.ensure_future(controller.autoscale(
                request.application, request.deployment,
                request.min_replicas if request.HasField("min_replicas") else None,
                request.max_replicas if request.HasField("max_replicas") else None,
            ))
        else:
            if request.num_replicas < 1:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "num_replicas must be >= 1; to scale to zero, autoscale with min_replicas 0",
                )
            scaling = asyncio.ensure_future(
                controller.scale(request.application, request.deployment, request.num_replicas)
            )
        self._background.add(scaling)
        scaling.add_done_callback(self._background.discard)
        try:
            while not scaling.done():
                changed = asyncio.ensure_future(dep.changed.wait())
                yield await deployment_status(controller, dep)
                await asyncio.wait({scaling, changed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            scaling.result()  # raises the error that stopped it
        except StreamwiseError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        yield await deployment_status(controller, dep)

    async def UpdateUserConfig(self, request: Any, context: grpc.aio.ServicerContext) -> management_pb2.DeploymentStatus:
        try:
            user_config = json.loads(request.user_config_json) if request.user_config_json else None
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"user_config_json is not JSON: {exc}")
            raise
        try:
            self._controller.reconfigure(request.application, request.deployment, user_config)
            dep = self._controller.deployment(request.application, request.deployment)
        except StreamwiseError as exc:
            await self._fail(context, exc)
            raise
        return await deployment_status(self._controller, dep)

    async def Deploy(self, request: Any, context: grpc.aio.ServicerContext) -> management_pb2.ListApplicationsReply:
        if self._deploy is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this driver does not deploy config files")
            raise AssertionError("unreachable")
        try:
            names = await self._deploy(request.config_yaml, request.filename or "<config>")
        except StreamwiseError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        apps = [await application_status(self._controller, app, replicas=False) for app in names]
        return management_pb2.ListApplicationsReply(applications=apps)

    async def DeleteApplication(self, request: Any, context: grpc.aio.ServicerContext) -> management_pb2.DeleteApplicationReply:
        if request.application not in self._controller.app_names():
            await self._fail(context, DeploymentNotFoundError(request.application, "no such application"))
        await self._delete_app(request.application)
        return management_pb2.DeleteApplicationReply()

    async def Shutdown(self, request: Any, context: grpc.aio.ServicerContext) -> management_pb2.ShutdownReply:
        """Starts shutting down and replies at once: draining can outlast any deadline."""

        async def shut_down() -> None:
            if await self._on_shutdown():
                return  # the driver's owner (`streamwise run`) drains and stops everything
            for app in self._controller.app_names():
                await self._delete_app(app)

        task = asyncio.ensure_future(shut_down())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return management_pb2.ShutdownReply()


@dataclasses.dataclass
class ManagementServer:
    """The Management service on ``<run dir>/management``, and the files beside it;
    on a TCP port with TLS too once ``start_tcp`` is called."""

    service: ManagementService
    run_dir: str
    server: grpc.aio.Server | None = None
    tcp_server: grpc.aio.Server | None = None
    tcp_options: ManagementOptions | None = None
    tcp_address: str = ""
    _credentials: auth.Credentials | None = dataclasses.field(default=None, repr=False)
    _ingress: str = ""

    @property
    def token_path(self) -> str:
        return os.path.join(self.run_dir, TOKEN_FILE)

    async def start(self, ingress: Callable[[], str]) -> None:
        token = auth.new_token()
        _write_private(self.token_path, token)
        credentials = self._credentials = auth.Credentials(secret=token, run_dir=self.run_dir)
        server = auth.internal_server(credentials, _wire.GRPC_OPTIONS)
        management_pb2_grpc.add_ManagementServicer_to_server(self.service, server)
        auth.bind_unix(server, os.path.join(self.run_dir, SOCKET))
        await server.start()
        self.server = server
        self.write_driver_file(ingress())

    async def start_tcp(self, options: ManagementOptions) -> str:
        """Serve the API on ``options.host:options.port`` too, with TLS; returns
        ``host:port`` (the bound port when port=0). Once per driver: other options
        later are a UsageError."""
        if self.tcp_server is not None:
            if options != self.tcp_options:
                raise UsageError("the management API already listens on TCP with other options; shutdown() first")
            return self.tcp_address
        assert self._credentials is not None, "start() first"
        server = auth.internal_server(self._credentials, _TCP_OPTIONS)  # the token, on every call
        management_pb2_grpc.add_ManagementServicer_to_server(self.service, server)
        assert options.ssl_certificate is not None and options.ssl_private_key is not None
        tls = grpc.ssl_server_credentials(
            [(options.ssl_private_key, options.ssl_certificate)],
            root_certificates=options.ssl_client_ca,
            require_client_auth=options.ssl_client_ca is not None,
        )
        target = f"{options.host}:{options.port}"
        try:
            port = server.add_secure_port(target, tls)
        except RuntimeError:
            raise UsageError(
                f"cannot serve the management API on {target}: the address is in use or not this machine's, "
                "or ssl_private_key is not the key of ssl_certificate"
            ) from None
        await server.start()
        self.tcp_server, self.tcp_options = server, options
        host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "[::]") else options.host
        self.tcp_address = f"{host}:{port}"
        self.write_driver_file(self._ingress)
        return self.tcp_address

    def write_driver_file(self, ingress: str) -> None:
        self._ingress = ingress
        info = {"pid": os.getpid(), "started": time.time(), "ingress": ingress, "management": self.tcp_address}
        _write_private(os.path.join(self.run_dir, DRIVER_FILE), json.dumps(info))

    async def aclose(self) -> None:
        """Stop both listeners (calls in flight get half a second to finish)."""
        for name in ("tcp_server", "server"):
            server = getattr(self, name)
            if server is not None:
                await server.stop(0.5)
                setattr(self, name, None)


def _write_private(path: str, text: str) -> None:
    """Write ``text`` to a new file only this user can read, replacing ``path`` at once."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the client side (the CLI) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Driver:
    """A running driver: one of this user's, found through its run directory, or a
    remote one reached over TCP with TLS (``remote_driver``)."""

    run_dir: str  # "" for a remote driver
    pid: int
    ingress: str
    address: str = ""  # host:port of a remote driver's TCP listener
    tls: grpc.ChannelCredentials | None = dataclasses.field(default=None, repr=False, compare=False)
    token: str = dataclasses.field(default="", repr=False)

    @property
    def target(self) -> str:
        return self.address or f"unix:{os.path.join(self.run_dir, SOCKET)}"

    def channel(self) -> grpc.Channel:
        """A new channel to the driver's management API (the caller closes it)."""
        if self.tls is not None:
            return grpc.secure_channel(self.target, self.tls)
        return grpc.insecure_channel(self.target)  # a Unix socket in a private directory

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token:
            return ((auth.SECRET_KEY, self.token),)
        try:
            with open(os.path.join(self.run_dir, TOKEN_FILE)) as f:
                return ((auth.SECRET_KEY, f.read().strip()),)
        except OSError:
            raise UsageError(f"the driver {self.pid} is stopping (its management token is gone)") from None


def running_drivers() -> list[Driver]:
    """Every live driver of this user that serves the management API."""
    drivers = []
    for run_dir in auth.live_run_dirs():
        try:
            with open(os.path.join(run_dir, DRIVER_FILE)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue  # starting, or stopping
        drivers.append(Driver(run_dir, int(info.get("pid", 0)), str(info.get("ingress", ""))))
    if not drivers:
        raise UsageError("no streamwise app is running for this user (start one with `streamwise run`)")
    return sorted(drivers, key=lambda d: d.pid)


def remote_driver(
    address: str, *, token_file: str, ca_cert_file: str | None = None, cert_file: str | None = None,
    key_file: str | None = None, timeout_s: float = 30.0,
) -> Driver:
    """The driver whose management API listens on ``address`` (``host:port``), with TLS.

    ``ca_cert_file`` verifies the driver's certificate (default: the system's roots);
    ``cert_file`` and ``key_file`` are this client's certificate, for a driver that
    requires one; ``token_file`` holds a copy of the driver's ``management.token``.
    Asks the driver who it is at once, so a wrong address, certificate or token is a
    UsageError here, naming what failed.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"a management address is HOST:PORT, got {address!r}")
    if (cert_file is None) != (key_file is None):
        raise UsageError("a client certificate and its key go together (--cert and --key)")
    try:
        with open(token_file) as f:
            token = f.read().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the management token file {token_file}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"the management token file {token_file} is empty")
    tls = grpc.ssl_channel_credentials(
        root_certificates=read_pem_file(ca_cert_file, "CA certificate"),
        private_key=read_pem_file(key_file, "client key"),
        certificate_chain=read_pem_file(cert_file, "client certificate"),
    )
    driver = Driver("", 0, "", address=address, tls=tls, token=token)
    with driver.channel() as channel:
        try:
            reply = management_pb2_grpc.ManagementStub(channel).ListApplications(
                management_pb2.ListApplicationsRequest(), metadata=driver.metadata(), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code()
            why = {
                grpc.StatusCode.UNAUTHENTICATED: "the driver refused the management token",
                grpc.StatusCode.UNAVAILABLE: "cannot connect with TLS (is the address right, does --ca-cert sign "
                "the driver's certificate, does it require a client certificate?)",
            }.get(code, code.name)
            raise UsageError(f"management API at {address}: {why}: {exc.details()}") from None
    return dataclasses.replace(driver, pid=reply.driver_pid, ingress=reply.ingress)
