"""What a dead driver's replicas leave to the app's next driver, which takes them back.

On a cluster a driver's replicas outlive it for their grace (``_outage``). The app's
next driver, started on the same machine, finds them (``Launcher.inheritance``):
with the dead driver's credentials and listening where its controller and app table
listened, it is the controller the replicas were reconnecting to. Each replica
whose code version is what the new driver would start is taken back as it runs (no
restart, no model reload); the others drain once the new replicas serve.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamwise import _auth


@dataclasses.dataclass(frozen=True, kw_only=True)
class Legacy:
    """What a replica's host keeps for the app's next driver."""

    app: str
    deployment: str
    root: str = ""  # the app's root deployment (retired first)
    controller: str  # the address its controller listened on for other nodes
    table: str = ""  # the app table's, when the replica listens on the public port
    code_version: str = ""  # ``_code_version``; "" never matches


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class InheritedReplica:
    """A running replica of a dead driver."""

    replica_id: str
    legacy: Legacy
    token: str  # the proof it gives of being the process launched for replica_id
    pid: int
    node_id: str
    store_session: str  # the object store session it joined on its node
    host: Any  # the launcher's handle on it

    def __repr__(self) -> str:
        return f"InheritedReplica({self.replica_id!r}, pid={self.pid})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Estate:
    """Everything a dead driver left running, on the cluster, that this driver can take."""

    credentials: _auth.Inherited
    controller: str
    table: str
    replicas: tuple[InheritedReplica, ...]

    @property
    def controller_port(self) -> int:
        return int(self.controller.rpartition(":")[2])

    @property
    def table_port(self) -> int:
        return int(self.table.rpartition(":")[2]) if self.table else 0
