"""What the controller knows of each deployment: its replicas, slots and load.

``_Deployment`` is one deployment's state, ``_Replica`` one replica process of it,
and ``_Slot`` one replica the deployment should run (its supervisor in the
controller keeps the slot filled). Changes are published to routers through
``publish()``; ``snapshot()`` is what they receive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from streamwise import codec
from streamwise.actors.launcher import ReplicaProcess
from streamwise.actors.spec import ReplicaSpec
from streamwise.autoscaling.autoscaler import Autoscaler
from streamwise.autoscaling.load import LoadBook
from streamwise.config import DeploymentConfig
from streamwise.proto import controller_pb2, replica_pb2

log = logging.getLogger("streamwise.controller")


class ReplicaState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclasses.dataclass(eq=False)
class _Replica:
    replica_id: str
    process: ReplicaProcess
    token: str = dataclasses.field(repr=False)  # proves the process is the one launched for replica_id
    state: ReplicaState = ReplicaState.STARTING
    address: str = ""
    local_address: str = ""
    node: str = ""
    attached: asyncio.Future[replica_pb2.RemoteError | None] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Commands for the replica, sent down its Attach stream; None ends the stream.
    control: asyncio.Queue[controller_pb2.ControlMessage | None] = dataclasses.field(default_factory=asyncio.Queue)
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    model_ids: tuple[str, ...] = ()  # multiplexed models it holds
    model_capacity: int = 0
    store_session: str = ""
    stream: asyncio.Task[Any] | None = dataclasses.field(default=None, repr=False)  # the Attach handler's
    adopted: bool = False  # started by a dead driver, taken back by this one (``_succession``)

    def release(self) -> None:
        if not self.released.is_set():
            self.released.set()
            self.control.put_nowait(None)


@dataclasses.dataclass(eq=False)
class _Slot:
    """One replica a deployment should run; its supervisor keeps it filled until retired."""

    replica: _Replica | None = None
    retired: bool = False
    task: asyncio.Task[None] | None = None


class _Deployment:
    """Controller-side state of one deployment."""

    def __init__(self, spec: ReplicaSpec, observers: list[Callable[[_Deployment], None]] | None = None) -> None:
        self.observers = observers if observers is not None else []
        self.spec = spec
        self.config = spec.config
        self.spec_bytes = codec.cloudpickle_dumps(spec)
        self.replicas: dict[str, _Replica] = {}
        self.version = 0
        self.changed = asyncio.Event()
        self.deleted = False
        self.stopping = False
        self.slots: list[_Slot] = []
        self.restarts = 0  # replicas replaced after they died or failed health checks
        self.created_at = time.monotonic()
        self.load = LoadBook()  # its callers' and replicas' load reports
        self.code_version = ""  # on a cluster: ``_code_version``, for the app's next driver
        self.autoscaler: Autoscaler | None = None  # made when it is first autoscaled

    @property
    def seen_load(self) -> tuple[float, float]:
        """(ongoing, queued) at the autoscaler's last decision."""
        return self.autoscaler.seen if self.autoscaler is not None else (0.0, 0.0)

    def running(self) -> int:
        return sum(r.state is ReplicaState.RUNNING for r in self.replicas.values())

    def adopting(self) -> bool:
        """Whether a replica a dead driver left, taken back, has yet to attach."""
        return any(r.adopted and r.state is ReplicaState.STARTING for r in self.replicas.values())

    @property
    def target(self) -> int:
        """Replicas the deployment should run now (some may be starting)."""
        return sum(not slot.retired for slot in self.slots)

    @property
    def report_interval_s(self) -> float:
        autoscaling = self.config.autoscaling_config
        return 0.0 if autoscaling is None else float(autoscaling.metrics_interval_s)

    def reporting_message(self) -> controller_pb2.ControlMessage:
        return controller_pb2.ControlMessage(
            load_reporting=controller_pb2.LoadReporting(interval_s=self.report_interval_s)
        )

    def reconfigure(self, config: DeploymentConfig) -> None:
        """Take ``config`` from now on (replicas started later are built with it)."""
        self.config = config
        self.spec = dataclasses.replace(self.spec, config=config)
        self.spec_bytes = codec.cloudpickle_dumps(self.spec)

    def publish(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()
        self.notify()

    def notify(self) -> None:
        """Tell the observers (``Controller.observers``) that the replicas changed."""
        for observer in self.observers:
            try:
                observer(self)
            except Exception:  # an observer's bug must not stop the controller
                log.exception("a replica observer failed")

    def snapshot(self) -> controller_pb2.ReplicaSet:
        return controller_pb2.ReplicaSet(
            version=self.version,
            deleted=self.deleted,
            max_ongoing_requests=self.config.max_ongoing_requests,
            max_queued_requests=self.config.max_queued_requests,
            load_report_interval_s=self.report_interval_s,
            replicas=[
                controller_pb2.ReplicaInfo(
                    replica_id=r.replica_id, address=r.address, local_address=r.local_address, node=r.node,
                    model_ids=r.model_ids, model_capacity=r.model_capacity, store_session=r.store_session,
                )
                for r in self.replicas.values()
                if r.state is ReplicaState.RUNNING
            ],
        )
