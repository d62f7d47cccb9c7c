"""What a dead driver's replicas leave to the app's next driver, which takes them back.

``Legacy`` is what each replica's host keeps, ``Estate`` what the next driver finds,
and ``Succession`` that driver's bookkeeping until every replica is taken back or
let go.

On a cluster a driver's replicas outlive it for their grace (``_outage``). The app's
next driver, started on the same machine, finds them (``Launcher.inheritance``):
with the dead driver's credentials and listening where its controller and app table
listened, it is the controller the replicas were reconnecting to. Each replica
whose code version is what the new driver would start is taken back as it runs (no
restart, no model reload); the others drain once the new replicas serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
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


def replica_number(replica_id: str) -> int:
    """The count in a replica id (``Model#3``: 3; 0 if none)."""
    number = replica_id.rpartition("#")[2]
    return int(number) if number.isdigit() else 0


class _Waiting:
    """A dead driver's replica not taken back (yet): its Attach waits for ``claimed``."""

    def __init__(self, replica: InheritedReplica) -> None:
        self.replica = replica
        self.claimed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Succession:
    """A controller's side of taking over from a dead driver (empty when it did not).

    Holds the dead driver's replicas until a deploy claims them (``claim``) or they
    are let go (``unclaimed``: the controller has them retired), the run
    directories kept for their sockets, and an event that is set at every change
    of what a router may wait for (``notify``/``changed``). After
    ``controller_grace_s`` the replicas of apps never deployed again are let go
    (``let_go``, a callback retiring one app's).
    """

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}  # by replica id
        self._retiring: dict[str, int] = {}  # app -> retirements under way
        self._kept_dirs: list[tuple[str, int]] = []
        self._letting_go: asyncio.Task[None] | None = None
        self._letting_go_now = False  # past its sleep: aclose waits for it rather than cancel it
        self.first_own_id = 1  # the controller's replica ids start here; those below are the dead driver's
        self.table_port = 0  # where the dead driver's app table listened (for the ingress)
        self.changed = asyncio.Event()

    def take(
        self, estate: Estate, kept: list[tuple[str, int]], grace_s: float, let_go: Callable[[str], Awaitable[None]]
    ) -> None:
        self._kept_dirs = kept
        self._waiting = {r.replica_id: _Waiting(r) for r in estate.replicas}
        self.table_port = estate.table_port
        self.first_own_id = max((replica_number(r.replica_id) for r in estate.replicas), default=0) + 1

        async def later() -> None:
            await asyncio.sleep(grace_s)
            self._letting_go_now = True
            for app in self.apps():
                await let_go(app)

        self._letting_go = asyncio.get_running_loop().create_task(later())

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def apps(self) -> list[str]:
        """The apps of which replicas wait to be claimed."""
        return sorted({w.replica.legacy.app for w in self._waiting.values()})

    @contextlib.contextmanager
    def claim(self, app: str, deployment: str, code_version: str, room: int) -> Iterator[list[InheritedReplica]]:
        """Up to ``room`` waiting replicas of ``deployment`` running ``code_version``,
        to be made known in the block: their Attach proceeds once it is left, and
        should it raise, they wait on."""
        claimed = [
            w for w in self._waiting.values()
            if code_version and (w.replica.legacy.app, w.replica.legacy.deployment, w.replica.legacy.code_version)
            == (app, deployment, code_version)
        ][:room]
        for waiting in claimed:
            del self._waiting[waiting.replica.replica_id]
        try:
            yield [waiting.replica for waiting in claimed]
        except BaseException:
            self._waiting.update((w.replica.replica_id, w) for w in claimed)
            raise
        for waiting in claimed:
            waiting.claimed.set_result(None)

    def unclaimed(self, app: str) -> list[InheritedReplica]:
        """The waiting replicas of ``app``, given up: their Attach waits on until they exit."""
        found = [w.replica for w in self._waiting.values() if w.replica.legacy.app == app]
        for replica in found:
            del self._waiting[replica.replica_id]
        return found

    @contextlib.contextmanager
    def retiring(self, app: str) -> Iterator[None]:
        """While replicas of ``app`` it gave up drain (their routers keep what they know)."""
        self._retiring[app] = self._retiring.get(app, 0) + 1
        try:
            yield
        finally:
            self._retiring[app] -= 1
            if not self._retiring[app]:
                del self._retiring[app]
            self.notify()

    def holds(self, app: str) -> bool:
        """Whether replicas of ``app`` wait to be claimed or are being retired."""
        return app in self._retiring or any(w.replica.legacy.app == app for w in self._waiting.values())

    def replaces(self, app: str, deployment: str) -> bool:
        """Whether replicas of ``deployment`` wait, to be replaced unless claimed."""
        return any((w.replica.legacy.app, w.replica.legacy.deployment) == (app, deployment) for w in self._waiting.values())

    async def wait_claimed(self, replica_id: str, token: str | None) -> bool:
        """For a call of a dead driver's replica: True once it is claimed (it waits
        till then; if it is given up, until it exits); False if it is no waiting
        replica, or not the process that replica is."""
        waiting = self._waiting.get(replica_id)
        if waiting is None or token is None or not _auth.same(token, waiting.replica.token):
            return False
        await asyncio.shield(waiting.claimed)
        return True

    def theirs(self, replica_id: str) -> bool:
        """Whether ``replica_id`` was the dead driver's."""
        return 0 < replica_number(replica_id) < self.first_own_id

    async def aclose(self) -> None:
        """Stop letting go later (wait for a letting go under way); then the caller
        retires what still waits (``apps``), and ``remove_kept`` ends the rest."""
        if self._letting_go is not None:
            if not self._letting_go_now:
                self._letting_go.cancel()
            await asyncio.gather(self._letting_go, return_exceptions=True)

    def remove_kept(self) -> None:
        kept, self._kept_dirs = self._kept_dirs, []
        _auth.remove_kept(kept)
